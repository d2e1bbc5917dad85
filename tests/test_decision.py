"""Label-set rules of multi-label stores: hand-worked examples, then through a real store."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
from pydantic import ValidationError

from icl_cl.classifier import ContinualClassifier
from icl_cl.cli import main
from icl_cl.config import ClassifierConfig, DecisionConfig
from icl_cl.errors import ConfigError
from icl_cl.heads import LabelSetRule
from icl_cl.types import Example, LabelSetEvidence

# A tiny held-out set, candidates a and b on every item.
#   label a: (0.9 gold) (0.7 gold) (0.4) (0.35 gold): F1 of the top 1..4 = 2/4, 4/5, 4/6, 6/7,
#            so a's best threshold takes all four: 0.35.
#   label b: (0.6 gold) (0.3) (0.2) (0.1): the top one alone has F1 1; halfway down: 0.45.
#   all pairs: 0.9+ 0.7+ 0.6+ 0.4 0.35+ 0.3 0.2 0.1 (4 gold): micro-F1 of the top 1..8 =
#            2/5, 4/6, 6/7, 6/8, 8/9, 8/10, 8/11, 8/12; best the top 5: (0.35 + 0.3) / 2 = 0.325.
HELDOUT = (
    [np.array([0.9, 0.2]), np.array([0.7, 0.6]), np.array([0.4, 0.3]), np.array([0.35, 0.1])],
    [["a", "b"]] * 4,
    [{"a"}, {"a", "b"}, set(), {"a"}],
)


def test_cardinality_takes_the_top_n_and_at_least_one():
    rule = LabelSetRule("cardinality")
    p = np.array([0.2, 0.9, 0.5, 0.7])
    assert rule.choose("abcd", p, 2.4) == (1, 3)
    assert rule.choose("abcd", p, 0.2) == (1,)
    assert rule.choose("abcd", p, 9.0) == (1, 3, 2, 0)
    assert rule.evidence(["b", "d"]) == LabelSetEvidence("cardinality")


def test_threshold_takes_every_candidate_above_it_or_else_the_top_one():
    p = np.array([0.3, 0.6, 0.55, 0.1])
    assert LabelSetRule("threshold", 0.5).choose("abcd", p) == (1, 2)
    assert LabelSetRule("threshold", 0.55).choose("abcd", p) == (1, 2)  # >= threshold
    assert LabelSetRule("threshold", 0.9).choose("abcd", p) == (1,)  # none passes: the top one
    assert LabelSetRule("threshold", 0.5).evidence(["b"]) == LabelSetEvidence("threshold", 0.5)


def test_label_thresholds_are_best_f1_shrunk_towards_the_best_micro_f1():
    rule = LabelSetRule.fit(*HELDOUT)
    assert rule.rule == "label_thresholds" and rule.heldout_items == 4
    assert rule.threshold == pytest.approx(0.325)
    # a has 3 held-out positives: (3 * 0.35 + 5 * 0.325) / 8.
    assert rule.threshold_for("a") == pytest.approx(0.334375)
    # b, a rare label (1 positive), keeps only 1/6 of its own 0.45: (0.45 + 5 * 0.325) / 6.
    assert rule.threshold_for("b") == pytest.approx(2.075 / 6)
    # A label never gold in held-out data gets the global threshold.
    assert rule.threshold_for("z") == pytest.approx(0.325)
    assert rule.choose(["a", "b"], np.array([0.34, 0.346])) == (1, 0)
    assert rule.choose(["a", "b"], np.array([0.34, 0.34])) == (0,)  # b's 0.3458 not reached
    assert rule.choose(["a", "b"], np.array([0.3, 0.2])) == (0,)  # none passes: the top one
    assert rule.evidence(["a"]) == LabelSetEvidence(
        "label_thresholds", thresholds={"a": pytest.approx(0.334375)}
    )


def test_gold_labels_outside_the_candidates_count_as_misses():
    # x alone: (0.8 gold) (0.5) (0.45) (0.4 gold): the top 1 and the top 4 tie at F1 2/3, and the
    # higher threshold wins: (0.8 + 0.5) / 2. The global threshold is the same.
    probabilities = [np.array([p]) for p in (0.8, 0.5, 0.45, 0.4)]
    labels, gold = [["x"]] * 4, [{"x"}, set(), set(), {"x"}]
    rule = LabelSetRule.fit(probabilities, labels, gold)
    assert rule.threshold == pytest.approx(0.65) and rule.threshold_for("x") == pytest.approx(0.65)
    # Two more items whose gold x was not a candidate: x's F1 is 2/5 at the top 1, 4/8 at the
    # top 4 (threshold 0.4). All pairs (two more at 0.1): best the top 4, (0.4 + 0.1) / 2.
    rule = LabelSetRule.fit(
        [*probabilities, np.array([0.1]), np.array([0.1])],
        [*labels, ["y"], ["y"]],
        [*gold, {"x"}, {"x"}],
    )
    assert rule.threshold == pytest.approx(0.25)
    assert rule.threshold_for("x") == pytest.approx((2 * 0.4 + 5 * 0.25) / 7)


def test_without_gold_candidates_the_configured_threshold_stands():
    rule = LabelSetRule.fit([np.array([0.9, 0.1])], [["a", "b"]], [{"c"}], default=0.7)
    assert rule.threshold == 0.7 and dict(rule.label_thresholds) == {}


def test_rule_round_trips_through_its_stored_form():
    rule = LabelSetRule.fit(*HELDOUT)
    stored = json.loads(json.dumps(rule.to_dict()))
    again = LabelSetRule.from_dict(stored)
    assert again.to_dict() == rule.to_dict()
    assert again.threshold_for("b") == pytest.approx(rule.threshold_for("b"))
    plain = LabelSetRule("threshold", 0.3)
    assert LabelSetRule.from_dict(plain.to_dict()) == plain


def test_bad_decision_settings_are_refused():
    for bad in ({"threshold": 0.0}, {"threshold": 1.0}, {"rule": "top_k"}, {"thresold": 0.5}):
        with pytest.raises(ValidationError):
            DecisionConfig(**bad)
    with pytest.raises(ConfigError, match="decision"):
        ClassifierConfig.from_dict({"decision": {"threshold": 1.5}})
    with pytest.raises(ValueError, match="unknown label-set rule"):
        LabelSetRule("top_k")


# ---- through a real multi-label store ---------------------------------------------------


@pytest.fixture(scope="module")
def debtags_store(tmp_path_factory, embedder, debtags):
    train, _, labels = debtags
    path = tmp_path_factory.mktemp("decision") / "store"
    with ContinualClassifier.open(path, embedder=embedder) as clf:
        clf.learn(train, labels)
        assert clf.memory.multi_label
    return path


@pytest.fixture
def store(debtags_store, tmp_path):
    path = tmp_path / "store"
    shutil.copytree(debtags_store, path)
    return path


def _open(path, embedder, **decision):
    config = ClassifierConfig(decision=DecisionConfig(**decision))
    return ContinualClassifier.open(path, config, embedder=embedder)


def test_thresholds_decide_label_sets_in_a_store(store, embedder, debtags):
    texts = [ex.text for ex in debtags[1][:12]]
    with _open(store, embedder, rule="threshold", threshold=1 - 1e-9) as clf:
        preds = clf.predict(texts, k=10)
    assert all(len(p.labels) == 1 and p.labels[0] == p.candidates[0].label for p in preds)
    assert preds[0].evidence.decision == LabelSetEvidence("threshold", 1 - 1e-9)
    with _open(store, embedder, rule="threshold", threshold=1e-9) as clf:
        preds = clf.predict(texts, k=10)
    assert all(p.labels == tuple(c.label for c in p.candidates) for p in preds)
    with _open(store, embedder) as clf:  # the default: cardinality
        preds = clf.predict(texts, k=10)
    assert max(len(p.labels) for p in preds) > 1
    assert all(p.evidence.decision == LabelSetEvidence("cardinality") for p in preds)


def test_label_thresholds_are_fitted_stored_reused_and_refitted(store, embedder, debtags):
    _, test, _ = debtags
    texts = [ex.text for ex in test[:12]]
    clf = _open(store, embedder, rule="label_thresholds")
    heads = clf.fit(10)
    rule = heads.rule
    assert heads.n_examples == clf.memory.n_examples
    assert rule.rule == "label_thresholds" and rule.heldout_items > 0 and rule.label_thresholds
    preds = clf.predict(texts, k=10)
    for p in preds:
        used = p.evidence.decision.thresholds
        assert p.evidence.decision.rule == "label_thresholds" and set(used) == set(p.labels)
        passing = [lab for lab in p.scores if p.scores[lab] >= rule.threshold_for(lab)]
        assert list(p.labels) == (passing or [p.candidates[0].label])
        assert not p.evidence.stale_fit
    # Reopened, the stored thresholds are used as they are: doctor them to see it.
    doctored = LabelSetRule("label_thresholds", 1e-9, {}, rule.heldout_items)
    clf.heads.save(dataclasses.replace(heads, rule=doctored))
    clf.close()
    with _open(store, embedder, rule="label_thresholds") as clf:
        preds = clf.predict(texts, k=10)
        assert all(p.labels == tuple(c.label for c in p.candidates) for p in preds)
        # A session of under 10% of the store keeps them current: used as they are, and a fit
        # keeps them ...
        extra = [Example(f"{ex.id}#new", ex.text, ex.labels) for ex in test[:5]]
        clf.learn(extra, fit=False)
        preds = clf.predict(texts[:2], k=10)
        assert not any(p.evidence.stale_fit for p in preds)
        assert all(p.labels == tuple(c.label for c in p.candidates) for p in preds)
        kept = clf.fit(10).rule
        assert kept.threshold < 1e-6 and not kept.label_thresholds  # still the doctored ones
        # ... until a full fit fits them again at the new size.
        heads = clf.fit(10, full=True)
        assert heads.n_examples == clf.memory.n_examples and heads.rule.threshold > 1e-9
        assert not any(p.evidence.stale_fit for p in clf.predict(texts[:2], k=10))


def test_cli_threshold_options(store, tmp_path, capsys, debtags):
    inputs = tmp_path / "in.jsonl"
    inputs.write_text(
        "".join(json.dumps({"id": ex.id, "text": ex.text}) + "\n" for ex in debtags[1][:5])
    )
    out = tmp_path / "out.jsonl"
    base = ["-q", "predict", "--store", str(store), "--input", str(inputs), "--output", str(out)]
    assert main([*base, "--threshold", "1.5"]) == 2
    assert "--threshold must be between 0 and 1" in capsys.readouterr().err
    assert main([*base, "--decision", "label_thresholds", "--threshold", "0.3"]) == 2
    assert "--threshold applies to --decision threshold only" in capsys.readouterr().err
    assert not out.exists()
    assert main([*base, "--threshold", "0.999999999"]) == 0  # alone: implies the threshold rule
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(len(r["labels"]) == 1 for r in rows)
