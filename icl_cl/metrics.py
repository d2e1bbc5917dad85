"""Evaluation metrics for continual in-context text classification.

Four families of pure functions live here:

* Class-incremental metrics over a sequence of training sessions (Avalanche /
  PyCIL conventions): average incremental accuracy, last accuracy, forgetting
  and backward transfer.
* Single-label metrics: accuracy and top-k accuracy.
* Multi-label metrics over label sets, rankings and score dicts: micro/macro F1,
  rank-precision@K, precision@K, recall@K, label-wise mAP and per-sample AP.
* Extreme-classification (long-tail) metrics over rankings: nDCG@K, propensity-scored
  precision@K and the recall@K of labels never seen in training, the last two given the
  training label counts.
* Calibration: expected calibration error (ECE), single- and multi-label.

All functions validate their inputs and raise ``ValueError`` on empty inputs,
mismatched lengths or malformed arrays, and ``TypeError`` where a bare string is
passed in place of a collection of labels (a ``str`` is itself a collection of
one-character strings, which would silently give wrong numbers).

Accuracy-matrix convention: ``R`` is a ``(T, T)`` float array with
``R[t, j]`` = accuracy on session ``j``'s labels after training session ``t``.
Entries with ``j > t`` (sessions not yet seen) are ignored and are
conventionally NaN.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

import numpy as np
import numpy.typing as npt

__all__ = [
    "accuracy",
    "average_incremental_accuracy",
    "backward_transfer",
    "expected_calibration_error",
    "forgetting",
    "harmonic_mean",
    "inverse_propensity",
    "last_accuracy",
    "macro_f1",
    "mean_average_precision",
    "micro_f1",
    "multilabel_ece",
    "ndcg_at_k",
    "precision_at_k",
    "propensity_scored_precision_at_k",
    "rank_precision_at_k",
    "recall_at_k",
    "sample_average_precision",
    "top_k_accuracy",
    "unseen_label_recall_at_k",
]

PROPENSITY_A = 0.55
"""Jain et al.'s ``A`` for generic data (Wikipedia: 0.5, Amazon: 0.6)."""
PROPENSITY_B = 1.5
"""Jain et al.'s ``B`` for generic data (Wikipedia: 0.4, Amazon: 2.6)."""
PROPENSITY_MIN_TRAIN = 3
"""The fewest training items the propensity model takes: below ``e``, ``log N - 1 <= 0``."""


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------


def _check_nonempty(name: str, values: Sequence[object]) -> None:
    if len(values) == 0:
        raise ValueError(f"{name} must be non-empty")


def _check_same_length(name_a: str, a: Sequence[object], name_b: str, b: Sequence[object]) -> None:
    _check_nonempty(name_a, a)
    if len(a) != len(b):
        raise ValueError(
            f"{name_a} and {name_b} must have the same length, got {len(a)} and {len(b)}"
        )


def _check_k(k: int) -> None:
    # bool is an int subclass; reject it so that k=True is not read as k=1.
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")


def _as_label_sets(name: str, items: Sequence[Collection[str]]) -> list[frozenset[str]]:
    sets: list[frozenset[str]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            raise TypeError(f"{name}[{i}] must be a collection of labels, not a str")
        sets.append(frozenset(item))
    return sets


def _as_rankings(name: str, rankings: Sequence[Sequence[str]]) -> list[list[str]]:
    out: list[list[str]] = []
    for i, ranking in enumerate(rankings):
        if isinstance(ranking, str):
            raise TypeError(f"{name}[{i}] must be a sequence of labels, not a str")
        ranking = list(ranking)
        # Duplicates would let one gold label count as several hits.
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"{name}[{i}] contains duplicate labels")
        out.append(ranking)
    return out


def _as_finite_1d(name: str, values: Sequence[float] | npt.ArrayLike) -> np.ndarray:
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} must be non-empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must contain only finite values")
    return arr


def _as_accuracy_matrix(accuracy_matrix: npt.ArrayLike) -> np.ndarray:
    r = np.asarray(accuracy_matrix, dtype=float)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"accuracy matrix must be square (T, T), got shape {r.shape}")
    if r.shape[0] == 0:
        raise ValueError("accuracy matrix must be non-empty")
    # Only the seen part (j <= t) is used; the upper triangle may hold anything.
    if not np.all(np.isfinite(r[np.tril_indices(r.shape[0])])):
        raise ValueError("accuracy matrix must be finite on and below the diagonal")
    return r


