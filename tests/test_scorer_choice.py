"""What ``auto`` stands for: chosen on held-out stored items scored exactly as if never learned,
stored, applied by the memory layer (a combination weighs its scorers), and refitted only when
the store has grown."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl.config import MemoryConfig
from icl_cl.heads.feature_width_fit import narrowest_earned, space_at, width_ladder
from icl_cl.heads.heldout import draw_sample
from icl_cl.heads.scorer_choice_fit import (
    FUSION_COLUMNS,
    OTHERS_COLUMNS,
    POOL,
    _folds,
    _fusion_columns,
    _heldout_matrix,
    fit_scorer_choice,
    refresh_scorer_choice,
)
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.feature_space import Strength
from icl_cl.memory.scorer_choice import ScorerChoice
from icl_cl.memory.scorers import InFeatureSpace
from icl_cl.memory.store import Store
from icl_cl.types import Example, Label

DIM, LABELS = 16, 6


def _data(n: int, seed: int = 0) -> tuple[list[Example], np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(size=(LABELS, DIM))
    y = rng.integers(0, LABELS, size=n)
    x = centres[y] + 0.9 * rng.normal(size=(n, DIM))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    examples = [Example(f"s{seed}-{i}", f"text {seed} {i}", (f"c{v}",)) for i, v in enumerate(y)]
    return examples, x.astype(np.float32)


def _memory(path, examples, vectors, config: MemoryConfig | None = None):
    store = Store.create(path, dim=DIM, embedder="synthetic", config={})
    memory = ExternalContinualLearner.open(store, config or MemoryConfig())
    labels = [Label(f"c{j}") for j in range(LABELS)]
    label_vectors = np.eye(LABELS, DIM, dtype=np.float32)
    memory.learn(examples, vectors, labels, label_vectors, multi_label=False)
    return memory


@pytest.mark.parametrize("name", ["mahalanobis", "klda", "knn"])
def test_heldout_scores_equal_a_store_that_never_learned_the_fold(tmp_path, name):
    examples, vectors = _data(300)
    memory = _memory(tmp_path / "all", examples, vectors)
    sample = draw_sample(memory, 60, seed=3)
    held = _heldout_matrix(memory, sample, name)
    fold = _folds(memory, sample)[0]
    rows = {r for i in fold for r in sample.rows[i]}
    keep = [i for i in range(len(examples)) if i not in rows]
    without = _memory(tmp_path / "without", [examples[i] for i in keep], vectors[keep])
    assert (
        without.feature_space("klda").features == memory.feature_space("klda").features
    )  # the same feature map
    if name == "klda":
        # Held-out scores keep the store's strength (fixed between choices): the store that
        # never learned the fold is given the same one.
        full = memory.feature_space("klda")
        strength = Strength(full.solver.strength, full.scale)
        without.feature_space("klda").restrengthen(strength)
    direct = without.score_matrix(sample.vectors[fold.start : fold.stop], name)
    np.testing.assert_allclose(held[fold.start : fold.stop], direct, rtol=1e-4, atol=1e-4)


def test_choice_is_the_best_heldout_scorer_and_is_stored(tmp_path):
    examples, vectors = _data(300)
    memory = _memory(tmp_path / "s", examples, vectors)
    choice = refresh_scorer_choice(memory, "auto", n=200, seed=0)
    assert choice is not None and choice.heldout_items == 200
    singles = {k: v for k, v in choice.heldout_accuracy.items() if k != "fused"}
    best = next(iter(choice.weights))  # the base comes first
    assert singles[best] == max(singles.values())
    assert choice.ranpac_rho in {float(r) for r in choice.rho_accuracy}
    assert memory.resolve_scorer("auto") == choice.scorer
    assert best in choice.reason() and "200 held-out" in choice.reason()
    # Stored: a reopened memory resolves auto the same way, and solves ranpac at that rho.
    ranpac = memory.feature_space("ranpac")
    values, _ = ranpac.eigen()
    assert ranpac.solver.strength == pytest.approx(choice.ranpac_rho * values.mean(), rel=1e-6)
    memory.store.close()
    again = ExternalContinualLearner.open(Store.open(tmp_path / "s"), MemoryConfig())
    assert again.choice == choice
    assert again.resolve_scorer("auto") == choice.scorer
    assert again.feature_space("ranpac").solver.strength == pytest.approx(ranpac.solver.strength)
    # Kept until the store has doubled: a session of 60 keeps it (and ranpac's strength) ...
    assert refresh_scorer_choice(again, "auto", n=200, seed=0) is again.choice
    more, more_vectors = _data(60, seed=1)
    again.learn(more, more_vectors, [], np.zeros((0, DIM), np.float32), multi_label=False)
    assert refresh_scorer_choice(again, "auto", n=200, seed=0) is again.choice
    assert (
        not again.choice.due(360) and again.choice.summary(360)["chosen_again_at_examples"] == 600
    )
    # ... a full fit makes it again on the store as it is, and so does doubling.
    refitted = refresh_scorer_choice(again, "auto", n=200, seed=0, full=True)
    assert refitted is not None and refitted.n_examples == 360
    most, most_vectors = _data(400, seed=2)
    again.learn(most, most_vectors, [], np.zeros((0, DIM), np.float32), multi_label=False)
    assert refresh_scorer_choice(again, "auto", n=200, seed=0).n_examples == 760


def test_explicit_scorers_other_than_ranpac_never_fit_a_choice(tmp_path):
    examples, vectors = _data(120)
    memory = _memory(tmp_path / "s", examples, vectors)
    assert refresh_scorer_choice(memory, "knn", n=100, seed=0) is None
    assert memory.store.fitted("ecl:scorer_choice") is None


def test_a_combination_weighs_its_scorers(tmp_path):
    examples, vectors = _data(200)
    memory = _memory(tmp_path / "s", examples, vectors)
    choice = ScorerChoice(
        {"klda": 0.5, "knn": 2.0, "ncm": 0.0}, None, 50, {"klda": 0.8, "fused": 0.85}, 200
    )
    memory.set_choice(choice, save=False)
    assert memory.resolve_scorer("auto") == "klda+knn"
    queries = vectors[:7]
    expected = 0.5 * memory.score_matrix(queries, "klda").astype(np.float64)
    expected += 2.0 * memory.score_matrix(queries, "knn")
    np.testing.assert_allclose(memory.score_matrix(queries, "auto"), expected, rtol=1e-5)
    assert memory.store.fitted("ecl:scorer_choice") is None  # save=False wrote nothing


def test_too_few_items_keep_the_default(tmp_path):
    examples, vectors = _data(30)
    memory = _memory(tmp_path / "s", examples, vectors)
    assert refresh_scorer_choice(memory, "auto", n=100, seed=0) is None
    assert memory.resolve_scorer("auto") == "klda"


def test_a_fitted_choice_on_a_small_store_is_a_scorer_of_the_pool(tmp_path):
    examples, vectors = _data(80)
    memory = _memory(tmp_path / "s", examples, vectors)
    choice = fit_scorer_choice(memory, 80, seed=0)
    assert set(choice.scorer.split("+")) <= set(POOL)


def test_a_stored_combination_keeps_its_name():
    """The name of a combination (the best scorer first) keys its fitted heads: it survives
    the store's JSON, which sorts keys."""
    import json

    choice = ScorerChoice({"ranpac": 1.0, "mahalanobis": 0.4}, 0.01, 100, {"fused": 0.9}, 500)
    again = ScorerChoice.from_dict(json.loads(json.dumps(choice.to_dict(), sort_keys=True)))
    assert again.scorer == choice.scorer == "ranpac+mahalanobis"
    assert again == choice


