"""Calibrators against hand-worked examples, and conformal coverage on synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from icl_cl.heads import PlattScaling, ScoreCalibrator, SplitConformal, TemperatureScaling
from icl_cl.reading.option_bias import OptionBias, domain_strings


def test_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(4000, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    # Scores that are the true logits times 4: the fitted temperature must undo the factor.
    fitted = TemperatureScaling().fit(4 * logits, labels)
    assert fitted.temperature == pytest.approx(4.0, rel=0.08)
    np.testing.assert_allclose(fitted.transform(4 * logits).sum(1), 1.0)


def test_temperature_skips_rows_without_gold_and_refuses_none():
    scores = np.array([[2.0, 1.0], [0.0, 3.0]])
    TemperatureScaling().fit(scores, np.array([0, -1]))
    with pytest.raises(ValueError):
        TemperatureScaling().fit(scores, np.array([-1, -1]))


def test_platt_by_hand():
    # Perfectly ordered scores: the fitted map is increasing and crosses 0.5 between the classes.
    scores = np.array([-2.0, -1.0, 1.0, 2.0])
    p = PlattScaling().fit(scores, np.array([0, 0, 1, 1])).transform(scores)
    assert np.all(np.diff(p) > 0) and p[1] < 0.5 < p[2]
    with pytest.raises(ValueError):
        PlattScaling().fit(scores, np.array([0, 2, 1, 1]))


def test_conformal_threshold_by_hand():
    # Gold probabilities 0.9, 0.8, 0.6, 0.3 -> scores 0.1, 0.2, 0.4, 0.7; alpha = 0.25, n = 4:
    # rank = ceil(5 * 0.75) = 4 -> threshold 0.7, so labels with p >= 0.3 enter the set.
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.7, 0.3]])
    conf = SplitConformal(alpha=0.25).fit(p, np.array([0, 0, 1, 1]))
    assert conf.threshold() == pytest.approx(0.7)
    sets = conf.predict_sets(np.array([[0.65, 0.35], [0.75, 0.25]]))
    assert sets[0].tolist() == [0, 1] and sets[1].tolist() == [0]


@pytest.mark.parametrize("seed", range(20))
def test_conformal_coverage_on_known_distributions(seed):
    rng = np.random.default_rng(seed)
    k, n_cal, n_test, alpha = 6, 1000, 2000, 0.1

    def draw(n):
        logits = rng.normal(scale=2.0, size=(n, k))
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        labels = np.array([rng.choice(k, p=p) for p in probs])
        return probs, labels

    cal_p, cal_y = draw(n_cal)
    test_p, test_y = draw(n_test)
    conf = SplitConformal(alpha).fit(cal_p, cal_y)
    covered = np.mean([y in s for s, y in zip(conf.predict_sets(test_p), test_y, strict=True)])
    # Marginal coverage is at least 1 - alpha in expectation; allow sampling noise of ~3 sd.
    assert 0.875 <= covered <= 0.94


# ---- in-context calibration ------------------------------------------------------------------


def test_contextual_bias_is_divided_out_by_hand():
    # Two content-free rows average to p_cf = [0.5, 0.25, 0.25]; the input's p = [0.6, 0.3, 0.1]
    # becomes q ∝ [1.2, 1.2, 0.4] = [3/7, 3/7, 1/7].
    options = [["a", "b", "c"]]
    cf = np.log(np.array([[0.6, 0.2, 0.2], [0.4, 0.3, 0.3]]))
    bias = OptionBias().fit(cf, options * 2)
    assert bias.bias == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    q = np.exp(bias.transform(np.log([[0.6, 0.3, 0.1]]), options))
    np.testing.assert_allclose(q, [[3 / 7, 3 / 7, 1 / 7]])


def test_batch_bias_over_rows_with_different_candidates_by_hand():
    # Row A shows {x: .8, y: .2}, row B {x: .6, z: .4}; one uniform pseudo-row per label:
    # bias x = (1.4 + 0.5) / 3, y = (0.2 + 0.5) / 2, z = (0.4 + 0.5) / 2.
    options = [["x", "y"], ["x", "z"]]
    scores = np.log([[0.8, 0.2], [0.6, 0.4]])
    bias = OptionBias(prior_count=1.0).fit(scores, options)
    assert bias.bias == pytest.approx({"x": 1.9 / 3, "y": 0.35, "z": 0.45})
    q = np.exp(bias.transform(scores[:1], options[:1]))[0]
    expected = np.array([0.8 / (1.9 / 3), 0.2 / 0.35])
    np.testing.assert_allclose(q, expected / expected.sum())


def test_calibration_keeps_dropped_candidates_out():
    scores = np.array([[np.log(0.5), -np.inf, np.log(0.5)]])
    out = (
        OptionBias()
        .fit(np.log([[0.8, 0.1, 0.1]]), [["a", "b", "c"]])
        .transform(scores, [["a", "b", "c"]])
    )
    assert out[0, 1] == -np.inf and np.exp(out[0, [0, 2]]).sum() == pytest.approx(1.0)
    # A row with nothing to score stays empty instead of turning into NaN.
    assert np.all(OptionBias().transform(np.full((1, 2), -np.inf), [["a", "b"]]) == -np.inf)


def test_domain_strings_are_random_in_domain_words_of_average_length():
    texts = ["red apple pie", "green pear", "blue plum tart jam"]  # 9 words / 3 texts = 3
    strings = domain_strings(texts, 5, seed=1)
    vocabulary = {w for t in texts for w in t.split()}
    assert len(strings) == 5 and all(len(s.split()) == 3 for s in strings)
    assert all(set(s.split()) <= vocabulary for s in strings)
    assert strings == domain_strings(texts, 5, seed=1) and len(set(strings)) > 1


# ---- probabilities and sets ------------------------------------------------------------------


def test_temperature_with_outside_mass_learns_how_often_gold_is_missing():
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(4000, 5))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in probs])
    labels[rng.random(4000) < 0.2] = -1  # a fifth of the time the gold label is not a candidate
    model = TemperatureScaling(outside=True).fit(logits, labels)
    p = model.transform(logits)
    assert p.sum(1).mean() == pytest.approx(0.8, abs=0.03)
    assert model.temperature == pytest.approx(1.0, rel=0.15)


def test_multilabel_conformal_covers_every_gold_label_by_hand():
    # Non-conformity = 1 - min p over gold: rows give 0.2, 0.5, 0.1, 1.0 (a gold label outside).
    p = np.array([[0.9, 0.8, 0.1], [0.5, 0.9, 0.2], [0.95, 0.1, 0.9], [0.7, 0.2, 0.1]])
    gold = [[0, 1], [0, 1], [0, 2], [0, -1]]
    conf = SplitConformal().fit(p, gold)
    assert conf.scores.tolist() == pytest.approx([0.1, 0.2, 0.5, 1.0])
    # alpha = 0.4, n = 4: rank ceil(5 * 0.6) = 3 -> threshold 0.5: labels with p >= 0.5.
    assert conf.threshold(0.4) == pytest.approx(0.5)
    assert conf.predict_sets(np.array([[0.6, 0.5, 0.4]]), alpha=0.4)[0].tolist() == [0, 1]


@pytest.mark.parametrize("multi_label", [False, True])
def test_score_calibrator_round_trips_through_its_stored_form(multi_label):
    rng = np.random.default_rng(1)
    scores = [rng.normal(size=4) for _ in range(300)]
    gold = [[int(np.argmax(s + rng.normal(size=4)))] for s in scores]
    fitted = ScoreCalibrator.fit(scores, gold, multi_label)
    again = ScoreCalibrator.from_dict(json.loads(json.dumps(fitted.to_dict())))
    test = rng.normal(size=(5, 4))
    np.testing.assert_allclose(fitted.probabilities(test), again.probabilities(test))
    assert [s.tolist() for s in fitted.sets(fitted.probabilities(test), 0.9)] == [
        s.tolist() for s in again.sets(again.probabilities(test), 0.9)
    ]
    if not multi_label:
        assert np.all(fitted.probabilities(test).sum(1) <= 1 + 1e-9)


def test_multilabel_conformal_can_cover_each_gold_label_by_hand():
    # One score per (item, gold label): 0.1, 0.2 | 0.5, 0.1 | 0.05, 0.1 | 0.3, 1.0 (outside).
    p = np.array([[0.9, 0.8, 0.1], [0.5, 0.9, 0.2], [0.95, 0.1, 0.9], [0.7, 0.2, 0.1]])
    gold = [[0, 1], [0, 1], [0, 2], [0, -1]]
    conf = SplitConformal(cover="each").fit(p, gold)
    assert conf.scores.tolist() == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.2, 0.3, 0.5, 1.0])
    # alpha = 0.25, n = 8: rank ceil(9 * 0.75) = 7 -> threshold 0.5.
    assert conf.threshold(0.25) == pytest.approx(0.5)


def test_gap_exponent_is_fitted_only_on_enough_heldout_items():
    # True probabilities follow a gap exponent of 0.5: with plenty of items the fit finds it;
    # with few, the calibrator keeps the exponent at 1 (plain temperature) instead of overfitting.
    from icl_cl.heads.calibrator import MIN_ITEMS_FOR_EXPONENT

    rng = np.random.default_rng(2)
    scores = rng.normal(scale=2.0, size=(3000, 5))
    gap = scores.max(1, keepdims=True) - scores
    probs = np.exp(-np.sqrt(gap)) / np.exp(-np.sqrt(gap)).sum(1, keepdims=True)
    gold = [[int(rng.choice(5, p=p))] for p in probs]
    many = ScoreCalibrator.fit(list(scores), gold, multi_label=False)
    assert many.model.power == pytest.approx(0.5, abs=0.1)
    few = ScoreCalibrator.fit(
        list(scores[: MIN_ITEMS_FOR_EXPONENT - 1]), gold[: MIN_ITEMS_FOR_EXPONENT - 1], False
    )
    assert few.model.power == 1.0 and not few.model.exponent
