"""Which stored labels are probably wrong: the audit of a store.

Every stored item is scored as if it had never been learned, with the held-out machinery the
heads are fitted with (:mod:`icl_cl.heads.heldout`): items in the fit's seeded order, held out in
folds of :func:`~icl_cl.heads.heldout.fold_size`, each fold's contribution subtracted from the
statistics exactly (Woodbury in a feature space, class sums less the fold's, the fold kept out of
the kNN vote), copies of an input held out together. Each item keeps its top-``k`` labels and its
stored ones; the store's fitted calibration for these settings turns their scores into
probabilities (without one, a calibration is fitted on the audited items themselves, as a fit
would on a sample of them); confident learning (:mod:`.confident_learning`) flags the items whose
stored labels disagree with them, with the labels they probably should have.

The audit reads the store only. It is one pass of held-out scoring over the whole store: the
same work as a fit's held-out items, for every item.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icl_cl.config import ClassifierConfig
from icl_cl.heads.calibrator import ScoreCalibrator
from icl_cl.heads.heldout import FOLD, draw_sample, fold_size
from icl_cl.heads.kept_heads import KeptHeads
from icl_cl.heads.spec import HeadSpec
from icl_cl.inputs import checks
from icl_cl.labelling.confident_learning import Issues, multi_label_issues, single_label_issues
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.scorers import top_k
from icl_cl.types import Progress

logger = logging.getLogger(__name__)

STORED_FIT = "stored fit"
"""``AuditReport.calibration`` when the store's fitted calibration gave the probabilities."""
FITTED_ON_AUDIT = "fitted on the audited items"
"""``AuditReport.calibration`` when there was none for these settings."""


@dataclass(frozen=True)
class Neighbour:
    """A stored example near an audited one: its id, labels and cosine similarity."""

    id: str
    labels: tuple[str, ...]
    similarity: float


@dataclass(frozen=True)
class Finding:
    """A stored example whose labels are probably wrong.

    Attributes:
        id: Its id (a multi-label input learned in several sessions: the first).
        ids: Every stored id it stands for (its copies, in a multi-label store).
        text: Its text.
        labels: Its stored labels.
        suggested: The labels it probably should have.
        score: How probably its stored labels are wrong, in ``[0, 1]`` (the ranking key).
        missing: Multi-label: labels it probably lacks.
        spurious: Multi-label: stored labels it probably should not have.
        probabilities: Held-out probability of each stored and suggested label.
        thresholds: Each of those labels' confident-learning threshold.
        neighbours: Its nearest other stored examples, with their labels.
    """

    id: str
    ids: tuple[str, ...]
    text: str
    labels: tuple[str, ...]
    suggested: tuple[str, ...]
    score: float
    missing: tuple[str, ...] = ()
    spurious: tuple[str, ...] = ()
    probabilities: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    neighbours: tuple[Neighbour, ...] = ()

    def to_dict(self, multi_label: bool) -> dict[str, Any]:
        """The finding as a JSON object (a line of ``icl-cl audit``)."""
        out: dict[str, Any] = {"id": self.id, "text": self.text, "labels": list(self.labels)}
        if multi_label:
            out["suggested"] = list(self.suggested)
            out["missing"], out["spurious"] = list(self.missing), list(self.spurious)
        else:
            out["suggested"] = self.suggested[0] if self.suggested else None
        out["score"] = round(self.score, 6)
        out["evidence"] = {
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
            "thresholds": {k: round(v, 6) for k, v in self.thresholds.items()},
            "neighbours": [
                {"id": n.id, "labels": list(n.labels), "similarity": round(n.similarity, 6)}
                for n in self.neighbours
            ],
        }
        if len(self.ids) > 1:
            out["ids"] = list(self.ids)
        return out


