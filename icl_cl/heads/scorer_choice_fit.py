"""What ``auto`` stands for, chosen on held-out stored examples: the best scorer of a pool, with
the others fused to it where they earn a weight (:func:`~icl_cl.heads.fusion.fit_fusion`), and
ranpac's ridge strength.

Each held-out item is scored by every scorer as if it had never been learned (its contribution
to the statistics subtracted; for ranpac every ridge strength at once, from one
eigendecomposition). The best scorer alone ranks; the others re-score its top candidates, and
fusion keeps one only if the cross-fitted combination beats the best scorer alone beyond noise.

This module fits the choice; the value it makes, stored with the store and applied by the memory
layer, is a :class:`~icl_cl.memory.scorer_choice.ScorerChoice`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from icl_cl.heads.feature_width_fit import fit_feature_widths
from icl_cl.heads.fusion import FUSED, KEPT, FusionWeights, fit_fusion
from icl_cl.heads.heldout import Sample, draw_sample, fold_size
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.ridge_path import RHO_GRID, heldout_ridge_scores
from icl_cl.memory.scorer_choice import ScorerChoice, combination_parts
from icl_cl.memory.scorers import FEATURE_SCORERS, row_floor, top_k
from icl_cl.memory.store_feature_spaces import MAX_LABELS
from icl_cl.types import Progress

logger = logging.getLogger(__name__)

# The scorers ``auto`` chooses among and fuses (linear ridge never won on the corpora);
# ``description`` ranks labels by their own text, the only source for labels with no example,
# and ncm's class means lean on that text where a label has few examples.
POOL = ("klda", "ranpac", "mahalanobis", "knn", "ncm", "description")
# Columns of each item the fusion is fitted over: the best scorer's top candidates, and each
# other scorer's own top few (labels only it ranks high, such as labels with no example, are
# what its weight is for).
FUSION_COLUMNS = 20
OTHERS_COLUMNS = 5
# A multi-label store's scorers are judged on RP@5 of the held-out items (a ranking of tags),
# a single-label store's on top-1.
RANKING_DEPTH = 5
# Where a scorer knows nothing of a label (no example), the standings tried by the fit: how
# many standard deviations of its scores above its lowest it counts the label.
NOVELTY_GRID = (0.0, 0.5, 1.0, 2.0, 3.0)
# Held-out items are scored in folds of at most this many (see heldout.fold_size): larger folds
# than the heads' cost fewer solves of the wide feature scorers.
FOLD = 500
# A large store holds out a twentieth of its items, up to this many. Scorers a point or two
# apart differ on a few percent of the items, and the fusion's sign test needs their net wins
# to exceed ~1.6 sqrt(items that differ): a thousand items cannot tell them apart, thousands can.
MOST_HELDOUT = 5000


def heldout_size(n_examples: int, least: int) -> int:
    """Held-out items of a choice on a store of ``n_examples``: ``least``, or a twentieth of a
    larger store up to :data:`MOST_HELDOUT`."""
    return max(least, min(n_examples // 20, MOST_HELDOUT))


def fit_scorer_choice(
    memory: ExternalContinualLearner,
    n: int,
    seed: int,
    *,
    pool: Sequence[str] = POOL,
    progress: Progress | None = None,
    widths_also: Sequence[str] = (),
) -> ScorerChoice:
    """Choose ``auto``'s scorer (or combination), ranpac's strength and a combination's bonus
    for labels with no example on ``n`` held-out items.

    Scorers are judged on the top-1 of a single-label store, on RP@5 of a multi-label one.

    Args:
        memory: The ECL (not changed: the caller stores and applies the choice).
        n: Held-out stored items to draw.
        seed: Seed of the draw.
        pool: Scorers to choose among.
        progress: Told ``fitting: choosing the ECL scorer on N held-out items``.
        widths_also: Feature scorers whose width is chosen besides those the choice uses
            (:func:`~icl_cl.heads.feature_width_fit.fit_feature_widths`).
    """
    if len(memory.labels) > MAX_LABELS:  # feature spaces keep no state for so many labels
        pool = [name for name in pool if name not in FEATURE_SCORERS]
    sample = draw_sample(memory, n, seed)
    gold = _gold_columns(memory, sample)
    depth = RANKING_DEPTH if memory.multi_label else 1
    scores, rho, rho_accuracy = _heldout_scores(memory, sample, gold, pool, progress)
    unordered, unordered_gold = dict(scores), gold
    gold = _by_name(memory.stats.labels, scores, gold)
    accuracy = {name: _quality(s, gold, depth) for name, s in scores.items()}
    tried = [name for name in pool if name in scores]
    best = max(tried, key=lambda name: accuracy[name])  # first of the pool on a tie
    order = [best, *(name for name in tried if name != best)]
    columns = _fusion_columns([scores[name] for name in order])
    positions = [
        {j for j, c in enumerate(cols) if c in g} for cols, g in zip(columns, gold, strict=True)
    ]
    novelty, fusion = _fit_with_novelty(
        {name: scores[name] for name in order}, columns, positions, depth
    )
    weights = dict(fusion.weights)
    if not fusion.uses_added:
        weights, novelty = {name: 1.0 if name == best else 0.0 for name in order}, None
    accuracy[FUSED] = fusion.heldout_accuracy.get(FUSED, accuracy[best])
    choice = ScorerChoice(
        weights, rho, len(gold), accuracy, memory.n_examples, rho_accuracy, novelty
    )
    names = [*combination_parts(choice.scorer), *widths_also]
    used = {
        name: unordered[name] for name in FEATURE_SCORERS if name in names and name in unordered
    }
    quality = lambda s: _item_quality(s, unordered_gold, depth)  # noqa: E731
    widths, width_accuracy = fit_feature_widths(
        memory, sample, _folds(memory, sample), used, quality, rho
    )
    choice = replace(choice, widths=widths, width_accuracy=width_accuracy)
    logger.info("auto scorer: %s", choice.reason())
    return choice


def _heldout_scores(
    memory: ExternalContinualLearner,
    sample: Sample,
    gold: Sequence[set[int]],
    pool: Sequence[str],
    progress: Progress | None,
) -> tuple[dict[str, np.ndarray], float | None, dict[str, float]]:
    """Every scorer's held-out scores (one left out where it cannot be estimated), ranpac's
    strength and the accuracy of each strength tried."""
    stage = f"fitting: choosing the ECL scorer on {len(gold)} held-out items"
    scores: dict[str, np.ndarray] = {}
    rho, rho_accuracy = None, {}
    for i, name in enumerate(pool):
        try:
            if name == "ranpac":
                scores[name], rho, rho_accuracy = _ranpac_path(memory, sample, gold)
            else:
                scores[name] = _heldout_matrix(memory, sample, name)
        except np.linalg.LinAlgError as exc:  # too few examples left to estimate it
            logger.info("auto scorer: %s left out (%s)", name, exc)
        if progress is not None:
            progress(stage, i + 1, len(pool))
    return scores, rho, rho_accuracy


def _fit_with_novelty(
    scores: dict[str, np.ndarray], columns: np.ndarray, gold: Sequence[set[int]], depth: int
) -> tuple[float, FusionWeights]:
    """The fusion of ``scores`` (the best scorer first) over each item's ``columns``, and the
    standing of labels a scorer knows nothing of (:func:`~icl_cl.memory.scorers.fill_unseen`)
    that makes the kept fusion score best: a held-out item whose label had one example has lost
    it to its fold, as an input of a new label has none (0 on a tie, and where every label of
    every fold has an example)."""
    at = {name: np.take_along_axis(s, columns, axis=1) for name, s in scores.items()}
    floors = {name: row_floor(s) for name, s in scores.items()}
    unseen = any(not np.isfinite(s).all() for s in at.values())
    fits = {}
    for novelty in NOVELTY_GRID if unseen else (0.0,):
        sources = {
            name: list(np.where(np.isfinite(s), s, floors[name][0] + novelty * floors[name][1]))
            for name, s in at.items()
        }
        fits[novelty] = fit_fusion(sources, gold, depth)
    novelty = max(fits, key=lambda n: fits[n].heldout_accuracy.get(KEPT, 0.0))
    return novelty, fits[novelty]


def _fusion_columns(scores: Sequence[np.ndarray]) -> np.ndarray:
    """Per item, the labels the fusion is fitted over: the first scorer's top
    :data:`FUSION_COLUMNS`, the other scorers' top :data:`OTHERS_COLUMNS` each, then the first
    scorer's next best until every row has the same width."""
    n_labels = scores[0].shape[1]
    width = min(n_labels, FUSION_COLUMNS + OTHERS_COLUMNS * (len(scores) - 1))
    others = [top_k(s, OTHERS_COLUMNS)[0] for s in scores[1:]]
    base = top_k(scores[0], width)[0]
    rows = []
    for i in range(len(base)):
        chosen = dict.fromkeys(base[i, :FUSION_COLUMNS].tolist())
        for top in others:
            chosen.update(dict.fromkeys(top[i].tolist()))
        for c in base[i, FUSION_COLUMNS:].tolist():
            if len(chosen) >= width:
                break
            chosen.setdefault(c)
        rows.append(list(chosen)[:width])
    return np.array(rows, dtype=np.int64).reshape(len(base), width)