# ---------------------------------------------------------------------------
# Class-incremental metrics
# ---------------------------------------------------------------------------


def average_incremental_accuracy(stage_accuracies: Sequence[float] | npt.ArrayLike) -> float:
    """Average incremental accuracy (PyCIL's "average accuracy").

    Args:
        stage_accuracies: Per-stage accuracies; entry ``t`` is the accuracy on
            all labels seen up to and including stage ``t``, measured after
            training stage ``t``.

    Returns:
        The mean of ``stage_accuracies`` over stages.

    Raises:
        ValueError: If the input is empty, not 1-D or contains non-finite values.
    """
    return float(np.mean(_as_finite_1d("stage_accuracies", stage_accuracies)))


def last_accuracy(stage_accuracies: Sequence[float] | npt.ArrayLike) -> float:
    """Accuracy after the final stage, on all labels seen so far.

    Args:
        stage_accuracies: Per-stage accuracies, as for
            :func:`average_incremental_accuracy`.

    Returns:
        The last entry of ``stage_accuracies``.

    Raises:
        ValueError: If the input is empty, not 1-D or contains non-finite values.
    """
    return float(_as_finite_1d("stage_accuracies", stage_accuracies)[-1])


def forgetting(accuracy_matrix: npt.ArrayLike) -> float:
    """Average forgetting over old sessions (Avalanche / PyCIL).

    For each old session ``j < T - 1`` the forgetting is
    ``max_{t in [j, T-2]} R[t, j] - R[T-1, j]``: the best accuracy reached on
    ``j`` before the final stage minus the final accuracy on ``j``. The result
    is the mean over old sessions. It is not clipped, so it is negative when
    the final stage improved old sessions beyond their previous best.

    Args:
        accuracy_matrix: ``(T, T)`` array ``R`` with ``R[t, j]`` the accuracy
            on session ``j`` after training session ``t``; entries with
            ``j > t`` are ignored.

    Returns:
        Mean forgetting, or ``0.0`` when ``T == 1`` (no old sessions).

    Raises:
        ValueError: If the matrix is empty, not square, or has non-finite values
            on or below the diagonal.
    """
    r = _as_accuracy_matrix(accuracy_matrix)
    t_last = r.shape[0] - 1
    if t_last == 0:
        return 0.0
    per_session = [r[j:t_last, j].max() - r[t_last, j] for j in range(t_last)]
    return float(np.mean(per_session))


def backward_transfer(accuracy_matrix: npt.ArrayLike) -> float:
    """Backward transfer, BWT (Lopez-Paz & Ranzato, 2017; Avalanche).

    ``BWT = mean_{j < T-1} (R[T-1, j] - R[j, j])``: how much training on later
    sessions changed accuracy on each old session relative to right after it
    was learned. Negative values indicate forgetting.

    Args:
        accuracy_matrix: ``(T, T)`` array ``R``, as for :func:`forgetting`.

    Returns:
        Backward transfer, or ``0.0`` when ``T == 1``.

    Raises:
        ValueError: If the matrix is empty, not square, or has non-finite values
            on or below the diagonal.
    """
    r = _as_accuracy_matrix(accuracy_matrix)
    t_last = r.shape[0] - 1
    if t_last == 0:
        return 0.0
    old = np.arange(t_last)
    return float(np.mean(r[t_last, old] - r[old, old]))


def harmonic_mean(base: float, novel: float) -> float:
    """Harmonic mean of the accuracies on base and on novel (few-shot) labels, the usual
    few-shot class-incremental summary: high only when both are.

    Args:
        base: Accuracy on test items of the base session's labels.
        novel: Accuracy on test items of the labels learned from a few examples.

    Returns:
        ``2 b n / (b + n)``; ``0.0`` when both are 0; NaN when either is NaN (no such items).

    Raises:
        ValueError: If either value is outside ``[0, 1]``.
    """
    if math.isnan(base) or math.isnan(novel):
        return float("nan")
    for name, value in (("base", base), ("novel", novel)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
    total = base + novel
    return 0.0 if total == 0 else 2 * base * novel / total


# ---------------------------------------------------------------------------
# Single-label metrics
# ---------------------------------------------------------------------------


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """Fraction of exact label matches.

    Args:
        y_true: Gold labels.
        y_pred: Predicted labels, aligned with ``y_true``.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths.
    """
    _check_same_length("y_true", y_true, "y_pred", y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred, strict=True)) / len(y_true)


