"""Calibrators against hand-worked examples, and conformal coverage on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl.calibration import PlattScaling, SplitConformal, TemperatureScaling


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
    assert conf.threshold == pytest.approx(0.7)
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
