"""Tests for icl_cl.metrics: hand-worked examples, sklearn cross-checks, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from icl_cl.metrics import (
    accuracy,
    average_incremental_accuracy,
    backward_transfer,
    expected_calibration_error,
    forgetting,
    inverse_propensity,
    last_accuracy,
    macro_f1,
    mean_average_precision,
    micro_f1,
    multilabel_ece,
    ndcg_at_k,
    precision_at_k,
    propensity_scored_precision_at_k,
    rank_precision_at_k,
    recall_at_k,
    sample_average_precision,
    top_k_accuracy,
    unseen_label_recall_at_k,
)

NAN = math.nan

# R[t, j]: accuracy on session j after training session t.
R_3X3 = [
    [0.9, NAN, NAN],
    [0.7, 0.8, NAN],
    [0.6, 0.75, 0.85],
]

# Here the best earlier accuracy on session 0 is at t=1 (not the diagonal), and
# session 1 improves at the final stage, which must not enter the max.
R_3X3_NONDIAG_MAX = [
    [0.5, NAN, NAN],
    [0.8, 0.6, NAN],
    [0.7, 0.9, 0.4],
]


def _random_multilabel(
    seed: int, n_items: int = 40, n_labels: int = 8
) -> tuple[list[str], list[set[str]], list[set[str]], list[dict[str, float]]]:
    """Random gold sets, predicted sets and partial score dicts."""
    rng = np.random.default_rng(seed)
    labels = [f"l{i}" for i in range(n_labels)]
    gold = [{lab for lab in labels if rng.random() < 0.25} for _ in range(n_items)]
    pred = [{lab for lab in labels if rng.random() < 0.3} for _ in range(n_items)]
    scores = [
        # Rounding to one decimal creates ties; ~20% of labels are left unscored.
        {lab: round(float(rng.random()), 1) for lab in labels if rng.random() < 0.8}
        for _ in range(n_items)
    ]
    return labels, gold, pred, scores


# ---------------------------------------------------------------------------
# Class-incremental
# ---------------------------------------------------------------------------


def test_average_incremental_and_last_accuracy() -> None:
    stages = [0.9, 0.8, 0.7]
    # (0.9 + 0.8 + 0.7) / 3 = 0.8
    assert average_incremental_accuracy(stages) == pytest.approx(0.8)
    assert last_accuracy(stages) == pytest.approx(0.7)
    assert average_incremental_accuracy(np.array([0.5])) == pytest.approx(0.5)
    assert last_accuracy([0.5]) == pytest.approx(0.5)


def test_forgetting_and_bwt_hand_example() -> None:
    # Forgetting: j=0: max(0.9, 0.7) - 0.6 = 0.3; j=1: max(0.8) - 0.75 = 0.05
    #   -> (0.3 + 0.05) / 2 = 0.175
    # BWT: j=0: 0.6 - 0.9 = -0.3; j=1: 0.75 - 0.8 = -0.05 -> -0.175
    assert forgetting(R_3X3) == pytest.approx(0.175)
    assert backward_transfer(R_3X3) == pytest.approx(-0.175)


def test_forgetting_max_excludes_final_stage() -> None:
    # Forgetting: j=0: max(0.5, 0.8) - 0.7 = 0.1; j=1: max(0.6) - 0.9 = -0.3
    #   -> (0.1 - 0.3) / 2 = -0.1   (not clipped; final 0.9 is excluded from max)
    # BWT: j=0: 0.7 - 0.5 = 0.2; j=1: 0.9 - 0.6 = 0.3 -> 0.25
    assert forgetting(R_3X3_NONDIAG_MAX) == pytest.approx(-0.1)
    assert backward_transfer(R_3X3_NONDIAG_MAX) == pytest.approx(0.25)


def test_upper_triangle_is_ignored() -> None:
    r = np.array(R_3X3)
    r[np.triu_indices(3, k=1)] = 123.0
    assert forgetting(r) == pytest.approx(0.175)
    assert backward_transfer(r) == pytest.approx(-0.175)


def test_single_session_is_zero() -> None:
    assert forgetting([[0.7]]) == 0.0
    assert backward_transfer(np.array([[0.7]])) == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 0)),
        np.zeros((2, 3)),
        np.zeros(3),
        np.zeros((2, 2, 2)),
        [[0.9, NAN], [NAN, 0.8]],  # NaN below the diagonal
        [[NAN]],
    ],
)
def test_accuracy_matrix_errors(bad: object) -> None:
    with pytest.raises(ValueError):
        forgetting(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        backward_transfer(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[], [[0.5, 0.6]], [0.5, NAN]])
def test_stage_accuracy_errors(bad: object) -> None:
    with pytest.raises(ValueError):
        average_incremental_accuracy(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        last_accuracy(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Single-label
# ---------------------------------------------------------------------------


def test_accuracy_hand_example() -> None:
    # 3 of 4 match -> 0.75
    assert accuracy(["a", "b", "c", "d"], ["a", "b", "x", "d"]) == pytest.approx(0.75)


def test_top_k_accuracy_hand_example() -> None:
    y = ["a", "b", "c"]
    ranked = [["a", "x"], ["x", "b", "y"], ["x", "y"]]
    # k=1: only item 0 -> 1/3; k=2: items 0, 1 -> 2/3; k=5 (rankings short): 2/3
    assert top_k_accuracy(y, ranked, 1) == pytest.approx(1 / 3)
    assert top_k_accuracy(y, ranked, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy(y, ranked, 5) == pytest.approx(2 / 3)


def test_single_label_errors() -> None:
    with pytest.raises(ValueError):
        accuracy([], [])
    with pytest.raises(ValueError):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        top_k_accuracy(["a"], [["a"]], 0)
    with pytest.raises(ValueError):
        top_k_accuracy(["a"], [["a"], ["b"]], 1)
    with pytest.raises(ValueError):
        top_k_accuracy(["a"], [["a", "a"]], 1)
    with pytest.raises(TypeError):
        top_k_accuracy(["a"], ["ab"], 1)


# ---------------------------------------------------------------------------
# Multi-label F1
# ---------------------------------------------------------------------------

F1_GOLD = [{"a", "b"}, {"b"}, {"c"}]
F1_PRED = [{"a"}, {"b", "c"}, set()]


def test_f1_hand_example() -> None:
    # a: tp=1 fp=0 fn=0 -> F1 1
    # b: tp=1 fp=0 fn=1 -> 2/(2+1) = 2/3
    # c: tp=0 fp=1 fn=1 -> 0
    # macro = (1 + 2/3 + 0) / 3 = 5/9
    # micro: tp=2 fp=1 fn=2 -> 4 / (4 + 3) = 4/7
    assert macro_f1(F1_GOLD, F1_PRED) == pytest.approx(5 / 9)
    assert micro_f1(F1_GOLD, F1_PRED) == pytest.approx(4 / 7)
    # Extra label "d" with no gold and no pred positives scores 0: (5/3) / 4 = 5/12
    assert macro_f1(F1_GOLD, F1_PRED, labels=["a", "b", "c", "d"]) == pytest.approx(5 / 12)
    # Restricting to ["a", "b"]: (1 + 2/3) / 2 = 5/6
    assert macro_f1(F1_GOLD, F1_PRED, labels=["a", "b"]) == pytest.approx(5 / 6)


def test_micro_f1_all_empty_is_zero() -> None:
    assert micro_f1([set(), set()], [set(), set()]) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_f1_matches_sklearn(seed: int) -> None:
    labels, gold, pred, _ = _random_multilabel(seed)
    extra = [*labels, "never_seen"]
    mlb = MultiLabelBinarizer(classes=extra)
    y_true, y_pred = mlb.fit_transform(gold), mlb.transform(pred)
    assert micro_f1(gold, pred) == pytest.approx(
        f1_score(y_true, y_pred, average="micro", zero_division=0)
    )
    assert macro_f1(gold, pred, labels=extra) == pytest.approx(
        f1_score(y_true, y_pred, average="macro", zero_division=0)
    )
    # Default label set = union of labels in gold or pred.
    seen = sorted(set().union(*gold, *pred))
    mlb_seen = MultiLabelBinarizer(classes=seen)
    assert macro_f1(gold, pred) == pytest.approx(
        f1_score(
            mlb_seen.fit_transform(gold),
            mlb_seen.transform(pred),
            average="macro",
            zero_division=0,
        )
    )


def test_f1_errors() -> None:
    with pytest.raises(ValueError):
        micro_f1([], [])
    with pytest.raises(ValueError):
        macro_f1([{"a"}], [{"a"}, set()])
    with pytest.raises(ValueError):
        macro_f1([set()], [set()])  # no labels to average over
    with pytest.raises(ValueError):
        macro_f1([{"a"}], [{"a"}], labels=["a", "a"])
    with pytest.raises(ValueError):
        macro_f1([{"a"}], [{"a"}], labels=[])
    with pytest.raises(TypeError):
        micro_f1(["ab"], [{"a"}])


# ---------------------------------------------------------------------------
# Multi-label ranking
# ---------------------------------------------------------------------------

RANK_GOLD = [{"a", "b", "c"}, {"d"}, set()]
RANKINGS = [["a", "x", "b", "y"], ["y", "d"], ["z"]]


def test_rank_precision_at_k_hand_example() -> None:
    # k=2: item0 top2 {a, x}: 1 hit / min(2, 3) = 1/2; item1 {y, d}: 1 / min(2, 1) = 1
    #   item2 has empty gold -> skipped; mean = 0.75
    assert rank_precision_at_k(RANK_GOLD, RANKINGS, 2) == pytest.approx(0.75)
    # k=3: item0 2 hits / 3; item1 1 / 1 -> (2/3 + 1) / 2 = 5/6
    assert rank_precision_at_k(RANK_GOLD, RANKINGS, 3) == pytest.approx(5 / 6)


def test_precision_at_k_hand_example() -> None:
    # k=2: item0 1/2, item1 1/2, item2 (empty gold) 0/2 -> 1/3
    assert precision_at_k(RANK_GOLD, RANKINGS, 2) == pytest.approx(1 / 3)
    # k=1: item0 1, item1 0, item2 0 -> 1/3
    assert precision_at_k(RANK_GOLD, RANKINGS, 1) == pytest.approx(1 / 3)


def test_recall_at_k_hand_example() -> None:
    # k=2: item0 1/3, item1 1/1, item2 skipped -> 2/3
    assert recall_at_k(RANK_GOLD, RANKINGS, 2) == pytest.approx(2 / 3)
    # k=10: item0 2/3 (c never ranked), item1 1 -> 5/6
    assert recall_at_k(RANK_GOLD, RANKINGS, 10) == pytest.approx(5 / 6)


def test_sample_average_precision_hand_example() -> None:
    # item0 gold {a, b}, ranking [a, x, b]: hits at 1 (P=1) and 3 (P=2/3)
    #   -> (1 + 2/3) / 2 = 5/6
    # item1 gold {c}, ranking [x, y, c]: hit at 3 (P=1/3) -> 1/3
    # item2 gold {} -> skipped; mean = (5/6 + 1/3) / 2 = 7/12
    gold = [{"a", "b"}, {"c"}, set()]
    rankings = [["a", "x", "b"], ["x", "y", "c"], ["a"]]
    assert sample_average_precision(gold, rankings) == pytest.approx(7 / 12)
    # Unranked gold label contributes 0: gold {a, b}, ranking [a] -> 1/2
    assert sample_average_precision([{"a", "b"}], [["a"]]) == pytest.approx(0.5)


def test_ranking_errors() -> None:
    for fn in (rank_precision_at_k, precision_at_k, recall_at_k):
        with pytest.raises(ValueError):
            fn([], [], 1)
        with pytest.raises(ValueError):
            fn([{"a"}], [["a"], ["b"]], 1)
        with pytest.raises(ValueError):
            fn([{"a"}], [["a"]], 0)
        with pytest.raises(ValueError):
            fn([{"a"}], [["a", "a"]], 1)
        with pytest.raises(TypeError):
            fn([{"a"}], ["ab"], 1)
    # All gold sets empty: undefined for metrics that skip empty gold.
    with pytest.raises(ValueError):
        rank_precision_at_k([set()], [["a"]], 1)
    with pytest.raises(ValueError):
        recall_at_k([set()], [["a"]], 1)
    with pytest.raises(ValueError):
        sample_average_precision([set()], [["a"]])
    with pytest.raises(ValueError):
        sample_average_precision([], [])
    # P@K is defined even with empty gold.
    assert precision_at_k([set()], [["a"]], 1) == 0.0


# ---------------------------------------------------------------------------
# Extreme classification (long tail)
# ---------------------------------------------------------------------------


def test_ndcg_at_k_hand_example() -> None:
    # Discounts 1/log2(i + 1): rank 1 -> 1, rank 2 -> 1/log2(3) = 0.63093, rank 3 -> 1/2.
    d2 = 1 / math.log2(3)
    # k=2: item0 hit at rank 1, ideal 2 hits -> 1 / (1 + d2) = 0.61315;
    #   item1 hit at rank 2, ideal 1 hit -> d2 / 1 = 0.63093; item2 (empty gold) skipped.
    assert ndcg_at_k(RANK_GOLD, RANKINGS, 2) == pytest.approx((1 / (1 + d2) + d2) / 2)
    assert ndcg_at_k(RANK_GOLD, RANKINGS, 2) == pytest.approx(0.622038, abs=1e-6)
    # k=3: item0 hits at ranks 1 and 3 -> 1.5 / (1 + d2 + 1/2) = 0.70392; item1 as before.
    assert ndcg_at_k(RANK_GOLD, RANKINGS, 3) == pytest.approx((1.5 / (1.5 + d2) + d2) / 2)
    # Gold labels ranked first in any order: 1; one hit at rank 3 of 5: 1/log2(4) = 1/2.
    assert ndcg_at_k([{"a", "b"}], [["b", "a", "x"]], 5) == pytest.approx(1.0)
    assert ndcg_at_k([{"a"}], [["x", "y", "a"]], 5) == pytest.approx(0.5)
    assert ndcg_at_k([{"a"}], [["x", "y", "a"]], 2) == 0.0


def test_inverse_propensity_hand_values() -> None:
    # 1/p = 1 + C (N_l + B)^-A with C = (ln N - 1)(B + 1)^A.
    # N_l = 1: (N_l + B) = B + 1, so 1/p = 1 + (ln N - 1) = ln N, whatever A.
    assert inverse_propensity(1, 100) == pytest.approx(math.log(100))
    assert inverse_propensity(1, 100, a=0.9) == pytest.approx(math.log(100))
    # N_l = 0, N = 100: 1 + 3.6051702 * (2.5 / 1.5)^0.55 = 1 + 3.6051702 * 1.3243928 = 5.774661
    assert inverse_propensity(0, 100) == pytest.approx(5.774661, abs=1e-6)
    # N_l = 5: 1 + 3.6051702 * (2.5 / 6.5)^0.55 = 1 + 3.6051702 * 0.5912412 = 3.131525
    assert inverse_propensity(5, 100) == pytest.approx(3.131525, abs=1e-6)
    # A = 1, B = 1, N = 20, N_l = 3: 1 + 2 (ln 20 - 1) / 4 = 1 + 1.995732 / 2 = 1.997866
    assert inverse_propensity(3, 20, a=1.0, b=1.0) == pytest.approx(1.997866, abs=1e-6)
    # The rarer, the heavier; the most frequent label weighs least but still at least 1.
    weights = [inverse_propensity(n, 1000) for n in (0, 1, 10, 100, 1000)]
    assert weights == sorted(weights, reverse=True) and weights[-1] > 1.0


@pytest.mark.parametrize(
    "count, n_train, a, b",
    [
        (-1, 100, 0.55, 1.5),  # negative count
        (101, 100, 0.55, 1.5),  # more than the training items
        (0, 2, 0.55, 1.5),  # log N - 1 < 0
        (True, 100, 0.55, 1.5),  # a bool is not a count
        (1.0, 100, 0.55, 1.5),  # nor a float
        (0, 100, 0.0, 1.5),
        (0, 100, 0.55, -1.0),
        (0, 100, 0.55, math.nan),
    ],
)
def test_inverse_propensity_errors(count: object, n_train: int, a: float, b: float) -> None:
    with pytest.raises(ValueError):
        inverse_propensity(count, n_train, a, b)  # type: ignore[arg-type]


def test_psp_at_k_hand_example() -> None:
    # N = 100; counts a: 0, b: 5, c: 1 -> weights a 5.774661, b 3.131525, c ln 100 = 4.605170.
    wa, wb, wc = 5.774661, 3.131525, math.log(100)
    gold = [{"a", "b"}, {"c"}, set()]
    rankings = [["b", "x"], ["y", "c"], ["a"]]
    counts = {"b": 5, "c": 1}  # a is missing: count 0
    # k=1: hits b (item0) only; best per item: the heaviest gold label (a; c; nothing).
    #   w_b / (w_a + w_c) = 3.131525 / 10.379831 = 0.301693, a ratio of sums: the mean of
    #   per-item ratios would be (w_b / w_a + 0) / 2 = 0.271144.
    got = propensity_scored_precision_at_k(gold, rankings, 1, counts, 100)
    assert got == pytest.approx(wb / (wa + wc), abs=1e-6)
    assert got == pytest.approx(0.301693, abs=1e-6)
    # k=2: hits b and c; best: a + b, and c -> (w_b + w_c) / (w_a + w_b + w_c) = 0.572607
    got = propensity_scored_precision_at_k(gold, rankings, 2, counts, 100)
    assert got == pytest.approx((wb + wc) / (wa + wb + wc), abs=1e-6)
    # Every gold label ranked first: 1.
    best = propensity_scored_precision_at_k(gold, [["a", "b"], ["c"], []], 2, counts, 100)
    assert best == pytest.approx(1.0)


def test_psp_with_equal_counts_is_pooled_precision() -> None:
    # Equal weights cancel: hits over the best achievable count, pooled over items.
    # k=2: hits 1 (item0) + 1 (item1) = 2; best min(2, 3) + min(2, 1) = 3 -> 2/3.
    counts = {label: 4 for label in "abcdxyz"}
    got = propensity_scored_precision_at_k(RANK_GOLD, RANKINGS, 2, counts, 50)
    assert got == pytest.approx(2 / 3)


def test_psp_errors() -> None:
    with pytest.raises(ValueError):
        propensity_scored_precision_at_k([set()], [["a"]], 1, {}, 100)
    with pytest.raises(ValueError):
        propensity_scored_precision_at_k([{"a"}], [["a"]], 1, {"a": 200}, 100)
    with pytest.raises(ValueError):
        propensity_scored_precision_at_k([{"a"}], [["a"]], 0, {}, 100)
    with pytest.raises(ValueError):
        propensity_scored_precision_at_k([{"a"}], [["a"], ["b"]], 1, {}, 100)
    with pytest.raises(TypeError):
        propensity_scored_precision_at_k(["a"], [["a"]], 1, {}, 100)


def test_unseen_label_recall_hand_example() -> None:
    # Unseen gold labels (count 0 or absent): u1 (item0), u2 (item1), u3 (item2).
    gold = [{"a", "u1"}, {"u2", "b"}, {"u3"}, {"a"}]
    rankings = [["u1", "a"], ["b", "x"], ["y", "z", "u3"], ["a"]]
    counts = {"a": 3, "b": 1, "u3": 0}
    # k=2: u1 in item0's top 2; u2 never ranked; u3 at rank 3 -> 1/3. Seen labels don't count.
    assert unseen_label_recall_at_k(gold, rankings, 2, counts) == pytest.approx(1 / 3)
    # k=3: u3 now in -> 2/3
    assert unseen_label_recall_at_k(gold, rankings, 3, counts) == pytest.approx(2 / 3)


def test_unseen_label_recall_errors() -> None:
    with pytest.raises(ValueError, match="zero training count"):
        unseen_label_recall_at_k([{"a"}], [["a"]], 10, {"a": 2})
    with pytest.raises(ValueError):
        unseen_label_recall_at_k([{"a"}], [["a"]], 10, {"a": -1})
    with pytest.raises(ValueError):
        unseen_label_recall_at_k([{"a"}], [["a", "a"]], 10, {})
    with pytest.raises(TypeError):
        unseen_label_recall_at_k(["a"], [["a"]], 10, {})


# ---------------------------------------------------------------------------
# Label-wise mAP
# ---------------------------------------------------------------------------


def test_mean_average_precision_hand_example() -> None:
    gold = [{"a"}, {"a", "b"}, set()]
    scores = [{"a": 0.9, "b": 0.1}, {"a": 0.3, "b": 0.8}, {"a": 0.5}]
    # a: ranked 0.9(+), 0.5(-), 0.3(+) -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6
    # b: ranked 0.8(+), 0.1(-), -inf(-) -> AP = 1
    # c: no positives -> skipped; mAP = (5/6 + 1) / 2 = 11/12
    assert mean_average_precision(gold, scores, ["a", "b", "c"]) == pytest.approx(11 / 12)


def test_mean_average_precision_ties_and_missing() -> None:
    # Tie: both items score 0.5, one positive -> one threshold, P = 1/2, AP = 1/2.
    tied = mean_average_precision([{"a"}, set()], [{"a": 0.5}, {"a": 0.5}], ["a"])
    assert tied == pytest.approx(0.5)
    # Positive unscored (-inf) is ranked last: order (-), (+) -> AP = 1/2.
    assert mean_average_precision([set(), {"a"}], [{"a": 0.1}, {}], ["a"]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_mean_average_precision_matches_sklearn(seed: int) -> None:
    labels, gold, _, scores = _random_multilabel(seed)
    y_true = MultiLabelBinarizer(classes=labels).fit_transform(gold)
    # Scores lie in [0, 1], so -1 plays the role of -inf for missing labels.
    y_score = np.array([[d.get(lab, -1.0) for lab in labels] for d in scores])
    has_pos = y_true.sum(axis=0) > 0
    expected = average_precision_score(y_true[:, has_pos], y_score[:, has_pos], average="macro")
    assert mean_average_precision(gold, scores, labels) == pytest.approx(expected)


def test_mean_average_precision_errors() -> None:
    with pytest.raises(ValueError):
        mean_average_precision([], [], ["a"])
    with pytest.raises(ValueError):
        mean_average_precision([{"a"}], [{"a": 1.0}, {}], ["a"])
    with pytest.raises(ValueError):
        mean_average_precision([{"a"}], [{"a": 1.0}], [])
    with pytest.raises(ValueError):
        mean_average_precision([{"a"}], [{"a": 1.0}], ["a", "a"])
    with pytest.raises(ValueError):
        mean_average_precision([set()], [{"a": 1.0}], ["a"])  # no positives
    with pytest.raises(ValueError):
        mean_average_precision([{"a"}], [{"a": NAN}], ["a"])
    with pytest.raises(TypeError):
        mean_average_precision([{"a"}], [{"a": 1.0}], "a")


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def test_ece_hand_example() -> None:
    conf = [0.1, 0.2, 0.9, 0.95, 0.5]
    correct = [False, True, True, False, True]
    # n_bins=2, bins [0, 0.5] and (0.5, 1]:
    # bin0 {0.1, 0.2, 0.5}: conf 0.8/3, acc 2/3 -> |diff| = 0.4, weight 3/5 -> 0.24
    # bin1 {0.9, 0.95}: conf 0.925, acc 1/2 -> |diff| = 0.425, weight 2/5 -> 0.17
    # ECE = 0.41
    assert expected_calibration_error(conf, correct, n_bins=2) == pytest.approx(0.41)
    # One bin: conf mean 2.65/5 = 0.53, acc 3/5 = 0.6 -> 0.07
    assert expected_calibration_error(conf, correct, n_bins=1) == pytest.approx(0.07)


def test_ece_bin_edges() -> None:
    # 0.5 belongs to the first of two bins (right-closed intervals):
    # bin0 {0.5 correct}: 0.5 * |1 - 0.5| = 0.25; bin1 {0.6 wrong}: 0.5 * 0.6 = 0.3
    # -> 0.55 (it would be 0.05 if 0.5 were in bin1)
    assert expected_calibration_error(
        np.array([0.5, 0.6]), np.array([True, False]), n_bins=2
    ) == pytest.approx(0.55)
    # 0 goes to the first bin and 1 to the last; both perfectly calibrated.
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == pytest.approx(0.0)


def test_multilabel_ece_hand_example() -> None:
    gold = [{"a"}, {"b"}]
    probs = [{"a": 0.9, "b": 0.2}, {"a": 0.4, "b": 0.6}]
    # pairs: (0.9, T) (0.2, F) (0.4, F) (0.6, T); n_bins=2
    # bin0 {0.2, 0.4}: conf 0.3, acc 0 -> 0.3 * 2/4 = 0.15
    # bin1 {0.9, 0.6}: conf 0.75, acc 1 -> 0.25 * 2/4 = 0.125
    # ECE = 0.275
    assert multilabel_ece(gold, probs, n_bins=2) == pytest.approx(0.275)


def test_ece_errors() -> None:
    with pytest.raises(ValueError):
        expected_calibration_error([], [])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True, False])
    with pytest.raises(ValueError):
        expected_calibration_error([1.5], [True])
    with pytest.raises(ValueError):
        expected_calibration_error([-0.1], [True])
    with pytest.raises(ValueError):
        expected_calibration_error([NAN], [True])
    with pytest.raises(ValueError):
        expected_calibration_error([[0.5]], [[True]])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [2])
    with pytest.raises(ValueError):
        expected_calibration_error([0.5], [True], n_bins=0)
    with pytest.raises(ValueError):
        multilabel_ece([], [])
    with pytest.raises(ValueError):
        multilabel_ece([{"a"}], [{}])  # no (item, label) pairs
    with pytest.raises(ValueError):
        multilabel_ece([{"a"}], [{"a": 0.5}, {"a": 0.5}])
    with pytest.raises(ValueError):
        multilabel_ece([{"a"}], [{"a": 1.2}])
