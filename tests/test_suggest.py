"""What to label next: every strategy on a real store of the WordNet sample (real embedder,
FAISS and SQLite), the ranking checked against the store's own predictions, the CLI and the
service."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest

from icl_cl.classifier import ContinualClassifier
from icl_cl.cli import main
from icl_cl.errors import DataError
from icl_cl.labelling.suggest import STRATEGIES, SuggestOptions, suggestion_row

EMPTY = "noun.animal"  # defined, but none of its examples is learned


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, embedder, wordnet):
    """A store that learned 4 examples of each label but EMPTY, and the pool of the rest."""
    train, _, labels = wordnet
    seed, pool, per_label = [], [], {}
    for ex in train:
        n = per_label.get(ex.labels[0], 0)
        if n < 4 and ex.labels[0] != EMPTY:
            seed.append(ex)
            per_label[ex.labels[0]] = n + 1
        else:
            pool.append(ex)
    path = tmp_path_factory.mktemp("suggest") / "store"
    with ContinualClassifier.open(path, embedder=embedder) as clf:
        clf.learn(seed, labels)
    return path, seed, pool


@pytest.fixture(scope="module")
def clf(seeded, embedder):
    with ContinualClassifier.open(seeded[0], embedder=embedder, read_only=True) as clf:
        yield clf


def _pool(seeded):
    pool = seeded[2]
    return [ex.id for ex in pool], [ex.text for ex in pool]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_suggests_new_inputs_with_their_reasons(clf, seeded, strategy):
    ids, texts = _pool(seeded)
    found = clf.suggest(texts, 6, ids=ids, options=SuggestOptions(strategy))
    assert [s.rank for s in found] == [1, 2, 3, 4, 5, 6]
    assert len({s.id for s in found}) == 6 and {s.id for s in found} <= set(ids)
    stored = {ex.id: ex for ex in seeded[1]}
    for s in found:
        assert s.strategy == strategy and s.reason
        assert s.text == texts[ids.index(s.id)]
        assert 0 <= s.margin <= 1 and 0 <= s.entropy <= 1 and s.set_size >= 1
        assert len(s.labels) >= 2  # the candidate labels in question
        assert list(s.labels.values()) == sorted(s.labels.values(), reverse=True)
        assert all(s.counts[lab] == (0 if lab == EMPTY else 4) for lab in s.labels)
        assert len(s.nearest) == 3
        sims = [n.similarity for n in s.nearest]
        assert sims == sorted(sims, reverse=True)
        for n in s.nearest:  # real stored examples, with their stored labels
            assert stored[n.id].labels == n.labels
        row = suggestion_row(s)
        assert json.loads(json.dumps(row)) == row


def _margins(clf, texts):
    """1 - (p1 - p2) of the calibrated probabilities of the store's own predictions."""
    out = []
    for p in clf.predict(texts, k=10, use_llm=False):
        top = [*sorted(p.scores.values(), reverse=True), 0.0, 0.0]
        out.append(1 - (top[0] - top[1]))
    return np.array(out)


def test_margin_takes_the_closest_calls_of_the_stores_own_probabilities(clf, seeded):
    ids, texts = _pool(seeded)
    margins = _margins(clf, texts)
    found = clf.suggest(texts, 8, ids=ids, options=SuggestOptions("margin"))
    expected = [ids[i] for i in np.lexsort((np.arange(len(ids)), -margins))[:8]]
    assert [s.id for s in found] == expected
    assert [s.margin for s in found] == pytest.approx(sorted(margins, reverse=True)[:8], abs=1e-6)
    top = found[0]
    first, second = list(top.labels)[:2]
    assert first in top.reason and second in top.reason


@pytest.mark.parametrize(
    "strategy", ["margin", "combined", "diversity", "random", "coverage", "expected_change"]
)
def test_batches_of_the_pool_give_the_ranking_of_the_whole_pool(clf, seeded, strategy):
    ids, texts = _pool(seeded)
    whole = clf.suggest(texts, 7, ids=ids, options=SuggestOptions(strategy, batch_size=1000))
    small = clf.suggest(texts, 7, ids=ids, options=SuggestOptions(strategy, batch_size=9))
    assert [s.id for s in small] == [s.id for s in whole]
    assert [s.score for s in small] == pytest.approx([s.score for s in whole])