def top_k_accuracy(y_true: Sequence[str], ranked: Sequence[Sequence[str]], k: int) -> float:
    """Fraction of items whose gold label is among the first ``k`` ranked labels.

    Args:
        y_true: Gold labels.
        ranked: Per-item labels in decreasing order of preference; may be
            shorter than ``k``.
        k: Cut-off, ``>= 1``.

    Returns:
        Top-k accuracy in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, or a
            ranking has duplicate labels.
        TypeError: If a ranking is a bare ``str``.
    """
    _check_k(k)
    _check_same_length("y_true", y_true, "ranked", ranked)
    rankings = _as_rankings("ranked", ranked)
    return sum(t in r[:k] for t, r in zip(y_true, rankings, strict=True)) / len(y_true)


# ---------------------------------------------------------------------------
# Multi-label set metrics
# ---------------------------------------------------------------------------


def _f1(tp: int, fp: int, fn: int) -> float:
    # sklearn's zero_division=0: F1 is 0 when there are no positives at all.
    denom = 2 * tp + fp + fn
    return 2 * tp / denom if denom else 0.0


def _label_counts(
    gold: Sequence[Collection[str]], pred: Sequence[Collection[str]]
) -> dict[str, list[int]]:
    """Per-label ``[tp, fp, fn]`` counts over all items."""
    _check_same_length("gold", gold, "pred", pred)
    counts: dict[str, list[int]] = {}
    for g, p in zip(_as_label_sets("gold", gold), _as_label_sets("pred", pred), strict=True):
        for label in g & p:
            counts.setdefault(label, [0, 0, 0])[0] += 1
        for label in p - g:
            counts.setdefault(label, [0, 0, 0])[1] += 1
        for label in g - p:
            counts.setdefault(label, [0, 0, 0])[2] += 1
    return counts


def micro_f1(gold: Sequence[Collection[str]], pred: Sequence[Collection[str]]) -> float:
    """Micro-averaged F1 over all (item, label) decisions.

    Equivalent to sklearn ``f1_score(Y, P, average='micro', zero_division=0)``
    on binarised label sets.

    Args:
        gold: Gold label set per item.
        pred: Predicted label set per item.

    Returns:
        ``2 TP / (2 TP + FP + FN)`` pooled over labels; ``0.0`` when every gold
        and predicted set is empty.

    Raises:
        ValueError: If inputs are empty or of different lengths.
        TypeError: If an item is a bare ``str``.
    """
    counts = _label_counts(gold, pred)
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    return _f1(tp, fp, fn)


def macro_f1(
    gold: Sequence[Collection[str]],
    pred: Sequence[Collection[str]],
    labels: Sequence[str] | None = None,
) -> float:
    """Macro-averaged F1: the unweighted mean of per-label F1.

    Matches sklearn ``f1_score(Y, P, average='macro', zero_division=0)`` with
    ``Y`` and ``P`` binarised over the same label set: a label with no gold and
    no predicted positives scores 0. Predicted labels outside ``labels`` are
    ignored.

    Args:
        gold: Gold label set per item.
        pred: Predicted label set per item.
        labels: Labels to average over. Defaults to the union of labels that
            appear in ``gold`` or ``pred``.

    Returns:
        Macro F1 in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``labels`` has
            duplicates, or the label set to average over is empty.
        TypeError: If an item or ``labels`` is a bare ``str``.
    """
    counts = _label_counts(gold, pred)
    if labels is None:
        label_list = list(counts)
    else:
        if isinstance(labels, str):
            raise TypeError("labels must be a sequence of labels, not a str")
        label_list = list(labels)
        if len(set(label_list)) != len(label_list):
            raise ValueError("labels contains duplicates")
    if not label_list:
        raise ValueError("no labels to average over")
    return float(np.mean([_f1(*counts.get(label, (0, 0, 0))) for label in label_list]))


