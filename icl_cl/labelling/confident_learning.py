"""Confident learning over held-out probabilities: which given labels disagree with them.

The rules of Northcutt, Jiang and Chuang (Confident Learning, JAIR 2021), as cleanlab's confident
joint applies them, on a sparse table: each item has a few label columns (its candidates and its
given labels) with their probabilities; a label that is not among an item's columns has
probability 0 for it.

- **Single-label.** A label's threshold is the mean probability of that label over the items
  given it (its mean self-confidence). An item counts for the label that is most probable among
  those reaching their threshold (the paper's rule: cleanlab takes the most probable label of
  all when two or more reach theirs); the counts of given against counted labels, the confident
  joint, are calibrated to the given labels' counts, and each off-diagonal cell flags as many
  items of its given label as it counts, those with the largest margin ``p(counted) - p(given)``
  (cleanlab's default filter, pruning by noise rate). An item whose most probable label is its
  given one is never flagged, nor one whose given label could not be scored (no other item
  carries it): nothing speaks against it. The label suggested is the most probable one reaching
  its threshold, else the most probable other label.
- **Multi-label.** Each label is a yes/no question (one-vs-rest): its yes-threshold is the mean
  probability of the label over the items given it, its no-threshold the mean probability
  against it over the items not given it. A given label is spurious when the item is confidently
  a no (and not more of a yes); a label not given is missing when the item is confidently a yes.
  With ``decided`` (the default), the change must also be more probable than not (a missing
  label above 0.5, a spurious one below): in a store of many rare tags a tag's mean
  probability is small, and reaching it says little (on the debtags sample, without this rule
  221 of 240 items were flagged).

Scores rank the items, in ``[0, 1]``, higher is more probably wrong: single-label
``1 - p(given)`` (cleanlab's self-confidence, turned around; on WordNet supersenses at 5,000
items it found more flipped labels in its top ranks than the normalized margin did, 0.67 against
0.40 with random noise and 0.28 against 0.36 with confusable noise); multi-label the largest of
``p(missing)`` and ``1 - p(spurious)`` over the flagged labels (over all labels for an item not
flagged).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Issues:
    """What confident learning says of each item.

    Attributes:
        thresholds: Per label column, its (yes-)threshold (``nan``: no item carries it).
        flagged: ``(n,)`` whether the item's given labels are probably wrong.
        score: ``(n,)`` how probably they are wrong, in ``[0, 1]`` (see the module docstring).
        suggested: ``(n, w)`` which of the item's columns it probably should have (an item
            not flagged keeps its given labels).
        changed: ``(n, w)`` which of its columns the rules would change (single-label: the
            given label and the suggested one; multi-label: the spurious and missing ones).
    """

    thresholds: np.ndarray
    flagged: np.ndarray
    score: np.ndarray
    suggested: np.ndarray
    changed: np.ndarray


def _mean_by_label(columns: np.ndarray, values: np.ndarray, n_labels: int) -> np.ndarray:
    """Per label column, the mean of ``values`` at its entries (``nan`` where there is none)."""
    total = np.bincount(columns, weights=values, minlength=n_labels)
    count = np.bincount(columns, minlength=n_labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _calibrated_joint(
    given: np.ndarray, guess: np.ndarray, counts: np.ndarray
) -> dict[tuple[int, int], int]:
    """The confident joint's off-diagonal counts, calibrated as cleanlab does: each given
    label's row scaled to that label's count, the whole to the number of items, each row
    rounded keeping its total; then at least one item of each label left unflagged. Sparse:
    only the cells that hold an item."""
    cells, hits = np.unique(np.stack([given, guess]), axis=1, return_counts=True)
    row_sum = np.bincount(cells[0], weights=hits, minlength=len(counts))
    scaled = hits / np.maximum(row_sum[cells[0]], 1e-12) * counts[cells[0]]
    scaled *= counts.sum() / max(float(scaled.sum()), 1e-12)
    out: dict[tuple[int, int], int] = {}
    for k in np.unique(cells[0]):
        at = np.flatnonzero(cells[0] == k)
        ints = np.round(scaled[at])
        short = int(np.round(scaled[at].sum()) - ints.sum())
        if short:  # give the rounding's difference to the cells it shortchanged most
            order = np.argsort(-(scaled[at] - ints) * np.sign(short), kind="stable")
            ints[order[: abs(short)]] += np.sign(short)
        off = cells[1, at] != k
        total = ints[off].sum()
        if total > counts[k] - 1:  # keep at least one item of the label
            ints[off] = np.floor(ints[off] * max(counts[k] - 1, 0) / total)
        out.update(
            {
                (int(k), int(j)): int(c)
                for j, c, o in zip(cells[1, at], ints, off, strict=True)
                if o and c > 0
            }
        )
    return out


def _prune_by_noise_rate(
    columns: np.ndarray, probs: np.ndarray, given: np.ndarray, p_given: np.ndarray, joint: dict
) -> np.ndarray:
    """For each off-diagonal cell ``(k, j)`` of the calibrated joint, the items given ``k``
    with the largest margin ``p(j) - p(k)``, as many as the cell counts."""
    flagged = np.zeros(len(given), bool)
    for (k, j), count in joint.items():
        items = np.flatnonzero(given == k)
        p_j = np.where(columns[items] == j, probs[items], 0.0).sum(axis=1)
        margin = p_j - p_given[items]
        flagged[items[np.argsort(-margin, kind="stable")[:count]]] = True
    return flagged


def single_label_issues(
    columns: np.ndarray, probs: np.ndarray, given: np.ndarray, scored: np.ndarray, n_labels: int
) -> Issues:
    """Confident learning for one given label per item (cleanlab's default filter, pruning
    by noise rate).

    Args:
        columns: ``(n, w)`` label columns per item, ``-1`` where there is none; each row holds
            its given label.
        probs: ``(n, w)`` their probabilities.
        given: ``(n,)`` each item's given label column.
        scored: ``(n,)`` whether the given label could be scored (its held-out score was finite).
        n_labels: Number of label columns.
    """
    live = columns >= 0
    rows = np.arange(len(columns))
    is_given = live & (columns == given[:, None])
    p_given = np.where(is_given, probs, 0.0).sum(axis=1)
    thresholds = _mean_by_label(given[scored], p_given[scored], n_labels)
    limit = np.nan_to_num(np.where(live, thresholds[np.maximum(columns, 0)], np.nan), nan=np.inf)
    above = live & (probs > 0) & (probs >= limit - 1e-6)
    masked = np.where(above, probs, -1.0)
    best = masked.argmax(axis=1)
    counted = (masked[rows, best] >= 0) & scored
    counts = np.bincount(given[scored], minlength=n_labels)
    joint = _calibrated_joint(given[counted], columns[rows, best][counted], counts)
    flagged = _prune_by_noise_rate(columns, probs, given, p_given, joint) & scored
    top = np.where(live & ~is_given, probs, -1.0).max(axis=1)
    flagged &= top > p_given  # never an item whose most probable label is its own
    # The label it probably should have: the most probable one reaching its threshold, else
    # the most probable one.
    others = np.where(live & ~is_given, np.where(above, 1.0, 0.0) + probs, -1.0)
    choice = others.argmax(axis=1)
    suggested = is_given & ~flagged[:, None]
    suggested[rows[flagged], choice[flagged]] = True
    changed = (suggested | is_given) & flagged[:, None]
    return Issues(thresholds, flagged, 1.0 - p_given, suggested, changed)


def multi_label_issues(
    columns: np.ndarray,
    probs: np.ndarray,
    given: np.ndarray,
    scored: np.ndarray,
    n_labels: int,
    decided: bool = True,
) -> Issues:
    """Confident learning for label sets, one yes/no question per label.

    Args:
        columns: ``(n, w)`` label columns per item, ``-1`` where there is none; each row holds
            its given labels.
        probs: ``(n, w)`` their independent probabilities.
        given: ``(n, w)`` which columns are given labels of the item.
        scored: ``(n, w)`` which columns could be scored (a finite held-out score).
        n_labels: Number of label columns.
        decided: Flag a change only when it is more probable than not (module docstring).
    """
    live = columns >= 0
    n = len(columns)
    yes_entries = given & scored
    yes = _mean_by_label(columns[yes_entries], probs[yes_entries], n_labels)
    carried = np.bincount(columns[given], minlength=n_labels)
    others = live & ~given
    mass = np.bincount(columns[others], weights=probs[others], minlength=n_labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        no = np.where(n > carried, 1.0 - mass / np.maximum(n - carried, 1), np.nan)
    safe = np.maximum(columns, 0)
    t_yes = np.nan_to_num(np.where(live, yes[safe], np.nan), nan=np.inf)
    t_no = np.nan_to_num(np.where(live, no[safe], np.nan), nan=np.inf)
    confident_yes = (probs >= t_yes) & (probs > 0)
    confident_no = 1.0 - probs >= t_no
    spurious = yes_entries & confident_no & (~confident_yes | (1.0 - probs > probs))
    missing = others & confident_yes & (~confident_no | (probs > 1.0 - probs))
    if decided:
        spurious &= probs < 0.5
        missing &= probs > 0.5
    pair_score = np.where(given, 1.0 - probs, np.where(others, probs, 0.0))
    pair_score = np.where(scored | others, pair_score, 0.0)
    changed = spurious | missing
    flagged = changed.any(axis=1)
    score = np.where(
        flagged, np.where(changed, pair_score, 0.0).max(axis=1), pair_score.max(axis=1)
    )
    return Issues(yes, flagged, score, (given & ~spurious) | missing, changed)
