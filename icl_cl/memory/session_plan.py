"""A session worked out before its commit: what the store writes, then memory applies.

Planning reads memory and changes nothing, so a session whose commit fails leaves memory as it
was; :meth:`~icl_cl.memory.ecl.ExternalContinualLearner.learn` applies the plan only after the
store committed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from icl_cl.errors import DataError
from icl_cl.memory.feature_space import SpaceDelta
from icl_cl.memory.partial import SpaceSums
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta
from icl_cl.memory.stored_items import group_rows, recompute, session_additions
from icl_cl.types import Example, Label

if TYPE_CHECKING:
    from icl_cl.memory.ecl import ExternalContinualLearner


@dataclass(frozen=True)
class SessionPlan:
    """What one session adds, worked out against the memory it is learned into."""

    base: RunningStatistics  # the statistics it adds to (recomputed when the store regroups)
    delta: StatisticsDelta
    regrouped: bool  # the store changes kind (single- to multi-label, or back)
    space_deltas: dict[str, SpaceDelta]  # per feature space that keeps its width
    labels: list[Label]  # the new label columns, in order
    label_vectors: np.ndarray
    late_labels: list[str]  # declared labels with no example yet (the last new columns)


def plan_session(
    memory: ExternalContinualLearner,
    examples: Sequence[Example],
    vectors: np.ndarray,
    new_labels: Sequence[Label],
    new_label_vectors: np.ndarray,
    multi_label: bool | None,
    delta: StatisticsDelta | None,
    space_sums: SpaceSums | None = None,
) -> SessionPlan:
    """Work a session out without changing anything (see
    :meth:`~icl_cl.memory.ecl.ExternalContinualLearner.learn` for ``delta`` and ``space_sums``)."""
    known = memory.stats.col
    given = {lab.label: i for i, lab in enumerate(new_labels)}
    missing = {lab for ex in examples for lab in ex.labels if lab not in known and lab not in given}
    if missing:
        raise DataError(f"labels without a Label entry: {sorted(missing)[:5]}")
    # A store that changes kind (single- to multi-label, or back) groups its stored rows
    # anew: their statistics are recomputed, and rewritten in full with this session.
    switched = memory.n_examples > 0 and bool(multi_label) != bool(memory.multi_label)
    base, groups = memory.stats, memory.items() if multi_label else None
    if switched:
        base = recompute(memory.store, memory.index.vectors_all(), base.labels, bool(multi_label))
        groups = (
            group_rows(memory.store, memory.n_examples, base.col, True) if multi_label else None
        )
    added = session_additions(groups, examples, vectors, base.col, memory.index)
    if delta is not None and delta.n_examples != len(examples):
        raise ValueError(f"delta of {delta.n_examples} examples for {len(examples)} examples")
    # Partial sums of shards count every row: kept only where no row is a copy.
    summed = delta is not None and added.trivial and not switched
    delta = delta if summed else added.delta(base)
    space_deltas = memory.spaces.session_deltas(
        added,
        n_items=base.n_examples + delta.n_examples,
        n_rows=memory.n_examples,
        labels=base.labels,
        multi_label=multi_label,
        regrouped=switched,
        sums=space_sums if summed else None,
    )
    # New columns: labels in order of first use (as the delta numbers them), then labels that
    # were declared but have no example yet.
    used = set(delta.new_labels)
    order = [given[n] for n in delta.new_labels]
    order += [i for i, lab in enumerate(new_labels) if lab.label not in used]
    ordered = [new_labels[i] for i in order]
    ordered_vectors = new_label_vectors[order] if order else new_label_vectors[:0]
    late = [lab.label for lab in ordered[len(delta.new_labels) :]]
    return SessionPlan(base, delta, switched, space_deltas, ordered, ordered_vectors, late)
