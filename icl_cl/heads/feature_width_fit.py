"""The width ``M`` of each random feature map, chosen on held-out stored items.

A feature scorer's state grows with its width: ``C M`` label sums, an ``M x M`` inverse Gram,
and ``O(n M^2)`` for a session of ``n`` items. So the width must earn its cost. The widest map
the budget allows (the config's ``ranpac_features`` / ``klda_features``, or fewer than that
for a store with fewer items) is the reference; each narrower map of the ladder (halvings) is
scored on the same held-out items, and the narrowest one the reference does not beat beyond
noise is kept: a one-sided paired test of the per-item quality (top-1 hit, or RP@5 in a
multi-label store) at 5%.

The choice is made with ``auto``'s (see :mod:`~icl_cl.heads.scorer_choice_fit`), on the same
held-out items and at the same sizes, and stored with it; a store then keeps and learns its
feature spaces at the chosen widths.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from icl_cl.heads.heldout import Sample
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.feature_space import FeatureSpace
from icl_cl.memory.random_features import MIN_WIDTH
from icl_cl.memory.scorers import FEATURE_SCORERS
from icl_cl.memory.store_feature_spaces import KINDS, stored_rows, strength_rule, widest_width

# The reference width and this many halvings are tried.
HALVINGS = 2
# One-sided 5%: the reference must beat a narrower map by this many standard errors of the
# paired per-item difference to keep its width.
EARNED_Z = 1.645

Quality = Callable[[np.ndarray], np.ndarray]  # held-out scores -> each item's quality


def width_ladder(widest: int) -> list[int]:
    """The widths tried, widest first: ``widest`` and its halvings down to :data:`MIN_WIDTH`."""
    ladder = [widest]
    while len(ladder) <= HALVINGS and ladder[-1] // 2 >= MIN_WIDTH:
        ladder.append(ladder[-1] // 2)
    return ladder


def narrowest_earned(quality: Mapping[int, np.ndarray]) -> int:
    """The narrowest width whose per-item held-out quality the widest one does not beat beyond
    noise (``quality``: width -> each held-out item's quality, the same items for every width)."""
    widest = max(quality)
    reference = np.asarray(quality[widest], np.float64)
    chosen = widest
    for width in sorted(quality, reverse=True)[1:]:
        diff = reference - np.asarray(quality[width], np.float64)
        spread = float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
        if spread == 0.0:
            if diff.mean() > 0:  # the wider is better on every item that differs
                break
        elif diff.mean() > EARNED_Z * spread / np.sqrt(len(diff)):
            break
        chosen = width
    return chosen


def fit_feature_widths(
    memory: ExternalContinualLearner,
    sample: Sample,
    folds: Sequence[range],
    scores: Mapping[str, np.ndarray],
    quality: Quality,
    rho: float | None,
) -> tuple[dict[str, int], dict[str, dict[str, float]]]:
    """Per feature scorer of ``scores`` (its held-out scores in the store's map now, already
    computed by the scorer choice): the chosen width, and the mean held-out quality at each
    width tried. The maps of the other widths are built from the stored vectors (each
    ``O(n M^2)``) and score the same ``folds`` of ``sample`` held out."""
    widths, accuracy = {}, {}
    for name, now in scores.items():
        if name not in FEATURE_SCORERS:
            continue
        current = memory.feature_space(name).features.size
        per_item = {}
        for width in width_ladder(widest_width(memory.config, name, memory.n_items)):
            at = now if width == current else _heldout_at(memory, sample, folds, name, width, rho)
            per_item[width] = quality(at)
        widths[name] = narrowest_earned(per_item)
        accuracy[name] = {str(w): float(np.mean(q)) for w, q in per_item.items()}
    return widths, accuracy


def _heldout_at(
    memory: ExternalContinualLearner,
    sample: Sample,
    folds: Sequence[range],
    name: str,
    width: int,
    rho: float | None,
) -> np.ndarray:
    """Held-out scores of feature scorer ``name`` in a map of ``width``, each fold left out."""
    space = space_at(memory, name, width, rho)
    prototypes = lambda stats: memory.spaces.prototypes(name, stats)  # noqa: E731
    out = []
    for fold in folds:
        held = memory.scorers.held_out_rows([r for i in fold for r in sample.rows[i]])
        scorer = space.heldout_scorer(name, held.vectors, held.labels, prototypes)
        out.append(scorer.scores(sample.vectors[fold.start : fold.stop]))
    return np.vstack(out).astype(np.float64)


def space_at(
    memory: ExternalContinualLearner, name: str, width: int, rho: float | None
) -> FeatureSpace:
    """A space of scorer ``name`` in a map of ``width``, built from the stored vectors and
    kept by no one; ranpac at the relative strength ``rho`` (``None``: the config's)."""
    items, config = bool(memory.multi_label), memory.config
    vectors, row_labels, inputs = stored_rows(memory.store, memory.index, memory.n_examples, items)
    return FeatureSpace.build(
        KINDS[name],
        memory.spaces.features(name, memory.n_items, width),
        labels=memory.stats.labels,
        vectors=vectors,
        row_labels=row_labels,
        inputs=inputs,
        items=items,
        strength=strength_rule(
            name, config.ranpac_lambda if rho is None else rho, config.shrinkage
        ),
    )
