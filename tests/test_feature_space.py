"""The random feature spaces' learner state: the inverse Gram updated by each session equals
the one factorised from all rows, held-out heads equal heads learned without the items, and a
prediction reads only the solved weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from icl_cl import ContinualClassifier
from icl_cl.config import SCORERS, MemoryConfig
from icl_cl.memory.feature_space import FeatureSpace, Strength
from icl_cl.memory.inverse_gram import InverseGram, low_rank_update
from icl_cl.memory.item_groups import Additions, ItemGroups
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.scorers import FEATURE_SCORERS, class_prototypes
from icl_cl.memory.verify import verify_store


def _rows(seed: int, n: int, d: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def test_rows_added_by_woodbury_equal_a_new_factorisation():
    x = _rows(0, 300)
    grown = InverseGram.of_gram(x[:100].T @ x[:100], 0.5)
    grown.add_rows(x[100:250])  # one block of rows
    grown.add_rows(x[250:])
    direct = InverseGram.of_gram(x.T @ x, 0.5)
    np.testing.assert_allclose(grown.inverse, direct.inverse, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(grown.inverse, grown.inverse.T)


def test_rows_left_out_and_low_rank_terms_are_exact():
    x = _rows(1, 200)
    k = InverseGram.of_gram(x.T @ x, 0.3)
    z = _rows(2, 12, 5)
    held = x[:40]
    expected = np.linalg.solve(x[40:].T @ x[40:] + 0.3 * np.eye(12), z)
    np.testing.assert_allclose(k.without_rows(held)(z), expected, rtol=1e-8, atol=1e-10)
    u = _rows(3, 12, 3)
    plus = low_rank_update(k.apply, u, sign=1.0)(z)
    expected = np.linalg.solve(x.T @ x + 0.3 * np.eye(12) + u @ u.T, z)
    np.testing.assert_allclose(plus, expected, rtol=1e-8, atol=1e-10)


def test_mapped_blocks_give_the_quadratic_forms_of_the_inverse():
    x = _rows(8, 1300, 1100)  # wider than a panel of the factor: several panels
    k = InverseGram.of_gram(x.T @ x, 0.4)
    u, v = _rows(9, 1100, 7), _rows(10, 1100, 3)
    np.testing.assert_allclose(k.mapped(u).T @ k.mapped(v), u.T @ k.inverse @ v, rtol=1e-9)
    before = u.copy()
    k.mapped(np.asfortranarray(u))
    np.testing.assert_array_equal(u, before)  # the block is not overwritten
    k.add_rows(_rows(11, 20, 1100))  # the factor follows K
    np.testing.assert_allclose(k.mapped(u).T @ k.mapped(v), u.T @ k.inverse @ v, rtol=1e-9)


def test_the_gram_and_its_eigenvalues_are_recovered_from_the_inverse():
    x = _rows(4, 80)
    k = InverseGram.of_gram(x.T @ x, 0.2)
    np.testing.assert_allclose(k.gram(), x.T @ x, rtol=1e-8, atol=1e-8)
    values, vectors = k.eigen()
    np.testing.assert_allclose((vectors * values) @ vectors.T, x.T @ x, rtol=1e-8, atol=1e-8)
    again = InverseGram.of_eigen(values, vectors, 0.2)
    np.testing.assert_allclose(again.inverse, k.inverse, rtol=1e-8, atol=1e-10)


def _data(seed: int, n: int, multi: bool) -> tuple[np.ndarray, list[list[str]]]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(5, 16))
    y = rng.integers(0, 5, n)
    x = centres[y] + 0.6 * rng.normal(size=(n, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = [[f"c{c}"] for c in y]
    if multi:
        labels = [labs + ([f"c{(c + 1) % 5}"] if i % 3 == 0 else []) for i, (labs, c) in
                  enumerate(zip(labels, y, strict=True))]  # fmt: skip
    return x.astype(np.float32), labels


def _build(kind, features, x, labels, multi, strength):
    names = sorted({lab for labs in labels for lab in labs})
    return FeatureSpace.build(
        kind, features, labels=names, vectors=x, row_labels=labels,
        inputs=[f"t{i}" for i in range(len(x))] if multi else [None] * len(x),
        items=multi, strength=strength,
    )  # fmt: skip


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kind", ["ridge", "lda"])
def test_sessions_equal_their_union_at_a_fixed_strength(kind, multi):
    x, labels = _data(5, 300, multi)
    features = RandomFeatures("relu" if kind == "ridge" else "rff", 16, 64, seed=1)
    fixed = lambda space, gram: Strength(0.7, 1.3 if kind == "lda" else 1.0)  # noqa: E731
    union = _build(kind, features, x, labels, multi, fixed)
    first = _build(kind, features, x[:120], labels[:120], multi, fixed)
    groups = ItemGroups()
    inputs = [f"t{i}" for i in range(len(x))] if multi else [None] * len(x)
    groups.add(inputs[:120], [[first.stats.col[lab] for lab in labs] for labs in labels[:120]])
    added = groups.additions(inputs[120:], labels[120:], first.stats.col, x[120:], lambda r: x[r])
    first.apply(first.delta(added), 180)
    assert first.stats.labels == union.stats.labels
    np.testing.assert_allclose(first.solver.inverse, union.solver.inverse, rtol=1e-7, atol=1e-9)
    q = x[:20]
    np.testing.assert_allclose(
        first.head(None).scores(features.transform(q)),
        union.head(None).scores(features.transform(q)),
        rtol=1e-4,
        atol=1e-4,
    )


def _fixed(kind):
    def strength(space, gram):
        return space.ridge_strength(float(np.trace(gram)), 1e-2) if kind == "ridge" else (
            space.lda_strength(gram, 0.3))  # fmt: skip

    return strength


@pytest.mark.parametrize("kind", ["ridge", "lda"])
def test_a_heldout_head_equals_the_head_learned_without_the_items(kind):
    x, labels = _data(6, 240, multi=False)
    features = RandomFeatures("relu" if kind == "ridge" else "rff", 16, 64, seed=2)
    full = _build(kind, features, x, labels, False, _fixed(kind))
    held = full.heldout_head(x[:30], labels[:30], lambda stats: None)
    # The same strength and scale, without the first 30 rows.
    without = _build(kind, features, x[30:], labels[30:], False, lambda s, g: _strength_of(full))
    order = [without.stats.col[label] for label in full.stats.labels]
    q = features.transform(x[:30])
    np.testing.assert_allclose(
        held.scores(q), without.head(None).scores(q)[:, order], rtol=1e-3, atol=1e-3
    )


def _with_few_shot_labels(labels, multi):
    """Labels with few-shot ones klda calibrates (``rare``: 8 examples, ``solo``: 1), one whose
    only example is held out (``gone``) and, multi-label, an item with no label."""
    out = [list(labs) for labs in labels]
    for i in range(40, 200, 20):
        out[i] = ["rare", *out[i][1:]] if multi else ["rare"]
    out[5], out[50] = ["solo"], ["gone"]
    if multi:
        out[35] = []  # an item with no label (held out): it adds no Gram row
    return out


@pytest.mark.parametrize("multi", [False, True])
@pytest.mark.parametrize("kind", ["ridge", "lda"])
def test_heldout_scores_equal_those_of_a_space_that_never_learned_the_items(kind, multi):
    """The fold-wise identities score each held-out item as the space learned without them all
    does (with its few-shot prototypes calibrated on what is left), and as the held-out head."""
    x, labels = _data(12, 300, multi)
    labels = _with_few_shot_labels(labels, multi)
    features = RandomFeatures("relu" if kind == "ridge" else "rff", 16, 64, seed=3)
    full = _build(kind, features, x, labels, multi, _fixed(kind))
    config = MemoryConfig()
    protos = (lambda stats: class_prototypes(stats, config)) if kind == "lda" else (lambda s: None)
    held = slice(30, 90)  # takes 3 of the 8 "rare" examples: it stays few-shot
    scores = full.heldout_scores(x[held], labels[held], protos)
    kept = np.r_[0:30, 90:300]
    without = _build(
        kind, features, x[kept], [labels[i] for i in kept], multi, lambda s, g: _strength_of(full)
    )
    q = features.transform(x[held])
    solved = without.head(protos(without.stats)).scores(q)
    expected = np.full_like(scores, -np.inf)  # a label with no example left scores -inf
    for j, label in enumerate(full.stats.labels):
        if label in without.stats.col:
            expected[:, j] = solved[:, without.stats.col[label]]
    assert np.isneginf(scores[:, full.stats.col["gone"]]).all()
    finite = np.isfinite(expected)
    assert (np.isfinite(scores) == finite).all()
    scores, expected = np.where(finite, scores, 0.0), np.where(finite, expected, 0.0)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    head = full.heldout_head(x[held], labels[held], protos).scores(q)
    head = np.where(finite, head, 0.0)
    np.testing.assert_allclose(scores, head, rtol=1e-5, atol=1e-6 * np.abs(head).max())


@pytest.mark.parametrize("kind", ["ridge", "lda"])
def test_a_heldout_scorer_scores_its_items_and_any_other_query(kind):
    x, labels = _data(13, 200, multi=False)
    features = RandomFeatures("relu" if kind == "ridge" else "rff", 16, 64, seed=4)
    full = _build(kind, features, x, labels, False, _fixed(kind))
    none = lambda stats: None  # noqa: E731
    scorer = full.heldout_scorer(kind, x[:25], labels[:25], none)
    head = full.heldout_head(x[:25], labels[:25], none)
    mixed = x[[7, 3, 3, 120, 0]]  # items in any order, and a query that is none of them
    for queries in (x[[7, 3, 3, 0]], mixed, x[:0]):
        expected = head.scores(features.transform(queries))
        got = scorer.scores(queries)
        assert got.shape == expected.shape
        np.testing.assert_allclose(
            got, expected, rtol=1e-5, atol=1e-6 * max(np.abs(got).max(initial=1), 1)
        )
    empty = full.heldout_scorer(kind, x[:0], [], none)  # nothing held out: the space's own head
    np.testing.assert_allclose(
        empty.scores(x[:5]), full.head(None).scores(features.transform(x[:5])), rtol=1e-6
    )
    later = full.heldout_scorer(kind, x[:25], labels[:25], none)
    full.apply(full.delta(Additions(x[:1], [labels[0]], np.ones(1, bool), True)), 1)
    with pytest.raises(RuntimeError, match="changed"):  # a solve on a changed state is refused
        later.scores(x[150:152])


def _strength_of(space):
    return Strength(space.solver.strength, space.scale)


def test_additions_of_a_copy_add_only_labels_in_a_multi_label_space():
    x, labels = _data(7, 60, multi=True)
    features = RandomFeatures("rff", 16, 32, seed=0)
    space = _build("lda", features, x, labels, True, _fixed("lda"))
    before = space.solver.inverse.copy()
    copy = Additions(x[:1], [["c9"]], np.array([False]), trivial=False)
    space.stats.add_label("c9")
    space.apply(space.delta(copy), 1)
    # A copy adding one label enters the label-weighted Gram once, weighted by that one label.
    phi = features.transform(x[:1])
    expected = np.linalg.inv(np.linalg.inv(before) + phi.T @ phi)
    np.testing.assert_allclose(space.solver.inverse, expected, rtol=1e-6, atol=1e-8)
    assert space.stats.counts[space.stats.col["c9"]] == 1


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.is_file()}


def test_predict_reads_solved_weights_and_never_writes(tmp_path, embedder, wordnet):
    """After learn + fit a prediction reads the solved weights only; with weights that no longer
    describe the store (a session learned without a fit) or damaged ones, it solves in memory
    from the state, to the same scores, and writes nothing with any scorer."""
    train, test, labels = wordnet
    store = tmp_path / "s"
    queries = embedder.encode([ex.text for ex in test[:8]])
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.learn(train[:200], labels)
        for name in FEATURE_SCORERS:  # a space is kept once a fit asks for it
            clf.fit(scorer=name)
        expected = {name: clf.memory.score_matrix(queries, name) for name in FEATURE_SCORERS}
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        for name in FEATURE_SCORERS:
            np.testing.assert_allclose(clf.memory.score_matrix(queries, name), expected[name])
        assert not clf.memory.spaces._spaces  # no learner state was loaded
    for solved in store.glob("features-*.solved.npy"):  # damage one byte of each
        data = bytearray(solved.read_bytes())
        data[-5] ^= 0x40
        solved.write_bytes(bytes(data))
    found = verify_store(store).problems
    assert len(found) == 2 and all("derived: solved again on use" in p for p in found)
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        for name in FEATURE_SCORERS:
            np.testing.assert_allclose(
                clf.memory.score_matrix(queries, name), expected[name], rtol=1e-5, atol=1e-5
            )
        clf.learn(train[200:], fit=False)
    # The learn kept the saved spaces current (a predict after it reads solved weights only).
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        for name in FEATURE_SCORERS:
            clf.memory.score_matrix(queries, name)
        assert not clf.memory.spaces._spaces
    for solved in store.glob("features-*.solved.*"):  # missing weights: solved in memory
        solved.unlink()
    before = _files(store)
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        for scorer in [*SCORERS, "auto"]:
            clf.predict([ex.text for ex in test[:4]], k=3, scorer=scorer)
    assert _files(store) == before
    # The next writing step repairs them.
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.fit(scorer="ranpac")
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.memory.score_matrix(queries, "ranpac")
        assert not clf.memory.spaces._spaces
    assert verify_store(store).ok
