"""The heads: N-source fusion (the same weights as the two-source fit it replaced), the typed spec
that keys a fit, a fit that round-trips through its stored form, and small stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icl_cl import ClassifierConfig, ContinualClassifier, Example
from icl_cl.config import CalibrationConfig, LLMConfig
from icl_cl.heads import FittedHeads, HeadSpec, ScoreCalibrator, fit_fusion
from icl_cl.heads.calibrator import MIN_GOLD_ITEMS


def _sources(seed: int, llm_strength: float) -> tuple[list, list, list]:
    """A fixed seeded held-out set: 240 items, 6 candidates, a weak ECL and an LLM of the given
    strength; some LLM scores missing (-inf) and some items without a gold candidate."""
    rng = np.random.default_rng(seed)
    n, k = 240, 6
    gold_pos = rng.integers(0, k, n)
    ecl = rng.normal(size=(n, k)) * 3.0
    ecl[np.arange(n), gold_pos] += 2.0
    llm = rng.normal(size=(n, k))
    llm[np.arange(n), gold_pos] += llm_strength
    llm[::17, 2] = -np.inf  # dropped candidates: those items are left out
    gold = [{int(g)} if i % 11 else set() for i, g in enumerate(gold_pos)]
    return list(ecl), list(llm), gold


# Computed on these inputs by the two-source fit_fusion this N-source one replaced (ECL weight,
# LLM weight, items, held-out accuracy of the ECL, the LLM, and the cross-fitted fusion).
BEFORE = {
    (7, 2.0): (
        0.22320692611564474,
        2.0299957120808076,
        205,
        0.35609756097560974,
        0.7804878048780488,
        0.7804878048780488,
    ),
    (8, 0.1): (
        0.19221057053061022,
        0.0,
        205,
        0.32195121951219513,
        0.2048780487804878,
        0.33170731707317075,
    ),
}


@pytest.mark.parametrize(("seed", "strength"), list(BEFORE))
def test_two_sources_give_the_weights_of_the_two_source_fit(seed, strength):
    ecl, llm, gold = _sources(seed, strength)
    w = fit_fusion({"ecl": ecl, "llm": llm}, gold)
    got = (
        w.weights["ecl"],
        w.weights["llm"],
        w.heldout_items,
        w.heldout_accuracy["ecl"],
        w.heldout_accuracy["llm"],
        w.heldout_accuracy["fused"],
    )
    # The weights come from an iterative fit: BLAS builds move its last digits (2e-8 seen).
    assert got == pytest.approx(BEFORE[(seed, strength)], rel=1e-6, abs=1e-12)
    assert w.uses("llm") == (strength == 2.0)


def test_an_added_source_is_one_more_score_matrix_and_must_earn_its_weight():
    rng = np.random.default_rng(3)
    n, k = 400, 5
    gold_pos = rng.integers(0, k, n)
    ecl = rng.normal(size=(n, k))
    ecl[np.arange(n), gold_pos] += 0.8
    strong = rng.normal(size=(n, k))
    strong[np.arange(n), gold_pos] += 2.5
    noise = rng.normal(size=(n, k))
    gold = [{int(g)} for g in gold_pos]
    w = fit_fusion({"ecl": list(ecl), "llm": list(strong), "other": list(noise)}, gold)
    assert list(w.weights) == ["ecl", "llm", "other"]
    assert w.uses("ecl") and w.uses("llm") and not w.uses("other")
    assert w.weights["other"] == 0.0
    assert set(w.heldout_accuracy) == {"ecl", "llm", "other", "fused", "kept"}
    # The untrusted source changes nothing; a missing one (None) neither.
    row = {"ecl": ecl[0], "llm": strong[0], "other": noise[0]}
    np.testing.assert_array_equal(w.combine(row), w.combine({**row, "other": None}))
    assert np.argmax(w.combine(row)) == np.argmax(
        w.weights["ecl"] * ecl[0] + w.weights["llm"] * strong[0]
    )


def test_too_few_items_give_the_base_source_alone():
    ecl, llm, gold = _sources(7, 2.0)
    w = fit_fusion({"ecl": ecl[:10], "llm": llm[:10]}, gold[:10])  # 9 usable items
    assert w.heldout_items < 10 and w.weights == {"ecl": 1.0, "llm": 0.0}
    assert np.isnan(w.heldout_accuracy["fused"])


def test_the_spec_keys_everything_that_changes_the_heldout_scores():
    base = ClassifierConfig(llm=LLMConfig(model="a"))
    spec = HeadSpec.of(base, 10, "knn", use_llm=True)
    assert spec.reads and spec.llm is not None
    assert spec == HeadSpec.of(base, 10, "knn", use_llm=True)
    others = [
        HeadSpec.of(base, 5, "knn", use_llm=True),
        HeadSpec.of(base, 10, "ncm", use_llm=True),
        HeadSpec.of(base, 10, "knn", use_llm=False),
        HeadSpec.of(base.model_copy(update={"llm": LLMConfig(model="b")}), 10, "knn", use_llm=True),
        HeadSpec.of(
            base.model_copy(update={"calibration": CalibrationConfig(heldout=50)}),
            10,
            "knn",
            use_llm=True,
        ),
    ]
    assert len({spec.digest, *(o.digest for o in others)}) == 1 + len(others)
    # Without the LLM reading, its settings do not matter: one fit serves every LLM config.
    no_llm = HeadSpec.of(base, 10, "knn", use_llm=False)
    assert no_llm.llm is None and no_llm.prompt is None
    assert no_llm == HeadSpec.of(ClassifierConfig(), 10, "knn", use_llm=True)
    again = HeadSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and again.digest == spec.digest


def test_a_fit_round_trips_through_its_stored_form(tmp_path, embedder, wordnet):
    train, test, labels = wordnet
    with ContinualClassifier.open(tmp_path / "s", embedder=embedder) as clf:
        clf.learn(train, labels, k=4)
        heads = clf.fit(4)
        again = FittedHeads.from_dict(heads.spec, json.loads(json.dumps(heads.to_dict())))
        ranked = clf.memory.candidates(embedder.encode([ex.text for ex in test[:10]]), 4)
        a = heads.decide(ranked, confidence=0.9)
        b = again.decide(ranked, confidence=0.9)
    assert [p.scores for p in a] == [p.scores for p in b] and [p.set for p in a] == [
        p.set for p in b
    ]


def test_below_the_minimum_of_gold_items_nothing_is_fitted():
    rng = np.random.default_rng(0)
    scores = [rng.normal(size=4) * 100 for _ in range(MIN_GOLD_ITEMS - 1)]
    gold = [[0]] * len(scores)
    few = ScoreCalibrator.fit(scores, gold, multi_label=False)
    assert few.default_reason and f"fewer than {MIN_GOLD_ITEMS}" in few.default_reason
    # Scores in units of their spread: a gap of one spread is a factor e.
    spread = float(np.std(np.concatenate([s - s.mean() for s in scores])))
    p = few.probabilities(np.array([[spread, 0.0]]))[0]
    assert p[0] / p[1] == pytest.approx(np.e)
    enough = ScoreCalibrator.fit([*scores, rng.normal(size=4) * 100], [*gold, [0]], False)
    assert enough.default_reason is None
    stored = ScoreCalibrator.from_dict(json.loads(json.dumps(few.to_dict())))
    assert stored.default_reason == few.default_reason
    multi = ScoreCalibrator.fit(scores, [[0, 1]] * len(scores), multi_label=True)
    assert multi.default_reason and 0 < multi.probabilities(np.array([[0.0]]))[0, 0] < 1


def test_a_store_of_four_examples_gives_probabilities_that_say_something(tmp_path, embedder):
    """The library example: two labels, two examples each. Held out one at a time, each item
    leaves one example of its label: far too few to fit a temperature on."""
    examples = [
        Example("a1", "the cat sat on the mat", ["animal"]),
        Example("a2", "a dog barked at night", ["animal"]),
        Example("v1", "a car drove down the road", ["vehicle"]),
        Example("v2", "the train left the station", ["vehicle"]),
    ]
    with ContinualClassifier.open(tmp_path / "s", embedder=embedder) as clf:
        clf.learn(examples)
        preds = clf.predict(["a kitten purred", "the bus was late"])
        (heads,) = clf.info()["heads"]
    assert [p.labels for p in preds] == [("animal",), ("vehicle",)]
    for p in preds:
        top, other = sorted(p.scores.values(), reverse=True)
        assert 0.6 < top < 1 and other == pytest.approx(1 - top)
    assert heads["calibration_heldout_items"] == 4
    assert "fewer than" in heads["calibration_default"]