def test_expected_change_is_the_margin_times_the_expected_shift_of_the_class_mean(clf, seeded):
    """score = margin x sum_c p_c d_c / (n_c + 1), d_c the Mahalanobis distance of the input to
    label c's mean (the mahalanobis scorer's -d^2), over the store's own probabilities."""
    ids, texts = _pool(seeded)
    memory = clf.memory
    vectors = clf.embedder.encode(texts)
    distance = np.sqrt(-memory.score_matrix(vectors, "mahalanobis").astype(np.float64))
    counts, col = memory.stats.counts, memory.stats.col
    expected = []
    for i, p in enumerate(clf.predict(texts, k=10, use_llm=False)):
        change = sum(
            v * distance[i, col[lab]] / (counts[col[lab]] + 1) for lab, v in p.scores.items()
        )
        expected.append(_margins(clf, [texts[i]])[0] * change)
    expected = np.array(expected)
    found = clf.suggest(texts, 8, ids=ids, options=SuggestOptions("expected_change"))
    order = np.lexsort((np.arange(len(ids)), -expected))[:8]
    assert [s.id for s in found] == [ids[i] for i in order]
    assert [s.score for s in found] == pytest.approx(expected[order], rel=1e-4)
    assert "would move its label's mean" in found[0].reason


def test_diversity_and_combined_do_not_pick_near_copies(clf, seeded):
    ids, texts = _pool(seeded)
    most_uncertain = clf.suggest(texts, 1, ids=ids, options=SuggestOptions("margin"))[0]
    copies = [f"copy-{i}" for i in range(3)]
    ids, texts = ids + copies, texts + [most_uncertain.text] * 3
    twins = {most_uncertain.id, *copies}
    margin = clf.suggest(texts, 4, ids=ids, options=SuggestOptions("margin"))
    assert {s.id for s in margin} == twins  # uncertainty alone takes all four copies
    for strategy in ("combined", "diversity"):
        found = clf.suggest(texts, 4, ids=ids, options=SuggestOptions(strategy))
        assert len({s.id for s in found} & twins) <= 1, strategy


@pytest.mark.parametrize("strategy", ["coverage", "combined"])
def test_inputs_of_a_label_with_no_example_come_first(clf, seeded, strategy):
    ids, texts = _pool(seeded)
    found = clf.suggest(texts, 5, ids=ids, options=SuggestOptions(strategy))
    first = found[0]
    assert EMPTY in first.labels and first.counts[EMPTY] == 0
    assert f"{EMPTY}, which has no stored example" in first.reason
    gold = {ex.id: ex.labels[0] for ex in seeded[2]}
    # combined's MMR then spreads the batch: fewer of them, each unlike the picks before it.
    assert sum(gold[s.id] == EMPTY for s in found) >= (3 if strategy == "coverage" else 1)


def test_combined_adds_the_few_example_share_of_coverage_only_when_asked(clf, seeded):
    """By default the margin alone scores the inputs whose nearest label has examples; a
    coverage weight adds each candidate label's ``p x few / (few + n)`` (few = 5)."""
    ids, texts = _pool(seeded)
    counts = dict(zip(clf.memory.stats.labels, clf.memory.stats.counts.tolist(), strict=True))
    share = {
        i: sum(p * 5 / (5 + counts.get(lab, 0)) for lab, p in pred.scores.items())
        for i, pred in zip(ids, clf.predict(texts, k=10, use_llm=False), strict=True)
    }
    for weight in (0.0, 2.0):
        options = SuggestOptions("combined", mmr_lambda=1.0, coverage_weight=weight)
        found = clf.suggest(texts, 40, ids=ids, options=options)
        ranked = [s for s in found if "has no stored example" not in s.reason]
        assert ranked
        for s in ranked:
            assert s.score == pytest.approx(s.margin + weight * share[s.id], abs=1e-5)
        assert [s.score for s in found] == sorted((s.score for s in found), reverse=True)


def test_random_is_a_seeded_sample(clf, seeded):
    ids, texts = _pool(seeded)
    a = clf.suggest(texts, 5, ids=ids, options=SuggestOptions("random", seed=1))
    b = clf.suggest(texts, 5, ids=ids, options=SuggestOptions("random", seed=1))
    c = clf.suggest(texts, 5, ids=ids, options=SuggestOptions("random", seed=2))
    assert [s.id for s in a] == [s.id for s in b] != [s.id for s in c]


def test_stored_ids_are_skipped_and_a_budget_over_the_pool_takes_it_all(clf, seeded):
    seed = seeded[1][:3]
    ids, texts = [ex.id for ex in seed] + ["new"], [ex.text for ex in seed] + ["a red fox"]
    found = clf.suggest(texts, 10, ids=ids)
    assert [s.id for s in found] == ["new"]
    assert clf.suggest(texts[:3], 10, ids=ids[:3]) == []


def test_bad_requests_are_refused(clf, seeded):
    ids, texts = _pool(seeded)
    with pytest.raises(DataError, match="strategy"):
        clf.suggest(texts, 3, ids=ids, options=SuggestOptions("loudest"))
    with pytest.raises(DataError, match="budget"):
        clf.suggest(texts, 0, ids=ids)
    with pytest.raises(DataError, match="unique"):
        clf.suggest(texts[:2], 1, ids=["a", "a"])
    with pytest.raises(DataError, match="empty"):
        clf.suggest(["   "], 1)


