"""A store's loaded rows as the statistics count them: grouped into items in a multi-label store
(see :mod:`~icl_cl.memory.item_groups`), each row its own item in a single-label one.

The ECL reads through these functions what a session adds, what a held-out item takes away, and
the statistics of the stored rows recomputed from their vectors (a store that changes kind, or
one written before copies counted once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from icl_cl.memory.item_groups import Additions, ItemGroups, add_rows
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.types import Example

if TYPE_CHECKING:
    from icl_cl.memory.example_index import ExampleIndex
    from icl_cl.memory.store import Store


@dataclass(frozen=True)
class HeldOutRows:
    """Stored items held out, each once.

    Attributes:
        vectors: Per item, its vector (its first copy's).
        labels: Per item, its labels (all of its copies').
        firsts: Per item, its first stored row.
        rows: Every stored row of the items.
    """

    vectors: np.ndarray
    labels: list[list[str]]
    firsts: list[int]
    rows: list[int]


def input_of(example: Example) -> str:
    """What identifies an example's input, as :meth:`Store.input_keys` gives it."""
    return example.image.key if example.image is not None else example.text


def stored_inputs(store: Store, n: int, multi: bool) -> list[str | None]:
    """Per row of the first ``n``, its input when rows are grouped into items (``multi``), else
    ``None`` (every row its own item)."""
    return list(store.input_keys()[:n]) if multi else [None] * n


def group_rows(store: Store, n: int, col: dict[str, int], multi: bool) -> ItemGroups:
    """The first ``n`` stored rows grouped into items (``multi``), or each its own item."""
    groups = ItemGroups()
    labels = [[col[lab] for lab in labs] for labs in store.row_labels()[:n]]
    groups.add(stored_inputs(store, n, multi), labels)
    return groups


def recompute(
    store: Store, vectors: np.ndarray, labels: Sequence[str], multi: bool
) -> RunningStatistics:
    """The statistics of the stored rows of ``vectors`` recomputed from them, rows grouped into
    items (``multi``) or counted apart; label columns in the order of ``labels``."""
    stats = RunningStatistics(store.dim)
    for label in labels:
        stats.add_label(label)
    n = len(vectors)
    add_rows(stats, vectors, store.row_labels()[:n], stored_inputs(store, n, multi))
    return stats


def session_additions(
    groups: ItemGroups | None,
    examples: Sequence[Example],
    vectors: np.ndarray,
    col: dict[str, int],
    index: ExampleIndex,
) -> Additions:
    """What a session adds to the stored items ``groups`` (``None``: a single-label store, where
    every row adds itself): copies of an item (stored, or earlier in the session) add only the
    labels it did not hold yet."""
    label_lists = [list(ex.labels) for ex in examples]
    if groups is None:
        return Additions(vectors, label_lists, np.ones(len(examples), bool), trivial=True)
    keys = [input_of(ex) for ex in examples]
    return groups.additions(keys, label_lists, col, vectors, index.vectors)


def held_out(
    groups: ItemGroups | None,
    store: Store,
    index: ExampleIndex,
    names: Sequence[str],
    rows: Sequence[int],
) -> HeldOutRows:
    """The stored items at ``rows`` as the statistics count them: in a multi-label store
    (``groups``) an item is held out whole, once, with its first copy's vector and the union of
    its copies' labels (``names``: label by column), and all of its copies leave the kNN vote;
    in a single-label store (``None``) every row is an item."""
    if groups is None:
        rows = [int(r) for r in rows]
        labels = [list(ex.labels) for ex in store.examples(rows)]
        return HeldOutRows(index.vectors(rows), labels, rows, rows)
    chosen = list(dict.fromkeys(groups.item_of(np.asarray(rows, np.int64)).tolist()))
    firsts = [groups.first_row[i] for i in chosen]
    labels = [[names[c] for c in groups.labels[i]] for i in chosen]
    return HeldOutRows(index.vectors(firsts), labels, firsts, groups.rows_of_items(chosen))


def nearest_rows(
    rows: np.ndarray,
    items: ItemGroups | None,
    names: Sequence[str],
    labels: Sequence[str] | None,
    n: int,
) -> list[int]:
    """The first ``n`` of the neighbour ``rows`` (nearest first; ``-1``: an empty slot) whose
    item carries one of ``labels`` (``None``: any), label columns named by ``names``."""
    wanted = None if labels is None else set(labels)
    chosen: list[int] = []
    for row in rows:
        if row < 0:
            continue
        if items is not None and wanted is not None:
            if not wanted & {names[c] for c in items.labels_of_row(int(row))}:
                continue
        chosen.append(int(row))
        if len(chosen) == n:
            break
    return chosen
