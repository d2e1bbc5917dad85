"""Known-answer tests of the ECL scorers against direct computations from the raw vectors."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl.config import MemoryConfig
from icl_cl.memory.example_index import ExampleIndex
from icl_cl.memory.scorers import KnnVote, Mahalanobis, NearestClassMean, Ridge, top_k
from icl_cl.memory.statistics import RunningStatistics, augment


def _data(seed: int = 0, n: int = 60, d: int = 8, c: int = 4):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(c, d))
    y = rng.integers(0, c, size=n)
    x = centers[y] + 0.5 * rng.normal(size=(n, d))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), [[f"c{v}"] for v in y]


def _stats(x, labels) -> RunningStatistics:
    st = RunningStatistics(x.shape[1])
    st.apply(st.delta(x, labels))
    return st


def test_ncm_is_cosine_to_class_mean():
    x, labels = _data()
    st = _stats(x, labels)
    q = x[:5]
    got = NearestClassMean(st).scores(q)
    for j, name in enumerate(st.labels):
        mean = x[[i for i, lab in enumerate(labels) if lab[0] == name]].mean(0)
        expected = q @ mean / np.linalg.norm(mean)
        np.testing.assert_allclose(got[:, j], expected, rtol=1e-5, atol=1e-6)


def test_mahalanobis_matches_direct_distance():
    x, labels = _data(1)
    st = _stats(x, labels)
    a = 0.2
    names = st.labels
    y = np.array([names.index(lab[0]) for lab in labels])
    means = np.stack([x[y == j].mean(0) for j in range(len(names))]).astype(np.float64)
    resid = x.astype(np.float64) - means[y]
    cov = resid.T @ resid / (len(x) - len(names))
    d = cov.shape[0]
    cov = (1 - a) * cov + a * np.trace(cov) / d * np.eye(d)
    prec = np.linalg.inv(cov)
    q = x[:7].astype(np.float64)
    expected = -np.array([[(qi - m) @ prec @ (qi - m) for m in means] for qi in q])
    np.testing.assert_allclose(Mahalanobis(st, a).scores(x[:7]), expected, rtol=1e-3, atol=1e-3)


def test_ridge_equals_closed_form_and_acil_recursion():
    x, labels = _data(2)
    st = _stats(x, labels)
    lam = 0.7
    names = st.labels
    xa = augment(x)
    yy = np.zeros((len(x), len(names)))
    for i, lab in enumerate(labels):
        yy[i, names.index(lab[0])] = 1
    w_closed = np.linalg.solve(xa.T @ xa + lam * np.eye(xa.shape[1]), xa.T @ yy)
    # ACIL's recursive least squares over three chunks gives the same weights.
    r = np.eye(xa.shape[1]) / lam
    w = np.zeros_like(w_closed)
    for chunk in np.array_split(np.arange(len(x)), 3):
        xc, yc = xa[chunk], yy[chunk]
        r = r - r @ xc.T @ np.linalg.inv(np.eye(len(chunk)) + xc @ r @ xc.T) @ xc @ r
        w = w + r @ xc.T @ (yc - xc @ w)
    np.testing.assert_allclose(w, w_closed, atol=1e-8)
    got = Ridge(st, lam).scores(x[:9])
    np.testing.assert_allclose(got, (xa[:9] @ w_closed), rtol=1e-4, atol=1e-5)


def test_knn_vote_by_hand():
    # Three stored unit vectors; the query is closest to rows 0 and 1 (both label "a").
    x = np.array([[1, 0, 0], [0.8, 0.6, 0], [0, 0, 1]], dtype=np.float32)
    labels = [["a"], ["a", "b"], ["c"]]
    st = _stats(x, labels)
    index = ExampleIndex(3, exact_max=100)
    index.add(x)
    rows = [np.array([st.col[lab] for lab in labs]) for labs in labels]
    q = np.array([[1, 0, 0]], dtype=np.float32)
    scores = KnnVote(st, index, rows, k=2).scores(q)[0]
    # votes: a = 1.0 + 0.8, b = 0.8, c = 0 (plus a 1e-3 * cosine tie-break)
    assert scores[st.col["a"]] == pytest.approx(1.8, abs=2e-3)
    assert scores[st.col["b"]] == pytest.approx(0.8, abs=2e-3)
    assert scores[st.col["c"]] == pytest.approx(0.0, abs=2e-3)


def test_labels_without_examples_are_never_candidates():
    x, labels = _data(3)
    st = _stats(x, labels)
    st.add_label("empty")
    for scorer in (NearestClassMean(st), Ridge(st, 1.0), Mahalanobis(st, 0.2)):
        scores = scorer.scores(x[:3])
        assert np.all(np.isneginf(scores[:, st.col["empty"]]))


def test_top_k_orders_best_first():
    s = np.array([[0.1, 0.9, 0.5, -1.0]])
    idx, vals = top_k(s, 3)
    assert idx.tolist() == [[1, 2, 0]]
    np.testing.assert_allclose(vals, [[0.9, 0.5, 0.1]])


def test_auto_scorer_resolves_by_store_kind():
    from icl_cl.config import AUTO_SCORER, SCORERS

    assert MemoryConfig().scorer == "auto"
    assert set(AUTO_SCORER.values()) <= set(SCORERS)


def test_oas_shrinkage_matches_scikit_learn():
    from sklearn.covariance import oas

    from icl_cl.memory.scorers import oas_shrinkage

    rng = np.random.default_rng(4)
    for n in (5, 50, 500):
        x = rng.normal(size=(n, 12)) @ rng.normal(size=(12, 12))
        _, expected = oas(x, assume_centered=True)
        assert oas_shrinkage(x.T @ x / n, n) == pytest.approx(expected, rel=1e-9)


def test_auto_shrinkage_is_large_with_few_examples_and_small_with_many():
    few = _stats(*_data(5, n=12, d=16))
    many = _stats(*_data(5, n=4000, d=16))
    assert Mahalanobis(few, "auto").shrinkage > Mahalanobis(many, "auto").shrinkage
