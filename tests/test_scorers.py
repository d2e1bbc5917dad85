"""Known-answer tests of the ECL scorers against direct computations from the raw vectors."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl.config import MemoryConfig
from icl_cl.memory.example_index import ExampleIndex
from icl_cl.memory.item_groups import ItemGroups
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.scorers import (
    InFeatureSpace,
    KnnVote,
    LabelDescription,
    Mahalanobis,
    NearestClassMean,
    Ridge,
    fill_unseen,
    top_k,
)
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
    items = ItemGroups()
    items.add([None] * 3, [np.array([st.col[lab] for lab in labs]) for labs in labels])
    q = np.array([[1, 0, 0]], dtype=np.float32)
    scores = KnnVote(st, index, items, k=2).scores(q)[0]
    # votes: a = 1.0 + 0.8, b = 0.8, c = 0 (plus a 1e-3 * cosine tie-break)
    assert scores[st.col["a"]] == pytest.approx(1.8, abs=2e-3)
    assert scores[st.col["b"]] == pytest.approx(0.8, abs=2e-3)
    assert scores[st.col["c"]] == pytest.approx(0.0, abs=2e-3)


def test_knn_copies_of_one_input_vote_once_with_the_union_of_their_labels():
    # Row 0 and row 1 are the same input learned in two sessions ("a", then "b"); row 2 another.
    x = np.array([[1, 0, 0], [1, 0, 0], [0.6, 0.8, 0], [0, 0, 1]], dtype=np.float32)
    labels = [["a"], ["b"], ["c"], ["d"]]
    st = _stats(x, labels)
    index = ExampleIndex(3, exact_max=100)
    index.add(x)
    items = ItemGroups()
    items.add(["same", "same", "other", "far"], [np.array([st.col[lab[0]]]) for lab in labels])
    assert items.max_copies == 2
    assert sorted(st.labels[c] for c in items.labels_of_row(1)) == ["a", "b"]
    scores = KnnVote(st, index, items, k=2).scores(np.array([[1, 0, 0]], np.float32))[0]
    # The two nearest *items*: the pair (1.0, labels a and b) and row 2 (0.6, label c).
    assert scores[st.col["a"]] == pytest.approx(1.0, abs=2e-3)
    assert scores[st.col["b"]] == pytest.approx(1.0, abs=2e-3)
    assert scores[st.col["c"]] == pytest.approx(0.6, abs=2e-3)
    assert scores[st.col["d"]] == pytest.approx(0.0, abs=2e-3)


@pytest.mark.parametrize("kind", ["relu", "rff"])
def test_feature_statistics_equal_statistics_of_the_features(kind):
    x, labels = _data(6, n=300)
    features = RandomFeatures(kind, x.shape[1], 64, seed=3)
    f = features.transform(x)
    direct = RunningStatistics(64)
    direct.apply(direct.delta(f, labels))
    blocked = RunningStatistics(64)
    blocked.apply(blocked.delta(x, labels, transform=features.transform))
    np.testing.assert_allclose(blocked.sums, direct.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blocked.gram, direct.gram, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(blocked.weighted_gram, direct.weighted_gram, rtol=1e-12, atol=1e-10)


def test_random_features_are_fixed_by_seed_and_shape():
    a = RandomFeatures("relu", 8, 32, seed=1)
    b = RandomFeatures("relu", 8, 32, seed=1)
    c = RandomFeatures("relu", 8, 32, seed=2)
    assert a.digest == b.digest != c.digest
    x = _data(7)[0]
    np.testing.assert_array_equal(a.transform(x), b.transform(x))
    assert np.all(a.transform(x) >= 0)  # ReLU features
    rff = RandomFeatures("rff", 8, 4000, seed=1, bandwidth=1.0).transform(x[:2].astype(np.float64))
    # Random Fourier features approximate the Gaussian kernel exp(-|x - y|^2 / 2).
    expected = np.exp(-np.sum((x[0] - x[1]) ** 2) / 2)
    assert float(rff[0] @ rff[1]) == pytest.approx(expected, abs=0.05)


def test_ranpac_is_ridge_on_the_random_relu_features():
    x, labels = _data(8, n=200)
    st_x = _stats(x, labels)
    features = RandomFeatures("relu", x.shape[1], 50, seed=0)
    st_f = RunningStatistics(50, weighted=False)
    st_f.apply(st_f.delta(x, labels, transform=features.transform))
    lam = 2.0
    f = augment(features.transform(x))
    yy = np.zeros((len(x), len(st_f.labels)))
    for i, lab in enumerate(labels):
        yy[i, st_f.col[lab[0]]] = 1
    w = np.linalg.solve(f.T @ f + lam * np.eye(f.shape[1]), f.T @ yy)
    got = InFeatureSpace("ranpac", features, Ridge(st_f, lam)).scores(x[:11])
    np.testing.assert_allclose(got, f[:11] @ w, rtol=1e-4, atol=1e-4)
    assert st_x.labels == st_f.labels


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


def test_ridge_path_equals_ridge_learned_without_each_fold():
    from icl_cl.memory.ridge_path import heldout_ridge_scores

    x, labels = _data(9, n=120)
    features = RandomFeatures("relu", x.shape[1], 40, seed=0)
    st = RunningStatistics(40, weighted=False)
    st.apply(st.delta(x, labels, transform=features.transform))
    folds = [np.arange(0, 30), np.arange(30, 45)]
    rhos = (1e-3, 0.1)
    values, vectors = np.linalg.eigh(st.gram)
    path = heldout_ridge_scores(
        (values, vectors),
        st,
        [(features.transform(x[f]), [labels[i] for i in f]) for f in folds],
        rhos,
    )
    for rho in rhos:
        for fold, got in zip(folds, path[rho], strict=True):
            held = st.without(st.delta(x[fold], [labels[i] for i in fold], features.transform))
            lam = rho * np.trace(st.gram) / len(st.gram)  # relative to the full store
            expected = Ridge(held, lam).scores(features.transform(x[fold]).astype(np.float32))
            np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


def test_description_is_cosine_to_each_label_text_and_needs_no_example():
    labels = np.array([[2.0, 0, 0], [0, 1, 1]], np.float32)
    q = np.array([[1, 0, 0], [0, 0.6, 0.8]], np.float32)
    got = LabelDescription(labels).scores(q)
    np.testing.assert_allclose(got, [[1, 0], [0, 1.4 / np.sqrt(2)]], atol=1e-6)


def test_fill_unseen_raises_minus_inf_to_the_lowest_finite_score_of_the_row():
    s = np.array([[0.5, -np.inf, -0.2], [-np.inf, -np.inf, -np.inf], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(
        fill_unseen(s), [[0.5, -0.2, -0.2], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
    )
