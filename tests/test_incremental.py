"""Exact incrementality: N sessions one after another == their union at once, for every scorer."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl import ContinualClassifier
from icl_cl.config import SCORERS
from icl_cl.evaluation.sessions import SessionSpec, session_examples, split_sessions


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
    for name in ("ranpac", "klda"):  # the random-feature statistics too
        fa, fb = inc.memory.feature_space(name).stats, joint.memory.feature_space(name).stats
        assert fa.labels == fb.labels == a.labels
        np.testing.assert_allclose(fa.sums, fb.sums, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fa.gram, fb.gram, rtol=1e-9, atol=1e-7)
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
    """Loaded random-feature statistics are updated by a learn; a reopened store catches them up
    from the stored vectors (checkpoint or not) to the same values."""
    train, test, labels = wordnet
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.learn(train[:100], labels)
    before = clf.memory.feature_space("ranpac").stats.gram.copy()
    clf.learn(train[100:150])  # same width (256): updated in place
    live = clf.memory.feature_space("ranpac")
    assert live.rows == 150 and live.stats.n_examples == 150
    assert not np.allclose(live.stats.gram, before)
    queries = embedder.encode([ex.text for ex in test[:20]])
    expected = clf.memory.score_matrix(queries, "ranpac")
    clf.close()
    reopened = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    np.testing.assert_allclose(reopened.memory.feature_space("ranpac").stats.gram, live.stats.gram)
    np.testing.assert_allclose(reopened.memory.score_matrix(queries, "ranpac"), expected, rtol=1e-5)
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