@dataclass(frozen=True)
class AuditReport:
    """What an audit found.

    Attributes:
        findings: The flagged examples, most probably wrong first (at most the limit asked).
        flagged: How many were flagged in all.
        audited: How many stored examples were audited (each item of a multi-label store once).
        scorer: The ECL scorer that scored them.
        calibration: Where the probabilities came from (:data:`STORED_FIT` or
            :data:`FITTED_ON_AUDIT`).
        multi_label: Whether the store is multi-label.
        seconds: Wall time of the audit.
        scores: Every audited example's id and score, most probably wrong first (flagged
            examples before the others).
    """

    findings: list[Finding]
    flagged: int
    audited: int
    scorer: str
    calibration: str
    multi_label: bool
    seconds: float
    scores: list[tuple[str, float]]

    def summary(self) -> dict[str, Any]:
        """Counts and settings, without the findings."""
        return {
            "audited": self.audited,
            "flagged": self.flagged,
            "returned": len(self.findings),
            "scorer": self.scorer,
            "calibration": self.calibration,
            "multi_label": self.multi_label,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class HeldOutTable:
    """Every audited item scored as if never learned.

    Attributes:
        rows: Per item, the stored rows it stands for (its first is the one scored).
        columns: ``(n, w)`` label columns: the top ``k`` by held-out score, then its stored
            labels outside them; ``-1`` pads.
        scores: ``(n, w)`` their held-out scores (``-inf`` pads, and labels that could not be
            scored).
        given: ``(n, w)`` which columns are the item's stored labels.
        k: How many leading columns are the top ``k``.
    """

    rows: list[list[int]]
    columns: np.ndarray
    scores: np.ndarray
    given: np.ndarray
    k: int


def _item_rows(groups: list[list[int]], multi: bool) -> list[list[int]]:
    """The audited items of held-out groups: each group once in a multi-label store, each row
    (a copy keeps its own label) in a single-label one."""
    return [list(g) for g in groups] if multi else [[r] for g in groups for r in g]


def _table_rows(
    scores: np.ndarray, labels: list[np.ndarray], k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One fold's columns, scores and stored-label flags: the top ``k`` then the stored labels
    outside them (in their order)."""
    top, _ = top_k(scores, k)
    n, k = top.shape
    most = max(len(lab) for lab in labels)
    stored = np.full((n, most), -1, np.int64)  # each item's stored labels, -1 padded
    for i, lab in enumerate(labels):
        stored[i, : len(lab)] = lab
    extra = (stored >= 0) & ~(stored[:, :, None] == top[:, None, :]).any(axis=2)
    first = np.argsort(~extra, axis=1, kind="stable")  # those outside the top first, in order
    columns = np.full((n, k + most), -1, np.int64)
    columns[:, :k] = top
    columns[:, k:] = np.where(
        np.take_along_axis(extra, first, 1), np.take_along_axis(stored, first, 1), -1
    )
    live = columns >= 0
    values = np.where(live, np.take_along_axis(scores, np.maximum(columns, 0), 1), -np.inf)
    given = (columns[:, :, None] == stored[:, None, :]).any(axis=2) & live
    return columns, values, given


def heldout_table(
    memory: ExternalContinualLearner,
    scorer: str,
    k: int,
    seed: int,
    progress: Progress | None = None,
) -> HeldOutTable:
    """Score every stored item as if it had never been learned (see the module docstring)."""
    multi = bool(memory.multi_label)
    groups = draw_sample(memory, memory.n_examples, seed).rows
    row_labels = memory.store.row_labels()
    col = memory.stats.col
    fold = fold_size(memory.n_items, FOLD)
    stage = f"auditing: {memory.n_examples} stored examples"
    rows: list[list[int]] = []
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for lo in range(0, len(groups), fold):
        part = groups[lo : lo + fold]
        try:
            held = memory.heldout_scorer([r for g in part for r in g], scorer)
        except np.linalg.LinAlgError:  # too few examples left to estimate the scorer
            continue
        items = _item_rows(part, multi)
        labels = [
            np.unique([col[lab] for r in item for lab in row_labels[r]]).astype(np.int64)
            for item in items
        ]
        queries = memory.index.vectors([item[0] for item in items])
        scores = held.scores(np.ascontiguousarray(queries, np.float32))
        parts.append(_table_rows(scores, labels, k))
        rows += items
        if progress is not None:
            progress(stage, min(lo + fold, len(groups)), len(groups))
    width = max((p[0].shape[1] for p in parts), default=0)

    def padded(i: int, fill: Any) -> np.ndarray:
        return np.vstack(
            [
                np.pad(p[i], ((0, 0), (0, width - p[i].shape[1])), constant_values=fill)
                for p in parts
            ]
        )

    if not parts:
        empty = np.zeros((0, 0))
        return HeldOutTable([], empty.astype(np.int64), empty, empty.astype(bool), k)
    return HeldOutTable(rows, padded(0, -1), padded(1, -np.inf), padded(2, False), min(k, width))


def probabilities(
    table: HeldOutTable, calibrator: ScoreCalibrator | None, multi: bool
) -> tuple[np.ndarray, str]:
    """The table's probabilities through ``calibrator``, or through one fitted on the table's
    top-``k`` columns with the stored labels as gold when there is none; and which it was."""
    source = STORED_FIT
    if calibrator is None:
        top = table.scores[:, : table.k]
        gold = [
            [j for j in range(table.k) if table.given[i, j]]
            + [-1] * int(table.given[i, table.k :].sum())
            for i in range(len(top))
        ]
        calibrator = ScoreCalibrator.fit(list(top), gold, multi)
        source = FITTED_ON_AUDIT
    return calibrator.probabilities(table.scores), source


def confident_issues(table: HeldOutTable, probs: np.ndarray, multi: bool, n_labels: int) -> Issues:
    """Confident learning over the table (see :mod:`.confident_learning`)."""
    scored = np.isfinite(table.scores)
    if multi:
        return multi_label_issues(table.columns, probs, table.given, scored, n_labels)
    given = table.columns[np.arange(len(table.columns)), table.given.argmax(axis=1)]
    given_scored = (scored & table.given).any(axis=1)
    return single_label_issues(table.columns, probs, given, given_scored, n_labels)


def _neighbours(
    memory: ExternalContinualLearner, table: HeldOutTable, items: Sequence[int], n: int
) -> list[tuple[Neighbour, ...]]:
    """Each item's ``n`` nearest stored examples other than its own rows."""
    if n <= 0 or not items:
        return [() for _ in items]
    own = [set(table.rows[i]) for i in items]
    depth = n + max(len(o) for o in own)
    sims, rows = memory.neighbours(memory.index.vectors([table.rows[i][0] for i in items]), depth)
    kept = [
        [(float(s), int(r)) for s, r in zip(srow, rrow, strict=True) if r >= 0 and r not in mine][
            :n
        ]
        for srow, rrow, mine in zip(sims, rows, own, strict=True)
    ]
    flat = sorted({r for near in kept for _, r in near})
    by_row = dict(zip(flat, memory.store.examples(flat), strict=True))
    return [tuple(Neighbour(by_row[r].id, by_row[r].labels, s) for s, r in near) for near in kept]


def findings(
    memory: ExternalContinualLearner,
    table: HeldOutTable,
    probs: np.ndarray,
    issues: Issues,
    items: Sequence[int],
    n_neighbours: int,
) -> list[Finding]:
    """The findings of ``items`` (indices into the table), in that order."""
    labels, col, multi = memory.stats.labels, memory.stats.col, bool(memory.multi_label)
    thresholds = issues.thresholds.astype(float)
    examples = memory.store.examples([table.rows[i][0] for i in items])
    copies = memory.store.examples([r for i in items for r in table.rows[i]])
    near = _neighbours(memory, table, items, n_neighbours)
    out, at = [], 0
    for i, ex, neighbours in zip(items, examples, near, strict=True):
        mine = copies[at : at + len(table.rows[i])]
        at += len(table.rows[i])
        cols, p = table.columns[i], probs[i]
        shown = (table.given[i] | issues.suggested[i]) & (cols >= 0)
        named = {labels[c]: float(v) for c, v, s in zip(cols, p, shown, strict=True) if s}
        changed = issues.changed[i]
        suggested = np.argsort(-np.where(issues.suggested[i], p, -1.0), kind="stable")
        out.append(
            Finding(
                id=ex.id,
                ids=tuple(c.id for c in mine),
                text=ex.text,
                labels=tuple(dict.fromkeys(lab for c in mine for lab in c.labels)),
                suggested=tuple(labels[cols[j]] for j in suggested if issues.suggested[i, j]),
                score=float(issues.score[i]),
                missing=tuple(labels[c] for c in cols[changed & ~table.given[i]]) if multi else (),
                spurious=tuple(labels[c] for c in cols[changed & table.given[i]]) if multi else (),
                probabilities=named,
                thresholds={lab: t for lab in named if np.isfinite(t := thresholds[col[lab]])},
                neighbours=neighbours,
            )
        )
    return out


def audit_store(
    memory: ExternalContinualLearner,
    scorer: str,
    *,
    k: int,
    seed: int,
    calibrator: ScoreCalibrator | None,
    limit: int | None = None,
    neighbours: int = 5,
    progress: Progress | None = None,
) -> AuditReport:
    """Audit every stored example (see the module docstring).

    Args:
        memory: The ECL over the store.
        scorer: The concrete ECL scorer (or combination) to score with.
        k: Labels kept per item besides its stored ones (the candidates of a prediction).
        seed: The held-out draw's seed (the fit's: the folds are the fit's).
        calibrator: The store's fitted calibration for these settings (``None``: fit one on
            the audited items).
        limit: At most this many findings (``None``: every flagged example).
        neighbours: Nearest stored examples given as evidence of each finding.
        progress: Told how far the held-out scoring got (``auditing: N stored examples``).
    """
    start = time.perf_counter()
    memory.require_examples()
    multi = bool(memory.multi_label)
    table = heldout_table(memory, scorer, k, seed, progress)
    if not table.rows:  # no fold left enough examples to score with (a store of a handful)
        seconds = time.perf_counter() - start
        source = STORED_FIT if calibrator is not None else FITTED_ON_AUDIT
        return AuditReport([], 0, 0, scorer, source, multi, seconds, [])
    probs, source = probabilities(table, calibrator, multi)
    issues = confident_issues(table, probs, multi, len(memory.stats.labels))
    order = np.lexsort((-issues.score, ~issues.flagged))  # flagged first, then by score
    flagged = int(issues.flagged.sum())
    shown = [int(i) for i in order[: flagged if limit is None else min(limit, flagged)]]
    ids = [ex.id for ex in memory.store.examples([table.rows[i][0] for i in order])]
    found = findings(memory, table, probs, issues, shown, neighbours)
    logger.info("audit: %d of %d stored examples flagged", flagged, len(table.rows))
    return AuditReport(
        found,
        flagged,
        len(table.rows),
        scorer,
        source,
        multi,
        time.perf_counter() - start,
        [(ident, float(issues.score[i])) for ident, i in zip(ids, order, strict=True)],
    )


def audit_classifier(
    memory: ExternalContinualLearner,
    config: ClassifierConfig,
    heads: KeptHeads,
    k: int = 10,
    *,
    scorer: str | None = None,
    limit: int | None = None,
    neighbours: int = 5,
    progress: Progress | None = None,
) -> AuditReport:
    """:func:`audit_store` over a classifier's store (its memory, config and fitted heads), with
    the calibration of its ECL's predictions of ``k`` candidates by ``scorer`` (the store's
    default: ``auto``'s choice) when they are fitted."""
    checks.check_prediction_options(k)
    memory.require_examples()
    spec = HeadSpec.of(config, k, memory.resolve_scorer(scorer), use_llm=False)
    fitted = heads.find(spec)
    return audit_store(
        memory,
        spec.scorer,
        k=k,
        seed=spec.fusion.seed,
        calibrator=fitted.calibrator if fitted is not None else None,
        limit=limit,
        neighbours=neighbours,
        progress=progress,
    )