# ---------------------------------------------------------------------------
# Multi-label ranking metrics
# ---------------------------------------------------------------------------


def _hits_at_k(
    gold: Sequence[Collection[str]], rankings: Sequence[Sequence[str]], k: int
) -> list[tuple[int, int]]:
    """Per-item ``(hits in top k, |gold|)`` pairs."""
    _check_k(k)
    _check_same_length("gold", gold, "rankings", rankings)
    gold_sets = _as_label_sets("gold", gold)
    ranks = _as_rankings("rankings", rankings)
    return [
        (sum(label in g for label in r[:k]), len(g)) for g, r in zip(gold_sets, ranks, strict=True)
    ]


def _mean_over_nonempty_gold(values: list[float | None]) -> float:
    kept = [v for v in values if v is not None]
    if not kept:
        raise ValueError("every gold set is empty; the metric is undefined")
    return float(np.mean(kept))


def rank_precision_at_k(
    gold: Sequence[Collection[str]], rankings: Sequence[Sequence[str]], k: int
) -> float:
    """Rank-precision at K, RP@K (Infer-Retrieve-Rank, D'Oosterlinck et al. 2024).

    Per item: ``(gold labels in the top K) / min(K, |gold|)``, so an item with
    fewer than K gold labels can still score 1. Averaged over items with a
    non-empty gold set; items with empty gold are skipped.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.
        k: Cut-off, ``>= 1``.

    Returns:
        Mean RP@K in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, a
            ranking has duplicates, or every gold set is empty.
        TypeError: If an item is a bare ``str``.
    """
    per_item = [h / min(k, n) if n else None for h, n in _hits_at_k(gold, rankings, k)]
    return _mean_over_nonempty_gold(per_item)


def precision_at_k(
    gold: Sequence[Collection[str]], rankings: Sequence[Sequence[str]], k: int
) -> float:
    """Precision at K: ``(gold labels in the top K) / K``, averaged over all items.

    Items with an empty gold set are included and score 0; rankings shorter
    than K are not padded, so missing slots count as misses.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.
        k: Cut-off, ``>= 1``.

    Returns:
        Mean P@K in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, or a
            ranking has duplicates.
        TypeError: If an item is a bare ``str``.
    """
    return float(np.mean([h / k for h, _ in _hits_at_k(gold, rankings, k)]))


def recall_at_k(
    gold: Sequence[Collection[str]], rankings: Sequence[Sequence[str]], k: int
) -> float:
    """Recall at K: ``(gold labels in the top K) / |gold|``.

    Used as the candidate recall of the retrieval stage. Averaged over items
    with a non-empty gold set; items with empty gold are skipped.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.
        k: Cut-off, ``>= 1``.

    Returns:
        Mean R@K in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, a
            ranking has duplicates, or every gold set is empty.
        TypeError: If an item is a bare ``str``.
    """
    per_item = [h / n if n else None for h, n in _hits_at_k(gold, rankings, k)]
    return _mean_over_nonempty_gold(per_item)