def test_a_multi_label_store_suggests_its_undecided_tags(tmp_path, embedder, debtags):
    train, test, labels = debtags
    with ContinualClassifier.open(tmp_path / "store", embedder=embedder) as clf:
        clf.learn(train[:120], labels)
        texts, ids = [ex.text for ex in test], [ex.id for ex in test]
        found = clf.suggest(texts, 4, ids=ids, options=SuggestOptions("margin"))
        assert len(clf.suggest(texts, 4, ids=ids)) == 4
        changed = clf.suggest(texts, 4, ids=ids, options=SuggestOptions("expected_change"))
    assert len(changed) == 4 and all(s.score > 0 for s in changed)
    assert len(found) == 4
    assert all(0 < s.margin <= 1 and s.labels for s in found)
    # Multi-label, the margin is that of the most undecided tag: 1 - |2p - 1|.
    for s in found:
        undecided = max(1 - abs(2 * p - 1) for p in s.labels.values())
        assert s.margin == pytest.approx(undecided, abs=1e-5)  # both rounded to 6 places
    assert [s.score for s in found] == sorted((s.score for s in found), reverse=True)


def test_cli_writes_the_suggestions_and_leaves_the_store_as_it_was(seeded, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(seeded[0], store)
    before = {f.name: f.read_bytes() for f in store.iterdir() if f.is_file()}
    before.pop("store.sqlite-shm", None)  # the fixture's reader has the store open
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": ex.id, "text": ex.text}) + "\n" for ex in seeded[2]))
    out = tmp_path / "next.jsonl"
    args = ["-q", "suggest", "--store", str(store), "--pool", str(pool), "--budget", "4"]
    assert main([*args, "--strategy", "margin", "--output", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4]
    assert set(rows[0]) == {
        "id", "rank", "text", "strategy", "score", "reason", "uncertainty", "labels", "nearest"
    }  # fmt: skip
    assert rows[0]["labels"][0]["examples"] == 4 and len(rows[0]["nearest"]) == 3
    after = {f.name: f.read_bytes() for f in store.iterdir() if f.is_file()}
    # A reader's SQLite leaves an index of the write-ahead log, and the log itself empty.
    assert after.pop("store.sqlite-wal", b"") == before.pop("store.sqlite-wal", b"") == b""
    after.pop("store.sqlite-shm", None)
    assert after == before
    assert main([*args, "--output", str(out), "--budget", "0"]) != 0


def test_the_service_answers_the_lines_of_icl_cl_suggest_to_a_read_key(seeded, tmp_path, embedder):
    from icl_cl.service.app import create_app
    from icl_cl.service.auth import KeySet
    from icl_cl.service.settings import ServiceSettings
    from tests.service_helpers import running, wait_ready

    store = tmp_path / "store"
    shutil.copytree(seeded[0], store)
    keys = tmp_path / "keys.txt"
    keys.write_text("read-key-0123456789 read\n")
    auth = {"Authorization": "Bearer read-key-0123456789"}
    pool = seeded[2][:16]
    inputs = [{"id": ex.id, "text": ex.text} for ex in pool]
    with ContinualClassifier.open(store, embedder=embedder, read_only=True) as clf:
        expected = clf.suggest([ex.text for ex in pool], 3, ids=[ex.id for ex in pool])
    settings = ServiceSettings(max_items=16)
    app = create_app(store, settings=settings, keys=KeySet.load(keys), embedder=embedder)
    with running(app) as url:
        wait_ready(url, auth)
        answer = httpx.post(f"{url}/v1/suggest", json={"inputs": inputs, "budget": 3}, headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"suggestions": [suggestion_row(s) for s in expected]}
        assert answer.headers["ICL-CL-Session"] == "1"
        bad = httpx.post(
            f"{url}/v1/suggest",
            json={"inputs": inputs, "budget": 3, "strategy": "loudest"},
            headers=auth,
        )
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "strategy"]
        twice = [inputs[0], inputs[0]]
        bad = httpx.post(f"{url}/v1/suggest", json={"inputs": twice, "budget": 1}, headers=auth)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == [
            "body",
            "inputs",
            1,
            "id",
        ]
        too_many = {"inputs": [*inputs, {"id": "x", "text": "one more"}], "budget": 1}
        assert httpx.post(f"{url}/v1/suggest", json=too_many, headers=auth).status_code == 422
    with ContinualClassifier.open(store, embedder=embedder, read_only=True) as clf:
        assert len(clf.memory.sessions()) == 1


def test_the_service_refuses_to_suggest_from_an_empty_store(tmp_path, embedder):
    from icl_cl.service.app import create_app
    from tests.service_helpers import running

    with running(create_app(tmp_path / "empty", embedder=embedder)) as url:
        body = {"inputs": [{"id": "a", "text": "a hawk"}], "budget": 1}
        assert httpx.post(f"{url}/v1/suggest", json=body).status_code == 409