def _by_name(
    labels: Sequence[str], scores: dict[str, np.ndarray], gold: Sequence[set[int]]
) -> list[set[int]]:
    """Put the label columns of ``scores`` (in place) and of ``gold`` in the order of the
    labels' names: ties (tags that always occur together score alike) then break by name, not
    by the column a store gave a label when it met it, so sessions learned one by one and their
    union make the same choice."""
    order = np.argsort(np.asarray(labels))
    for name in scores:
        scores[name] = scores[name][:, order]
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    return [{int(position[c]) for c in g} for g in gold]


def _gold_columns(memory: ExternalContinualLearner, sample: Sample) -> list[set[int]]:
    col = memory.stats.col
    return [{col[label] for label in ex.labels} for ex in sample.examples]


def _quality(scores: np.ndarray, gold: Sequence[set[int]], depth: int = 1) -> float:
    """Top-1 accuracy (``depth`` 1), or the mean RP@depth, of a held-out score matrix."""
    return float(np.mean(_item_quality(scores, gold, depth)))


def _item_quality(scores: np.ndarray, gold: Sequence[set[int]], depth: int = 1) -> np.ndarray:
    """Each held-out item's top-1 hit (``depth`` 1), or its RP@depth."""
    top = top_k(scores, depth)[0]
    return np.array(
        [
            len(set(t.tolist()) & g) / max(min(depth, len(g)), 1)
            for t, g in zip(top, gold, strict=True)
        ],
        dtype=np.float64,
    )


