"""Partial statistics of one shard, and their merge into one session's delta (map-reduce learn).

The ECL's statistics are sums, so a session split into shards is learned exactly by summing what
each shard adds. A worker computes its shard's :class:`~icl_cl.memory.statistics.StatisticsDelta`
against an empty state (so its columns are its own labels, in first-use order); the writer maps
those columns to the store's and adds the sums, under the writer lock.

A shard cannot see the copies of its inputs in other shards or in the store, so its sums count
every row. In a multi-label store, where copies of an input count once, the writer uses the
merged sums only when the session holds no copy (of a stored input or within the session) and
otherwise computes the session's statistics from the workers' vectors itself
(:meth:`~icl_cl.memory.ecl.ExternalContinualLearner.learn`).

The random feature scorers' sums are sums too: with a session large enough that one ``O(M^3)``
solve beats the ``O(n M^2)`` row-by-row update on the writer, workers also sum each shard's
features and their Gram, and the writer takes the summed Gram into its inverse at once
(:meth:`~icl_cl.memory.inverse_gram.InverseGram.add_gram`), under the same no-copy rule.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta

# Fields of StatisticsDelta that are indexed by label column; every other array field is a sum
# over all examples (Gram matrices) and is added as it is.
_PER_LABEL = ("new_labels", "cols", "counts", "sums", "n_examples")


SpaceSums = Mapping[str, tuple[RandomFeatures, Sequence[StatisticsDelta]]]
"""Per feature scorer (by name), the map workers used and each shard's sums in it."""


@dataclass(frozen=True)
class ShardSums:
    """What workers computed for one session split into shards, in shard order: the examples'
    vectors, each shard's statistics, and, per feature scorer whose state the store keeps (by
    name), each shard's sums in that scorer's feature map (:func:`shard_space_statistics`)."""

    vectors: np.ndarray
    statistics: Sequence[StatisticsDelta]
    spaces: SpaceSums = field(default_factory=dict)


def shard_statistics(
    dim: int, vectors: np.ndarray, label_lists: Sequence[Sequence[str]]
) -> StatisticsDelta:
    """What a shard adds, with columns numbered by first use within the shard."""
    return RunningStatistics(dim).delta(vectors, label_lists)


def shard_space_statistics(
    features: RandomFeatures,
    weighted: bool,
    vectors: np.ndarray,
    label_lists: Sequence[Sequence[str]],
) -> StatisticsDelta:
    """What a shard adds to a feature space: label sums of its features and their Gram (of
    ``[phi, 1]``; ``weighted``: also the Gram of rows weighted by their label count), counted
    from zero like :func:`shard_statistics`. ``O(n M^2)``, spent on the worker."""
    stats = RunningStatistics(features.size, weighted=weighted, gram=True)
    return stats.delta(vectors, label_lists, transform=features.transform)


def _sum(values: list[np.ndarray | None]) -> np.ndarray | None:
    """Sum of arrays, or ``None`` where the parts keep none (an unweighted Gram)."""
    return None if any(v is None for v in values) else np.sum(values, axis=0)


def merge(parts: Sequence[StatisticsDelta], base: RunningStatistics) -> StatisticsDelta:
    """The delta of all ``parts`` learned in order on top of ``base``.

    Labels new to ``base`` get columns in order of first use over the shards in order, which is
    the order learning their concatenation would give them.
    """
    if not parts:
        raise ValueError("nothing to merge")
    new_labels: list[str] = []
    col_of = dict(base.col)
    for part in parts:
        for label in part.new_labels:
            if label not in col_of:
                col_of[label] = len(base.labels) + len(new_labels)
                new_labels.append(label)
    # Each part's columns in the store's numbering; sized by the labels touched, not all labels.
    mapped = [
        np.asarray([col_of[part.new_labels[c]] for c in part.cols], np.int64) for part in parts
    ]
    touched = np.unique(np.concatenate(mapped))
    counts = np.zeros(len(touched), np.int64)
    sums = np.zeros((len(touched), base.dim), np.float64)
    for part, cols in zip(parts, mapped, strict=True):
        at = np.searchsorted(touched, cols)
        counts[at] += part.counts
        sums[at] += part.sums
    summed = {
        f.name: _sum([getattr(p, f.name) for p in parts])
        for f in dataclasses.fields(StatisticsDelta)
        if f.name not in _PER_LABEL
    }
    return StatisticsDelta(
        new_labels=tuple(new_labels),
        cols=touched,
        counts=counts,
        sums=sums,
        n_examples=sum(p.n_examples for p in parts),
        **summed,
    )
