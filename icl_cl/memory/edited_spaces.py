"""The random feature spaces carried through a forget or relabel (:mod:`~icl_cl.memory.forgetting`)
instead of being rebuilt from every stored vector.

A space's learner state is sums over items: label counts and sums of their features, and the
Gram of their rows. An edit changes a few items, so the edited state is the old one less what
the changed items gave and plus what they give now (a forgotten item gives nothing; an item that
lost its first copy gives its next copy's vector; a relabelled item gives its new labels). A
relabel changes only the label sums, except where a row's Gram weight is its label count (klda
in a multi-label store).

The strength changes too: the edited store has no ``auto`` choice (the next fit makes it), so its
spaces take the strength a store that learned the corrected data has before its first fit
(ranpac: the config's rho times the mean eigenvalue of the new Gram; klda: the shrinkage
estimated on it). A new strength is a full-rank change of ``(G + s I)^-1``, whatever the rows, so
the edit recovers ``G`` from the inverse once (``O(M^3)``), takes the changed items' rows out of it
and back in exactly (``O(n M^2)``), and factorises once at the new strength (``O(M^3)``), where a
rebuild costs ``O(N M^2)`` for ``N`` stored rows.

The edited state is written after the edit's commit, each file by an fsynced rename: the edit
removes the old state before it commits, so a crash leaves no state (rebuilt on use) or the
edited one, never a state of other rows than the store's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from icl_cl.memory import feature_checkpoint as checkpoints
from icl_cl.memory.feature_space import FeatureSpace
from icl_cl.memory.item_groups import Additions, input_key
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store_feature_spaces import KINDS, MAX_LABELS, FeatureSpaces

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ItemChanges:
    """The items an edit changes, as a feature space counts them (its first copy's vector, the
    union of its copies' labels).

    Attributes:
        gone: Items that leave the store.
        before: Items that stay, as they were.
        after: The same items, as they are after the edit (aligned with ``before``).
        same_vector: Per staying item, whether its first copy stays its first copy (then only its
            labels change).
    """

    gone: Additions
    before: Additions
    after: Additions
    same_vector: np.ndarray


def _additions(vectors: np.ndarray, labels: list[list[str]]) -> Additions:
    """Whole items, each counted once with all its labels."""
    return Additions(vectors, labels, np.ones(len(labels), bool), True)


@dataclass(frozen=True)
class EditedRows:
    """What an edit does to the stored rows.

    Attributes:
        keep: Per stored row, whether it stays.
        changed: Rows forgotten or given other labels.
        before: Per stored row, its labels now.
        after: Per stored row, its labels after the edit.
    """

    keep: np.ndarray
    changed: Sequence[int]
    before: Sequence[Sequence[str]]
    after: Sequence[Sequence[str]]


def item_changes(
    edited: EditedRows, vectors: np.ndarray, inputs: Sequence[str | None]
) -> ItemChanges:
    """The items of the changed rows, before and after the edit (``vectors``: the stored ones,
    by row; ``inputs``: per row, its input, ``None`` for an item of its own, as in a
    single-label store)."""
    keep, before, after = edited.keep, edited.before, edited.after
    keys = [r if key is None else input_key(key) for r, key in enumerate(inputs)]
    touched = {keys[r] for r in edited.changed}
    rows: dict[object, list[int]] = {}
    for r, key in enumerate(keys):
        if key in touched:
            rows.setdefault(key, []).append(r)
    gone, old, new, same = [], [], [], []
    for item_rows in rows.values():
        was = (item_rows[0], list(dict.fromkeys(x for r in item_rows for x in before[r])))
        kept = [r for r in item_rows if keep[r]]
        if not kept:
            gone.append(was)
            continue
        old.append(was)
        new.append((kept[0], list(dict.fromkeys(x for r in kept for x in after[r]))))
        same.append(kept[0] == item_rows[0])

    def of(items: list[tuple[int, list[str]]]) -> Additions:
        at = np.asarray([r for r, _ in items], np.int64)
        return _additions(vectors[at], [labs for _, labs in items])

    return ItemChanges(of(gone), of(old), of(new), np.asarray(same, bool))


def _subset(added: Additions, at: np.ndarray) -> Additions:
    return _additions(added.vectors[at], [added.labels[i] for i in at])


def _edited_sums(
    space: FeatureSpace, changes: ItemChanges, labels: Sequence[str]
) -> RunningStatistics:
    """The space's label counts and sums after the edit, in the store's new column order
    (``labels``: the old order less the removed labels, then the added ones)."""
    transform = space.features.transform
    leaving = _additions(
        np.vstack([changes.gone.vectors, changes.before.vectors]),
        changes.gone.labels + changes.before.labels,
    )
    less = space.stats.without(leaving.delta(space.stats, transform))
    stats = RunningStatistics(space.features.size, weighted=False, gram=False)
    for label in labels:
        c = less.col.get(label)
        if c is None:  # a label the relabel brings
            stats.add_label(label)
        else:
            stats.add_label(label, int(less.counts[c]), less.sums[c])
    left = [lab for lab in less.labels if lab not in stats.col and less.counts[less.col[lab]]]
    if left:  # a removed label keeps examples: the edit and the state disagree
        raise ValueError(f"removed labels still have examples in the feature space: {left[:3]}")
    stats.n_examples = less.n_examples
    stats.apply(changes.after.delta(stats, transform))
    return stats


def _gram_changes(space: FeatureSpace, changes: ItemChanges) -> tuple[Additions, Additions]:
    """The items whose Gram rows change: those that leave or move to another copy's vector, and
    in klda's weighted Gram those whose label count changes; their old rows and their new."""
    moved = ~changes.same_vector
    if space.weighted:
        pairs = zip(changes.before.labels, changes.after.labels, strict=True)
        moved |= np.array([len(x) != len(y) for x, y in pairs], bool).reshape(moved.shape)
    at = np.flatnonzero(moved)
    old = _subset(changes.before, at)
    removed = _additions(
        np.vstack([changes.gone.vectors, old.vectors]), changes.gone.labels + old.labels
    )
    return removed, _subset(changes.after, at)


def edit_space(
    space: FeatureSpace,
    changes: ItemChanges,
    *,
    labels: Sequence[str],
    rows: int,
    rho: float,
    shrinkage: float | str,
) -> None:
    """Change ``space`` to the state of the edited store (``rows`` stored rows, label columns
    ``labels``) at the strength it has before any choice (ranpac's ``rho``, klda's
    ``shrinkage``): see the module."""
    gram = space.solver.gram()
    removed, added = _gram_changes(space, changes)
    for x in space.gram_rows(removed):
        gram -= x.T @ x
    for x in space.gram_rows(added):
        gram += x.T @ x
    space.stats = _edited_sums(space, changes, labels)
    if space.kind == "ridge":
        strength = space.ridge_strength(float(np.trace(gram)), rho)
    else:
        strength = space.lda_strength(gram, shrinkage)
    space.restrengthen(strength, gram=gram)
    space.rows, space.choice, space.strength_items = rows, None, space.stats.n_examples


def saved_spaces(spaces: FeatureSpaces, n_items: int) -> list[str]:
    """The feature scorers whose learner state the store keeps (those a choice uses)."""
    return [name for name in KINDS if spaces.checkpoint(spaces.features(name, n_items)).is_file()]


def write_edited(
    spaces: FeatureSpaces,
    carried: dict[str, FeatureSpace],
    edited: EditedRows,
    vectors: np.ndarray,
    inputs: Sequence[str | None],
    *,
    labels: Sequence[str],
    n_items: int,
) -> list[str]:
    """Edit each carried space that keeps its width and write it, after the edit's commit
    (``labels``: the store's label columns then, ``n_items`` its items); a space that cannot be
    edited is left to be rebuilt on use. Returns the names written."""
    written: list[str] = []
    try:
        changes = item_changes(edited, vectors, inputs)
    except ValueError as exc:
        logger.warning("feature spaces not carried through the edit (%s): rebuilt on use", exc)
        return written
    config, rows = spaces.config, int(edited.keep.sum())
    for name, space in carried.items():
        if space.features != spaces.features(name, n_items) or len(labels) > MAX_LABELS:
            continue  # another width: built anew on use
        try:
            edit_space(
                space, changes, labels=labels, rows=rows,
                rho=config.ranpac_lambda, shrinkage=config.shrinkage,
            )  # fmt: skip
            checkpoints.write_state(space, spaces.checkpoint(space.features))
        except (np.linalg.LinAlgError, ValueError, OSError) as exc:
            logger.warning(
                "feature space %s not carried through the edit (%s): rebuilt on use", name, exc
            )
            continue
        logger.info(
            "feature space %s: %d items changed by the edit",
            space.features.name,
            len(changes.gone.labels) + len(changes.before.labels),
        )
        written.append(name)
    return written