def _binary_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AP of one label column, step-wise as in sklearn (no interpolation).

    Tied scores form a single threshold, exactly like
    ``sklearn.metrics.precision_recall_curve``.
    """
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # Compare with != rather than np.diff so that runs of -inf count as one tie.
    last_of_tie = np.flatnonzero(s_sorted[1:] != s_sorted[:-1])
    thresholds = np.append(last_of_tie, y_sorted.size - 1)
    tps = np.cumsum(y_sorted)[thresholds]
    precision = tps / (thresholds + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_average_precision(
    gold: Sequence[Collection[str]],
    scores: Sequence[Mapping[str, float]],
    labels: Sequence[str],
) -> float:
    """Label-wise (macro) mean average precision.

    This is the *label-wise* mAP: for each label, items are ranked by that
    label's score and the average precision of that ranking is computed; the
    result is the mean over labels. It matches sklearn
    ``average_precision_score(Y, S, average='macro')`` restricted to labels with
    at least one positive item (labels without positives are skipped, since
    their AP is undefined). For the per-query mAP used in retrieval see
    :func:`sample_average_precision`.

    Args:
        gold: Gold label set per item.
        scores: Per-item mapping from label to score (higher = more likely).
            A label missing from an item's dict gets score ``-inf``, i.e. it
            is ranked below every scored item.
        labels: Labels to evaluate, without duplicates.

    Returns:
        Label-wise mAP in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``labels`` is
            empty or has duplicates, a score is NaN or ``+inf``, or no label has
            a positive item.
        TypeError: If an item or ``labels`` is a bare ``str``.
    """
    _check_same_length("gold", gold, "scores", scores)
    if isinstance(labels, str):
        raise TypeError("labels must be a sequence of labels, not a str")
    label_list = list(labels)
    _check_nonempty("labels", label_list)
    if len(set(label_list)) != len(label_list):
        raise ValueError("labels contains duplicates")
    gold_sets = _as_label_sets("gold", gold)

    y = np.array([[label in g for label in label_list] for g in gold_sets], dtype=float)
    s = np.array(
        [[float(d.get(label, -math.inf)) for label in label_list] for d in scores],
        dtype=float,
    )
    if np.any(np.isnan(s)) or np.any(s == math.inf):
        raise ValueError("scores must not contain NaN or +inf")

    with_positives = np.flatnonzero(y.sum(axis=0) > 0)
    if with_positives.size == 0:
        raise ValueError("no label in labels has a positive item; mAP is undefined")
    return float(np.mean([_binary_average_precision(y[:, j], s[:, j]) for j in with_positives]))


def sample_average_precision(
    gold: Sequence[Collection[str]], rankings: Sequence[Sequence[str]]
) -> float:
    """Per-item (sample-wise) average precision, averaged over items.

    Per item: ``sum over ranks i holding a gold label of precision@i``, divided
    by ``|gold|``; gold labels absent from the ranking contribute 0. This is the
    per-query mAP used in retrieval. Items with empty gold are skipped.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.

    Returns:
        Mean per-item AP in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, a ranking has
            duplicates, or every gold set is empty.
        TypeError: If an item is a bare ``str``.
    """
    _check_same_length("gold", gold, "rankings", rankings)
    per_item: list[float | None] = []
    for g, r in zip(_as_label_sets("gold", gold), _as_rankings("rankings", rankings), strict=True):
        if not g:
            per_item.append(None)
            continue
        hits, total = 0, 0.0
        for rank, label in enumerate(r, start=1):
            if label in g:
                hits += 1
                total += hits / rank
        per_item.append(total / len(g))
    return _mean_over_nonempty_gold(per_item)


# ---------------------------------------------------------------------------
# Extreme classification (long tail)
# ---------------------------------------------------------------------------


def ndcg_at_k(gold: Sequence[Collection[str]], rankings: Sequence[Sequence[str]], k: int) -> float:
    """Normalised discounted cumulative gain at K, nDCG@K, with binary relevance.

    Per item: ``DCG = sum over ranks i <= K holding a gold label of 1 / log2(i + 1)``, divided
    by the best DCG possible, ``sum_{i=1}^{min(K, |gold|)} 1 / log2(i + 1)`` (the XMC repository
    convention). Averaged over items with a non-empty gold set; items with empty gold are
    skipped, as for :func:`rank_precision_at_k`.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.
        k: Cut-off, ``>= 1``.

    Returns:
        Mean nDCG@K in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, a
            ranking has duplicates, or every gold set is empty.
        TypeError: If an item is a bare ``str``.
    """
    _check_k(k)
    _check_same_length("gold", gold, "rankings", rankings)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    per_item: list[float | None] = []
    for g, r in zip(_as_label_sets("gold", gold), _as_rankings("rankings", rankings), strict=True):
        if not g:
            per_item.append(None)
            continue
        dcg = sum(discounts[i] for i, label in enumerate(r[:k]) if label in g)
        per_item.append(float(dcg / discounts[: min(k, len(g))].sum()))
    return _mean_over_nonempty_gold(per_item)


def inverse_propensity(
    count: int, n_train: int, a: float = PROPENSITY_A, b: float = PROPENSITY_B
) -> float:
    """Inverse propensity ``1 / p_l`` of a label (Jain, Prabhu and Varma, KDD 2016).

    The propensity model is ``p_l = 1 / (1 + C exp(-A log(N_l + B)))`` with
    ``C = (log N - 1) (B + 1)^A``, so ``1 / p_l = 1 + C (N_l + B)^(-A)``: a label seen in few
    training items was likely missed by annotators and weighs more. A label never seen
    (``N_l = 0``) gets the largest weight.

    Args:
        count: ``N_l``, the training items carrying the label, ``0 <= count <= n_train``.
        n_train: ``N``, the training items, ``>= 3`` (below ``e``, ``C <= 0`` and the weights
            would no longer favour rare labels).
        a: ``A``; 0.55 for generic data.
        b: ``B``; 1.5 for generic data.

    Returns:
        ``1 / p_l``, at least 1.

    Raises:
        ValueError: If a count is not an integer in ``[0, n_train]``, ``n_train < 3``, or ``a``
            or ``b`` is not a positive finite number.
    """
    for name, value, low in (("n_train", n_train, PROPENSITY_MIN_TRAIN), ("count", count, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if count > n_train:
        raise ValueError(f"count {count} exceeds n_train {n_train}")
    for name, param in (("a", a), ("b", b)):
        if not (math.isfinite(param) and param > 0):
            raise ValueError(f"{name} must be a positive finite number, got {param!r}")
    c = (math.log(n_train) - 1.0) * (b + 1.0) ** a
    return 1.0 + c * (count + b) ** -a


def propensity_scored_precision_at_k(
    gold: Sequence[Collection[str]],
    rankings: Sequence[Sequence[str]],
    k: int,
    label_counts: Mapping[str, int],
    n_train: int,
    a: float = PROPENSITY_A,
    b: float = PROPENSITY_B,
) -> float:
    """Propensity-scored precision at K, PSP@K (Jain, Prabhu and Varma, KDD 2016), normalised.

    Each hit in the top K counts its label's :func:`inverse_propensity` instead of 1, so tail
    labels weigh more. Convention of the XMC repository (``pyxclib``'s ``psprecision``): the
    sum of the weighted hits over all items is divided by the sum over all items of the best
    achievable one (each item's K heaviest gold labels ranked first). It is a ratio of sums,
    not a mean of per-item ratios, and 1 means every item's heaviest gold labels are in its
    top K. Items with empty gold add 0 to both sums.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.
        k: Cut-off, ``>= 1``.
        label_counts: ``N_l``: how many training items carry each label; a label missing
            from the mapping counts 0.
        n_train: ``N``: how many training items there are, ``>= 3``.
        a: Propensity parameter ``A``; 0.55 for generic data.
        b: Propensity parameter ``B``; 1.5 for generic data.

    Returns:
        Normalised PSP@K in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, a ranking has
            duplicates, every gold set is empty, or a count or parameter is invalid (see
            :func:`inverse_propensity`).
        TypeError: If an item is a bare ``str``.
    """
    _check_k(k)
    _check_same_length("gold", gold, "rankings", rankings)
    weights: dict[str, float] = {}

    def weight(label: str) -> float:
        if label not in weights:
            weights[label] = inverse_propensity(label_counts.get(label, 0), n_train, a, b)
        return weights[label]

    scored = best = 0.0
    for g, r in zip(_as_label_sets("gold", gold), _as_rankings("rankings", rankings), strict=True):
        scored += sum(weight(label) for label in r[:k] if label in g)
        best += sum(sorted((weight(label) for label in g), reverse=True)[:k])
    if best == 0.0:
        raise ValueError("every gold set is empty; the metric is undefined")
    return scored / best


def unseen_label_recall_at_k(
    gold: Sequence[Collection[str]],
    rankings: Sequence[Sequence[str]],
    k: int,
    label_counts: Mapping[str, int],
) -> float:
    """Recall at K of the gold labels never seen in training (zero training count).

    Pooled over every (item, gold label) pair whose label has count 0: the share of those
    pairs whose label is in the item's top K. It measures how far labels known only by their
    name and description are reachable. Items without such a gold label add nothing.

    Args:
        gold: Gold label set per item.
        rankings: Per-item labels, best first, without duplicates.
        k: Cut-off, ``>= 1``.
        label_counts: How many training items carry each label; a label missing from the
            mapping counts 0.

    Returns:
        The recall in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty or of different lengths, ``k < 1``, a ranking has
            duplicates, a count is negative, or no gold label has a zero count.
        TypeError: If an item is a bare ``str``.
    """
    _check_k(k)
    _check_same_length("gold", gold, "rankings", rankings)
    hits = total = 0
    for g, r in zip(_as_label_sets("gold", gold), _as_rankings("rankings", rankings), strict=True):
        counts = {label: label_counts.get(label, 0) for label in g}
        if any(c < 0 for c in counts.values()):
            raise ValueError(f"label counts must be non-negative, got {counts}")
        unseen = {label for label, c in counts.items() if c == 0}
        total += len(unseen)
        hits += len(unseen.intersection(r[:k]))
    if total == 0:
        raise ValueError("no gold label has a zero training count; the metric is undefined")
    return hits / total


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def expected_calibration_error(
    confidences: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    n_bins: int = 15,
) -> float:
    """Expected calibration error with equal-width bins.

    Bins split ``[0, 1]`` into ``n_bins`` equal intervals ``(lo, hi]``; the
    first bin also includes 0. ``ECE = sum_b (|B_b| / N) * |acc(B_b) -
    conf(B_b)|`` over non-empty bins.

    Args:
        confidences: Predicted confidence per prediction, in ``[0, 1]``.
        correct: Whether each prediction was correct (bools or 0/1).
        n_bins: Number of bins, ``>= 1``.

    Returns:
        ECE in ``[0, 1]``.

    Raises:
        ValueError: If inputs are empty, not 1-D or of different lengths,
            confidences fall outside ``[0, 1]``, ``correct`` is not boolean,
            or ``n_bins < 1``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    conf = _as_finite_1d("confidences", confidences)
    if np.any((conf < 0.0) | (conf > 1.0)):
        raise ValueError("confidences must lie in [0, 1]")
    corr_raw = np.asarray(correct)
    if corr_raw.shape != conf.shape:
        raise ValueError(
            f"confidences and correct must have the same shape, "
            f"got {conf.shape} and {corr_raw.shape}"
        )
    if corr_raw.dtype != bool and not np.all(np.isin(corr_raw, (0, 1))):
        raise ValueError("correct must contain only booleans or 0/1")
    corr = corr_raw.astype(float)

    # searchsorted(side='left') on the inner edges maps (lo, hi] to one bin
    # and puts 0 into the first bin.
    inner_edges = np.linspace(0.0, 1.0, n_bins + 1)[1:-1]
    bin_idx = np.searchsorted(inner_edges, conf, side="left")
    count = np.bincount(bin_idx, minlength=n_bins)
    conf_sum = np.bincount(bin_idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(bin_idx, weights=corr, minlength=n_bins)
    # |sum(acc) - sum(conf)| / N equals the weighted |acc - conf| per bin.
    return float(np.sum(np.abs(corr_sum - conf_sum)) / count.sum())


def multilabel_ece(
    gold: Sequence[Collection[str]],
    probabilities: Sequence[Mapping[str, float]],
    n_bins: int = 15,
) -> float:
    """ECE over all (item, label) pairs present in the probability dicts.

    Each pair is one binary prediction with confidence ``probabilities[i][label]``
    that is correct iff ``label`` is in ``gold[i]``. Gold labels missing from an
    item's dict are not counted.

    Args:
        gold: Gold label set per item.
        probabilities: Per-item mapping from label to probability in ``[0, 1]``.
        n_bins: Number of equal-width bins, ``>= 1``.

    Returns:
        ECE in ``[0, 1]``, as :func:`expected_calibration_error`.

    Raises:
        ValueError: If inputs are empty or of different lengths, there are no
            (item, label) pairs, or a probability is outside ``[0, 1]``.
        TypeError: If an item is a bare ``str``.
    """
    _check_same_length("gold", gold, "probabilities", probabilities)
    conf: list[float] = []
    corr: list[bool] = []
    for g, probs in zip(_as_label_sets("gold", gold), probabilities, strict=True):
        for label, p in probs.items():
            conf.append(float(p))
            corr.append(label in g)
    if not conf:
        raise ValueError("probabilities contain no (item, label) pairs")
    return expected_calibration_error(conf, corr, n_bins=n_bins)