def test_fusion_columns_hold_the_base_top_and_each_other_scorers_own_top():
    rng = np.random.default_rng(0)
    base, other = rng.normal(size=(3, 100)), rng.normal(size=(3, 100))
    other[:, 99] = 50.0  # a label only the other scorer ranks high
    columns = _fusion_columns([base, other])
    assert columns.shape == (3, FUSION_COLUMNS + OTHERS_COLUMNS)
    for i in range(3):
        assert len(set(columns[i])) == columns.shape[1]
        assert set(np.argsort(-base[i])[:FUSION_COLUMNS]) <= set(columns[i])
        assert set(np.argsort(-other[i])[:OTHERS_COLUMNS]) <= set(columns[i])
        assert 99 in columns[i]


def test_a_label_known_only_by_its_description_is_reached_through_auto(tmp_path):
    """A long tail: 12 labels with many examples, 60 with one, and 2 declared with a text and no
    example. Held-out items of the one-example labels have lost their label's only example to
    the fold, as a new label's inputs have: on them the scorers of label texts and the standing
    of labels with no example earn their place, and auto then ranks a label known only by its text
    among the top 3 for inputs like its own."""
    rng = np.random.default_rng(5)
    n_labels = 74
    centres = rng.normal(size=(n_labels, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.concatenate([rng.integers(0, 12, size=360), np.arange(12, 72)])
    x = centres[y] + 0.3 * rng.normal(size=(len(y), DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    examples = [Example(f"i{i}", f"text {i}", (f"c{v}",)) for i, v in enumerate(y)]
    store = Store.create(tmp_path / "s", dim=DIM, embedder="synthetic", config={})
    memory = ExternalContinualLearner.open(store, MemoryConfig())
    labels = [Label(f"c{j}", description=f"class {j}") for j in range(n_labels)]
    texts = centres + 0.2 * rng.normal(size=centres.shape)  # a label's text: near its inputs
    memory.learn(examples, x, labels, texts.astype(np.float32), multi_label=False)
    assert memory.score_matrix(x[:1], "knn")[0, memory.stats.col["c72"]] == -np.inf
    choice = fit_scorer_choice(memory, 200, seed=0)
    memory.set_choice(choice, save=False)
    # A scorer that reads label texts (ncm's description prior, or description) joined, and a
    # label with no example is not counted as the least likely by the others.
    assert {"ncm", "description"} & set(choice.scorer.split("+"))
    assert choice.novelty is not None and choice.novelty > 0
    queries = centres[72] + 0.3 * rng.normal(size=(20, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    reached = ["c72" in dict(ranked) for ranked in memory.candidates(queries, 3, "auto")]
    assert np.mean(reached) >= 0.7  # 0.85 measured; never under a scorer of examples alone
    assert not any("c72" in dict(ranked) for ranked in memory.candidates(queries, 3, "knn"))


def test_the_width_ladder_halves_the_widest_map_twice_down_to_the_narrowest():
    assert width_ladder(4096) == [4096, 2048, 1024]
    assert width_ladder(512) == [512, 256]
    assert width_ladder(256) == [256]


def test_a_wider_map_keeps_its_width_only_where_it_scores_better_beyond_noise():
    rng = np.random.default_rng(0)
    same = rng.integers(0, 2, 400).astype(float)
    # No better on the held-out items: the narrowest map is kept.
    assert narrowest_earned({1024: same, 512: same.copy(), 256: same.copy()}) == 256
    # Ten points better than both narrower ones: the widest is kept.
    better = same.copy()
    better[np.flatnonzero(same == 0)[:40]] = 1.0
    assert narrowest_earned({1024: better, 512: same, 256: same}) == 1024
    # Better than the narrowest only: the middle one.
    assert narrowest_earned({1024: better, 512: better.copy(), 256: same}) == 512
    # A gain within noise (two items of 400 more right, and one wrong): not earned.
    noisy = same.copy()
    noisy[np.flatnonzero(same == 0)[:2]] = 1.0
    noisy[np.flatnonzero(same == 1)[:1]] = 0.0
    assert narrowest_earned({1024: noisy, 512: same}) == 512


def test_the_choice_keeps_the_narrowest_map_that_loses_nothing_and_the_store_learns_in_it(
    tmp_path,
):
    examples, vectors = _data(300)
    memory = _memory(tmp_path / "s", examples, vectors)
    widest = memory.feature_space("ranpac").features.size
    choice = refresh_scorer_choice(memory, "ranpac", n=200, seed=0)
    assert choice is not None and set(choice.width_accuracy["ranpac"]) == {
        str(w) for w in width_ladder(widest)
    }
    # Six well-separated clusters: a narrower map scores as well on the held-out items.
    chosen = choice.widths["ranpac"]
    assert chosen < widest
    assert memory.feature_space("ranpac").features.size == chosen
    memory.save_derived()
    files = sorted(p.name for p in (tmp_path / "s").glob("features-relu-*"))
    assert files and all(f.startswith(f"features-relu-{DIM}x{chosen}-") for f in files), files
    # Stored with the choice: a reopened store, and its next session, keep that width; the
    # scores are those of a map of that width built from scratch at the same strength.
    memory.store.close()
    again = ExternalContinualLearner.open(Store.open(tmp_path / "s"), MemoryConfig())
    more, more_vectors = _data(40, seed=1)
    again.learn(more, more_vectors, [], np.zeros((0, DIM), np.float32), multi_label=False)
    space = again.feature_space("ranpac")
    assert space.features.size == chosen and again.choice.summary(340)["feature_widths"] == {
        **choice.widths
    }
    queries = _data(20, seed=5)[1]
    built = space_at(again, "ranpac", chosen, choice.ranpac_rho)
    built.restrengthen(Strength(space.solver.strength, space.scale))
    np.testing.assert_allclose(
        again.score_matrix(queries, "ranpac"),
        InFeatureSpace("ranpac", built.features, built.head(None)).scores(queries),
        rtol=1e-4,
        atol=1e-5,
    )
