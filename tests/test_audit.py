"""The audit of a store (which stored labels are probably wrong): confident learning's rules on
hand-made probabilities, and the library call, the CLI and the service on the shipped samples
with labels made wrong on purpose."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from icl_cl.classifier import ContinualClassifier
from icl_cl.cli import main
from icl_cl.labelling.audit import heldout_table
from icl_cl.labelling.confident_learning import multi_label_issues, single_label_issues
from icl_cl.memory.feature_space import HeldOutScorer
from icl_cl.service.app import create_app
from icl_cl.types import Example
from tests.service_helpers import learned_store, running, wait_ready

N_FLIPPED = 12


def test_single_label_rules_flag_the_item_confidently_of_another_label():
    # Labels 0 and 1. Four items given 0 are sure of it, one given 0 is sure of 1, four items
    # given 1 lean to it. Thresholds: t0 = (4 * 0.9 + 0.1) / 5 = 0.74, t1 = 0.8.
    probs = np.array([[0.9, 0.1]] * 4 + [[0.1, 0.9]] + [[0.2, 0.8]] * 4)
    columns = np.tile([0, 1], (9, 1))
    given = np.array([0] * 5 + [1] * 4)
    issues = single_label_issues(columns, probs, given, np.ones(9, bool), 2)
    assert issues.thresholds == pytest.approx([0.74, 0.8])
    assert issues.flagged.tolist() == [False] * 4 + [True] + [False] * 4
    assert issues.suggested[4].tolist() == [False, True]
    assert issues.changed[4].tolist() == [True, True]
    assert issues.score[4] == pytest.approx(0.9)  # 1 - p(given)
    assert issues.suggested[0].tolist() == [True, False]  # an item not flagged keeps its label
    # A given label that could not be scored (no other item carries it) is never flagged.
    unscored = np.ones(9, bool)
    unscored[4] = False
    assert not single_label_issues(columns, probs, given, unscored, 2).flagged.any()


def test_multi_label_rules_find_a_spurious_and_a_missing_tag():
    # Tags a (0) and b (1). Items 0-4 are tagged a, items 5-9 b. Item 4's a is spurious (p_a
    # 0.05), item 9 lacks a (p_a 0.95). t_yes(a) = (4 * 0.9 + 0.05) / 5 = 0.73 and
    # t_no(a) = 1 - (4 * 0.05 + 0.95) / 5 = 0.77.
    p_a = [0.9] * 4 + [0.05] + [0.05] * 4 + [0.95]
    p_b = [0.05] * 5 + [0.9] * 5
    probs = np.stack([p_a, p_b], axis=1)
    columns = np.tile([0, 1], (10, 1))
    given = np.zeros((10, 2), bool)
    given[:5, 0] = given[5:, 1] = True
    issues = multi_label_issues(columns, probs, given, np.ones((10, 2), bool), 2)
    assert issues.thresholds[0] == pytest.approx(0.73)
    assert np.flatnonzero(issues.flagged).tolist() == [4, 9]
    assert issues.changed[4].tolist() == [True, False]  # a is spurious
    assert issues.suggested[4].tolist() == [False, False]
    assert issues.changed[9].tolist() == [True, False]  # a is missing
    assert issues.suggested[9].tolist() == [True, True]
    assert issues.score[[4, 9]] == pytest.approx([0.95, 0.95])


def _flipped(examples: list[Example], seed: int = 0) -> tuple[list[Example], set[str]]:
    """The examples with ``N_FLIPPED`` of them given another label at random."""
    rng = random.Random(seed)
    names = sorted({lab for ex in examples for lab in ex.labels})
    out, flipped = list(examples), set()
    for i in rng.sample(range(len(examples)), N_FLIPPED):
        ex = examples[i]
        wrong = rng.choice([name for name in names if name != ex.labels[0]])
        out[i] = Example(ex.id, ex.text, [wrong])
        flipped.add(ex.id)
    return out, flipped


@pytest.fixture(scope="module")
def noisy_store(tmp_path_factory: pytest.TempPathFactory, embedder: Any, wordnet: Any) -> Any:
    """A store of the WordNet sample's train with 12 labels made wrong: (path, flipped ids,
    the clean examples)."""
    train, _test, labels = wordnet
    noisy, flipped = _flipped(train)
    path = learned_store(tmp_path_factory.mktemp("audit") / "store", embedder, noisy, labels)
    return path, flipped, {ex.id: ex for ex in train}


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir()) if f.is_file()}


def test_audit_finds_the_wrong_labels_with_their_evidence_and_writes_nothing(
    noisy_store: Any, embedder: Any
):
    path, flipped, clean = noisy_store
    with ContinualClassifier.open(path, embedder=embedder, read_only=True) as clf:
        before = _files(path)
        report = clf.audit()
        assert _files(path) == before
    assert report.audited == 240 and report.calibration == "stored fit"
    found = [f.id for f in report.findings]
    hits = len(set(found) & flipped)
    # Most wrong labels are found, and a finding is far likelier to be one than chance (5%).
    assert hits >= N_FLIPPED // 2
    assert hits / len(found) >= 0.25
    assert report.flagged == len(found)
    assert [f.score for f in report.findings] == sorted(
        (f.score for f in report.findings), reverse=True
    )
    assert [i for i, _ in report.scores[: len(found)]] == found
    # The label suggested for a flipped item is mostly the one it had before.
    right = [f.suggested[0] == clean[f.id].labels[0] for f in report.findings if f.id in flipped]
    assert sum(right) >= len(right) / 2
    for f in report.findings:
        assert f.suggested and f.suggested[0] != f.labels[0]
        assert 0.0 <= f.score <= 1.0
        assert f.score == pytest.approx(1.0 - f.probabilities[f.labels[0]])
        assert f.probabilities[f.suggested[0]] > f.probabilities[f.labels[0]]
        assert set(f.thresholds) == set(f.probabilities)
        assert len(f.neighbours) == 5 and f.id not in {n.id for n in f.neighbours}
        assert f.missing == () and f.spurious == ()


@pytest.mark.parametrize("scorer", ["klda", "ranpac", "klda+ranpac"])
def test_audit_scores_as_the_held_out_heads_would(
    noisy_store: Any, embedder: Any, scorer: str, monkeypatch: pytest.MonkeyPatch
):
    """Each fold's items get from the fold-wise identities the scores that the fold's held-out
    heads (solved as a prediction's, float32 weights) give them."""
    path, _flipped_ids, _clean = noisy_store
    with ContinualClassifier.open(path, embedder=embedder, read_only=True) as clf:
        memory = clf.memory
        if scorer == "klda+ranpac":  # a choice (not saved) that combines both
            weights = {"klda": 0.5, "ranpac": 3.0, "mahalanobis": 0.0}
            memory.set_choice(dataclasses.replace(memory.choice, weights=weights), save=False)
        k = len(memory.labels)
        fast = heldout_table(memory, scorer, k, seed=0)
        monkeypatch.setattr(HeldOutScorer, "_positions", lambda self, queries: None)
        solved = heldout_table(memory, scorer, k, seed=0)
    assert fast.rows == solved.rows
    for table in (fast, solved):  # back in label columns, whatever the ranking's ties
        table.scores[np.arange(len(table.rows))[:, None], table.columns] = table.scores.copy()
    spread = np.abs(solved.scores[np.isfinite(solved.scores)]).max()
    np.testing.assert_allclose(fast.scores, solved.scores, rtol=1e-5, atol=1e-6 * spread)


def test_audit_limit_and_neighbours(noisy_store: Any, embedder: Any):
    path, _flipped_ids, _clean = noisy_store
    with ContinualClassifier.open(path, embedder=embedder, read_only=True) as clf:
        full = clf.audit(neighbours=0)
        few = clf.audit(limit=3, neighbours=2)
    assert [f.id for f in few.findings] == [f.id for f in full.findings[:3]]
    assert few.flagged == full.flagged
    assert all(len(f.neighbours) == 2 for f in few.findings)
    assert all(f.neighbours == () for f in full.findings)


def test_audit_of_a_store_without_a_fit_fits_its_calibration_on_the_audited_items(
    tmp_path: Path, embedder: Any, wordnet: Any
):
    train, _test, labels = wordnet
    noisy, flipped = _flipped(train, seed=1)
    with ContinualClassifier.open(tmp_path / "store", embedder=embedder) as clf:
        clf.learn(noisy, labels, fit=False)
        report = clf.audit()
    assert report.calibration == "fitted on the audited items"
    assert len({f.id for f in report.findings} & flipped) >= N_FLIPPED // 2


def test_audit_of_a_store_of_a_handful_of_examples(tmp_path: Path, embedder: Any, wordnet: Any):
    train, _test, labels = wordnet
    few = [ex for ex in train if ex.labels[0] == "noun.animal"][:2]
    few += [ex for ex in train if ex.labels[0] == "verb.motion"][:2]
    with ContinualClassifier.open(tmp_path / "store", embedder=embedder) as clf:
        clf.learn(few, labels)
        report = clf.audit()
    # Held out one at a time, each example leaves one of its label to be scored against.
    assert report.audited == 4
    assert sorted(ident for ident, _ in report.scores) == sorted(ex.id for ex in few)
    assert report.calibration == "stored fit"  # the fit's default: scores over their spread


def test_multi_label_audit_finds_dropped_and_added_tags(
    tmp_path: Path, embedder: Any, debtags: Any
):
    train, _test, labels = debtags
    counts: dict[str, int] = {}
    for ex in train:
        for lab in ex.labels:
            counts[lab] = counts.get(lab, 0) + 1
    frequent = sorted(counts, key=lambda lab: -counts[lab])[:3]
    rng = random.Random(0)
    noisy, dropped, added = list(train), {}, {}
    for i in rng.sample(range(len(train)), 40):
        ex = train[i]
        kept = [lab for lab in ex.labels if lab not in frequent]
        if len(kept) < len(ex.labels) and kept and len(dropped) < 10:
            noisy[i] = Example(ex.id, ex.text, kept)
            dropped[ex.id] = set(ex.labels) - set(kept)
        elif len(kept) == len(ex.labels) and len(added) < 10:
            extra = rng.choice(frequent)
            noisy[i] = Example(ex.id, ex.text, [*ex.labels, extra])
            added[ex.id] = extra
    with ContinualClassifier.open(tmp_path / "store", embedder=embedder) as clf:
        clf.learn(noisy, labels)
        report = clf.audit()
    assert report.multi_label
    by_id = {f.id: f for f in report.findings}
    missing = sum(bool(set(by_id[i].missing) & tags) for i, tags in dropped.items() if i in by_id)
    spurious = sum(added[i] in by_id[i].spurious for i in added if i in by_id)
    assert missing + spurious >= (len(dropped) + len(added)) // 3
    for f in report.findings:
        assert f.missing or f.spurious
        assert set(f.suggested) == (set(f.labels) - set(f.spurious)) | set(f.missing)
        assert all(f.probabilities[lab] > 0.5 for lab in f.missing)
        assert all(f.probabilities[lab] < 0.5 for lab in f.spurious)


def test_cli_audit_writes_the_findings(noisy_store: Any, tmp_path: Path, capsys: Any):
    path, _flipped, _clean = noisy_store
    out = tmp_path / "audit.jsonl"
    assert main(["-q", "audit", "--store", str(path), "--output", str(out), "--limit", "5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    assert set(rows[0]) >= {"id", "text", "labels", "suggested", "score", "evidence"}
    assert set(rows[0]["evidence"]) == {"probabilities", "thresholds", "neighbours"}
    assert rows[0]["score"] >= rows[-1]["score"]
    assert main(["audit", "--store", str(path), "--limit", "2"]) == 0
    printed = capsys.readouterr()
    assert [json.loads(line)["id"] for line in printed.out.splitlines()] == [
        r["id"] for r in rows[:2]
    ]
    assert "audited 240 stored examples" in printed.err


def test_service_audit_is_a_read(noisy_store: Any, embedder: Any):
    path, _flipped_ids, _clean = noisy_store
    app = create_app(path, embedder=embedder)
    with running(app) as url:
        wait_ready(url, {})
        before = _files(path)
        answer = httpx.post(url + "/v1/audit", json={"limit": 3, "neighbours": 1}, timeout=120)
        bad = httpx.post(url + "/v1/audit", json={"limit": 0}, timeout=60)
        assert _files(path) == before
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["audited"] == 240 and body["returned"] == 3 and body["flagged"] >= 3
    assert len(body["findings"]) == 3
    assert len(body["findings"][0]["evidence"]["neighbours"]) == 1
    assert bad.status_code == 422


def test_service_predicts_during_an_audit_and_edits_wait_for_it(
    noisy_store: Any, embedder: Any, tmp_path: Path
):
    path = tmp_path / "store"
    shutil.copytree(noisy_store[0], path)
    app = create_app(path, embedder=embedder)
    with running(app) as url:
        wait_ready(url, {})
        forgotten: list[httpx.Response] = []
        first = ContinualClassifier.open(path, read_only=True)
        try:
            ids = [first.memory.store.examples([0])[0].id]
        finally:
            first.close()
        # Held as an audit holds it while it scores the store.
        with app.state.serving.private_reading() as snapshot:
            assert snapshot.clf.memory.n_examples == 240
            answer = httpx.post(
                url + "/v1/predict",
                json={"inputs": [{"id": "a", "text": "a small dog"}]},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            edit = threading.Thread(
                target=lambda: forgotten.append(
                    httpx.post(url + "/v1/forget", json={"ids": ids}, timeout=120)
                )
            )
            edit.start()
            edit.join(10.0)  # a forget of one example takes a second or two when it may run
            assert edit.is_alive() and not forgotten  # it waits for the audit
            assert snapshot.clf.memory.store.examples([0])[0].id == ids[0]  # rows unmoved
        edit.join(120)
    assert forgotten and forgotten[0].status_code == 200, forgotten
    assert forgotten[0].json()["examples_forgotten"] == 1