def _folds(memory: ExternalContinualLearner, sample: Sample) -> list[range]:
    """Consecutive item ranges, each held out at once."""
    size = fold_size(memory.n_items, FOLD)
    return [range(lo, min(lo + size, len(sample.rows))) for lo in range(0, len(sample.rows), size)]


def _heldout_matrix(memory: ExternalContinualLearner, sample: Sample, name: str) -> np.ndarray:
    """Every held-out item's scores of every label under ``name``, its fold left out."""
    out = []
    for fold in _folds(memory, sample):
        rows = [r for i in fold for r in sample.rows[i]]
        scorer = memory.heldout_scorer(rows, name)
        out.append(scorer.scores(sample.vectors[fold.start : fold.stop]))
    return np.vstack(out).astype(np.float64)


def _ranpac_path(
    memory: ExternalContinualLearner, sample: Sample, gold: Sequence[set[int]]
) -> tuple[np.ndarray, float, dict[str, float]]:
    """ranpac's held-out scores at the strength that scored best, that strength, and the
    accuracy of every strength tried."""
    space = memory.feature_space("ranpac")
    folds = []
    for fold in _folds(memory, sample):
        held = memory.scorers.held_out_rows([r for i in fold for r in sample.rows[i]])
        folds.append((space.features.transform(held.vectors), held.labels, held.firsts, fold))
    # The path scores each held-out item of a fold (in a single-label store each stored row);
    # a sampled item's score is that of its first row.
    paths = heldout_ridge_scores(
        space.eigen(), space.stats, [(f, lab) for f, lab, _, _ in folds], RHO_GRID
    )
    firsts = []
    for _, _, rows, fold in folds:
        at = {r: j for j, r in enumerate(rows)}
        firsts.append([at[sample.rows[i][0]] for i in fold])
    by_rho = {
        rho: np.vstack([m[first] for m, first in zip(mats, firsts, strict=True)]).astype(np.float64)
        for rho, mats in paths.items()
    }
    depth = RANKING_DEPTH if memory.multi_label else 1
    accuracy = {f"{rho:g}": _quality(s, gold, depth) for rho, s in by_rho.items()}
    best = max(RHO_GRID, key=lambda rho: accuracy[f"{rho:g}"])
    return by_rho[best], float(best), accuracy


# Below this many stored examples ``auto`` keeps its default: too few to tell scorers apart.
MIN_EXAMPLES = 50


def refresh_scorer_choice(
    memory: ExternalContinualLearner,
    requested: str,
    n: int,
    seed: int,
    progress: Progress | None = None,
    *,
    full: bool = False,
) -> ScorerChoice | None:
    """Fit and store the choice when the ``requested`` scorer depends on it (``auto``, or
    ``ranpac`` for its strength) and the store has outgrown the stored one (or ``full``); on
    ``heldout_size(n_examples, n)`` held-out items."""
    current = memory.choice
    # Sizes follow the item count, so sessions learned one by one and their union choose alike.
    if requested not in ("auto", "ranpac") or memory.n_items < MIN_EXAMPLES:
        return current
    if not full and current is not None and not current.due(memory.n_examples):
        return current
    choice = fit_scorer_choice(
        memory,
        heldout_size(memory.n_items, n),
        seed,
        progress=progress,
        widths_also=[requested] if requested in FEATURE_SCORERS else [],
    )
    memory.set_choice(choice, save=True)
    return choice
