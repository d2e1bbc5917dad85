"""Exact incrementality: N sessions one after another == their union at once, for every scorer."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl import ContinualClassifier
from icl_cl.config import SCORERS, MemoryConfig
from icl_cl.evaluation.sessions import SessionSpec, session_examples, split_sessions
from icl_cl.heads.scorer_choice_fit import refresh_scorer_choice
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.feature_space import Strength
from icl_cl.memory.store import Store
from icl_cl.memory.verify import verify_store
from icl_cl.types import Example, Label


def _learn_both(tmp_path, embedder, train, labels, n_sessions):
    sessions = split_sessions(SessionSpec(by="random", n=n_sessions, seed=1), labels, train)
    streams = [session_examples(train, labs, t + 1) for t, labs in enumerate(sessions)]
    inc = ContinualClassifier.open(tmp_path / "inc", embedder=embedder)
    for labs, stream in zip(sessions, streams, strict=True):
        inc.learn(stream, [lab for lab in labels if lab.label in set(labs)], fit=False)
    joint = ContinualClassifier.open(tmp_path / "joint", embedder=embedder)
    joint.learn(
        [ex for s in streams for ex in s],
        [lab for labs in sessions for lab in labels if lab.label in set(labs)],
        fit=False,
    )
    return inc, joint


@pytest.mark.parametrize("dataset", ["wordnet", "debtags"])
def test_sessions_equal_union_for_every_scorer(tmp_path, embedder, dataset, request):
    train, test, labels = request.getfixturevalue(dataset)
    inc, joint = _learn_both(tmp_path, embedder, train, labels, n_sessions=4)
    a, b = inc.memory.stats, joint.memory.stats
    assert a.labels == b.labels
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_allclose(a.sums, b.sums, atol=1e-9)
    np.testing.assert_allclose(a.gram, b.gram, atol=1e-8)
    np.testing.assert_allclose(a.weighted_gram, b.weighted_gram, atol=1e-8)
    assert a.n_examples == b.n_examples
    for name in ("ranpac", "klda"):  # the random-feature state too
        sa, sb = inc.memory.feature_space(name), joint.memory.feature_space(name)
        assert sa.stats.labels == sb.stats.labels == a.labels
        np.testing.assert_allclose(sa.stats.sums, sb.stats.sums, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(sa.solver.inverse, sb.solver.inverse, rtol=1e-7, atol=1e-9)
    queries = embedder.encode([ex.text for ex in test])
    for scorer in SCORERS:
        sa = inc.memory.score_matrix(queries, scorer)
        sb = joint.memory.score_matrix(queries, scorer)
        np.testing.assert_allclose(sa, sb, rtol=1e-4, atol=1e-4, err_msg=scorer)
        pa = inc.predict_vectors(queries, k=5, scorer=scorer)
        pb = joint.predict_vectors(queries, k=5, scorer=scorer)
        assert [p.labels for p in pa] == [p.labels for p in pb], scorer
    # Reopening from disk gives the same state as the live object.
    inc.close()
    reopened = ContinualClassifier.open(tmp_path / "inc", embedder=embedder)
    np.testing.assert_array_equal(reopened.memory.stats.sums, a.sums)
    np.testing.assert_array_equal(reopened.memory.stats.gram, a.gram)
    for scorer in SCORERS:
        np.testing.assert_allclose(
            reopened.memory.score_matrix(queries, scorer),
            joint.memory.score_matrix(queries, scorer),
            rtol=1e-4,
            atol=1e-4,
        )


def test_learning_a_session_leaves_earlier_sessions_untouched(tmp_path, embedder, wordnet):
    train, _, _labels = wordnet
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    first = [ex for ex in train if ex.labels[0] in {"noun.animal", "noun.plant"}]
    second = [ex for ex in train if ex.labels[0] == "noun.food"]
    clf.learn(first, fit=False)
    before_rows = clf.memory.store.examples(list(range(len(first))))
    sums_before = clf.memory.stats.sums.copy()
    vectors_before = clf.memory.store.load_vectors().copy()
    clf.learn(second, fit=False)
    # Earlier labels' statistics, stored examples and vectors are byte-identical.
    np.testing.assert_array_equal(clf.memory.stats.sums[: len(sums_before)], sums_before)
    assert clf.memory.store.examples(list(range(len(first)))) == before_rows
    np.testing.assert_array_equal(clf.memory.store.load_vectors()[: len(first)], vectors_before)
    assert [s.n_examples for s in clf.memory.sessions()] == [len(first), len(second)]


def test_predicts_sensible_labels(tmp_path, embedder, wordnet):
    train, test, labels = wordnet
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.learn(train, labels, k=3)
    preds = clf.predict([ex.text for ex in test], k=3)
    acc = np.mean([p.labels[0] == ex.labels[0] for p, ex in zip(preds, test, strict=True)])
    assert acc > 0.6  # 8 classes: chance is 0.125
    assert all(len(p.candidates) == 3 and len(p.scores) == 3 for p in preds)
    assert all(p.candidates[0].score >= p.candidates[1].score for p in preds)


def test_multilabel_store_returns_label_sets(tmp_path, embedder, debtags):
    train, test, labels = debtags
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.learn(train, labels)
    assert clf.memory.multi_label is True
    preds = clf.predict([ex.text for ex in test[:20]], k=10)
    sizes = [len(p.labels) for p in preds]
    assert max(sizes) > 1
    assert all(set(p.labels) <= set(p.scores) for p in preds)


def test_feature_statistics_follow_learning_and_survive_reopening(tmp_path, embedder, wordnet):
    """A loaded random-feature state is updated by a learn (Woodbury, at the same strength); a
    reopened store reads it, catching up the rows it lacks from the stored vectors, to the same
    values; a prediction reads the solved weights."""
    train, test, labels = wordnet
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.learn(train[:100], labels)
    before = clf.memory.feature_space("ranpac").solver
    strength, inverse = before.strength, before.inverse.copy()
    clf.learn(train[100:150])  # same width (256): updated in place
    live = clf.memory.feature_space("ranpac")
    assert live.rows == 150 and live.stats.n_examples == 150
    assert live.solver.strength == strength  # the choice (made at 100) holds until 200
    assert not np.allclose(live.solver.inverse, inverse)
    queries = embedder.encode([ex.text for ex in test[:20]])
    expected = clf.memory.score_matrix(queries, "ranpac")
    clf.close()
    reopened = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    np.testing.assert_allclose(reopened.memory.score_matrix(queries, "ranpac"), expected, rtol=1e-5)
    assert "ranpac" not in reopened.memory.spaces._spaces  # the solved weights, not the state
    np.testing.assert_allclose(
        reopened.memory.feature_space("ranpac").solver.inverse, live.solver.inverse, atol=1e-9
    )
    # Past 256 examples the map widens (512 features); the statistics are rebuilt exactly.
    more = train[150:] + test[20:]
    reopened.learn(more)
    assert reopened.memory.feature_space("ranpac").features.size == 512
    joint = ContinualClassifier.open(tmp_path / "joint", embedder=embedder)
    joint.learn(train[:150] + more, labels)
    # Labels get columns in order of first use, which differs between the two stores.
    order = [joint.memory.stats.col[label] for label in reopened.memory.stats.labels]
    np.testing.assert_allclose(
        reopened.memory.score_matrix(queries, "ranpac"),
        joint.memory.score_matrix(queries, "ranpac")[:, order],
        rtol=1e-4,
        atol=1e-5,
    )


# ---- multi-label items learned facet by facet -----------------------------------------------

FACET_DIM, FACET_LABELS, FACET_ITEMS = 16, 8, 240
FACETS = (("t0", "t1", "t2"), ("t3", "t4"), ("t5", "t6", "t7"))


def _facet_items() -> tuple[list[Example], np.ndarray]:
    """Items with 1-3 labels each (the union of their facets' labels) and their vectors."""
    rng = np.random.default_rng(5)
    centres = np.random.default_rng(7).normal(size=(FACET_LABELS, FACET_DIM))
    items, vectors = [], []
    for i in range(FACET_ITEMS):
        labs = sorted(rng.choice(FACET_LABELS, size=rng.integers(1, 4), replace=False).tolist())
        x = centres[labs].sum(axis=0) + 0.8 * rng.normal(size=FACET_DIM)
        items.append(Example(f"i{i}", f"item number {i}", tuple(f"t{j}" for j in labs)))
        vectors.append(x / np.linalg.norm(x))
    return items, np.asarray(vectors, np.float32)


def _facet_sessions(items, vectors, skip=frozenset()):
    """Per facet, the items holding one of its labels with those labels only, plus repeats
    within the session (another id, the text in capitals: the same input)."""
    sessions = []
    for t, facet in enumerate(FACETS):
        rows, examples = [], []
        for i, ex in enumerate(items):
            labs = tuple(lab for lab in ex.labels if lab in facet)
            if labs and i not in skip:
                rows.append(i)
                examples.append(Example(f"{ex.id}-s{t}", ex.text, labs))
                if i % 7 == 0:  # a repeat, with part of the labels
                    rows.append(i)
                    examples.append(Example(f"{ex.id}-s{t}r", ex.text.upper(), labs[:1]))
        sessions.append((examples, vectors[rows]))
    return sessions


def _ecl(path, sessions):
    store = Store.create(path, dim=FACET_DIM, embedder="synthetic", config={})
    memory = ExternalContinualLearner.open(store, MemoryConfig())
    labels = [Label(f"t{j}") for j in range(FACET_LABELS)]
    label_vectors = np.eye(FACET_LABELS, FACET_DIM, dtype=np.float32)
    for t, (examples, vectors) in enumerate(sessions):
        new = labels if t == 0 else []
        memory.learn(examples, vectors, new, label_vectors[: len(new)], multi_label=True)
    return memory


def _aligned(memory, other, matrix):
    """``matrix`` of ``other``'s columns reordered to ``memory``'s label order."""
    return matrix[:, [other.stats.col[label] for label in memory.stats.labels]]


def _assert_same_statistics(a, b):
    order = [b.col[label] for label in a.labels]
    np.testing.assert_array_equal(a.counts, b.counts[order])
    np.testing.assert_allclose(a.sums, b.sums[order], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(a.gram, b.gram, rtol=1e-9, atol=1e-8)
    if a.weighted_gram is not None or b.weighted_gram is not None:
        np.testing.assert_allclose(a.weighted_gram, b.weighted_gram, rtol=1e-9, atol=1e-8)
    assert a.n_examples == b.n_examples


def _assert_same_space(a, b):
    _assert_same_statistics(a.stats, b.stats)
    assert a.solver.strength == pytest.approx(b.solver.strength, rel=1e-9)
    np.testing.assert_allclose(a.solver.inverse, b.solver.inverse, rtol=1e-7, atol=1e-9)


def test_facet_sessions_equal_the_union_of_their_labels(tmp_path):
    """A multi-label store learned facet by facet (items copied into several sessions and
    repeated within one) has the statistics, scores and auto choice of the store that learned
    each item once with all of its labels."""
    items, vectors = _facet_items()
    facets = _ecl(tmp_path / "facets", _facet_sessions(items, vectors))
    union = _ecl(tmp_path / "union", [(items, vectors)])
    assert facets.n_examples > union.n_examples == FACET_ITEMS == facets.n_items
    _assert_same_statistics(facets.stats, union.stats)
    for name in ("ranpac", "klda"):
        assert facets.feature_space(name).features == union.feature_space(name).features
        _assert_same_space(facets.feature_space(name), union.feature_space(name))
    queries = _facet_items()[1][:40] + 0.05
    for scorer in ("ranpac", "klda", "mahalanobis", "knn", "ridge", "ncm"):
        np.testing.assert_allclose(
            facets.score_matrix(queries, scorer),
            _aligned(facets, union, union.score_matrix(queries, scorer)),
            rtol=1e-4,
            atol=1e-4,
            err_msg=scorer,
        )
    a = refresh_scorer_choice(facets, "auto", n=100, seed=0)
    b = refresh_scorer_choice(union, "auto", n=100, seed=0)
    assert a is not None and b is not None
    assert (a.scorer, a.weights, a.ranpac_rho, a.heldout_items) == (
        b.scorer,
        b.weights,
        b.ranpac_rho,
        b.heldout_items,
    )
    assert a.heldout_accuracy == pytest.approx(b.heldout_accuracy)
    # Reopened (statistics read from the store, feature spaces from their checkpoints or the
    # stored vectors), the store is the same, and it verifies.
    facets.store.close()
    again = ExternalContinualLearner.open(Store.open(tmp_path / "facets"), MemoryConfig())
    _assert_same_statistics(again.stats, union.stats)
    _assert_same_space(again.feature_space("klda"), union.feature_space("klda"))
    assert verify_store(tmp_path / "facets").ok


def test_a_heldout_item_is_scored_as_if_never_learned(tmp_path):
    """Holding out items (all their copies, over every session) subtracts each once, with all
    of its labels: the scores are those of the store whose sessions never held them."""
    items, vectors = _facet_items()
    facets = _ecl(tmp_path / "facets", _facet_sessions(items, vectors))
    held = [3, 14, 50, 77, 120, 201]  # 14 and 77 are repeated within their sessions
    rows = [
        r
        for r, key in enumerate(facets.store.input_keys())
        if key.lower() in {items[i].text for i in held}
    ]
    without = _ecl(tmp_path / "without", _facet_sessions(items, vectors, skip=frozenset(held)))
    queries = vectors[held]
    keys = [key.lower() for key in facets.store.input_keys()]
    for scorer in ("ranpac", "klda", "mahalanobis", "knn", "ridge", "ncm"):
        if scorer in ("ranpac", "klda"):  # the held-out store keeps its feature map ...
            assert without.feature_space(scorer).features == facets.feature_space(scorer).features
            # ... and held-out scores keep the store's strength (fixed between choices).
            full = facets.feature_space(scorer)
            strength = Strength(full.solver.strength, full.scale)
            without.feature_space(scorer).restrengthen(strength)
        firsts = sorted({min(r for r in rows if keys[r] == keys[q]) for q in rows})
        np.testing.assert_allclose(  # one copy of each names the whole item
            facets.heldout_scorer(firsts, scorer).scores(queries),
            facets.heldout_scorer(rows, scorer).scores(queries),
            rtol=1e-6,
        )
        np.testing.assert_allclose(
            facets.heldout_scorer(rows, scorer).scores(queries),
            _aligned(facets, without, without.score_matrix(queries, scorer)),
            rtol=1e-4,
            atol=1e-4,
            err_msg=scorer,
        )
