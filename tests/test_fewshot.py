"""Few-shot labels: the few-shot protocol's sessions and metrics, and TEEN prototype calibration."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from icl_cl import ContinualClassifier, metrics
from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.errors import ConfigError
from icl_cl.evaluation.outputs import Decision
from icl_cl.evaluation.protocol import EvalConfig, _base_and_novel, run_protocol
from icl_cl.evaluation.sessions import (
    SessionSpec,
    session_examples,
    session_streams,
    split_sessions,
)
from icl_cl.memory.few_shot_prototypes import calibrated_means
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.types import Example
from tests.conftest import SAMPLES


def _streams(train, labels, shots, seed=0, n=3):
    spec = SessionSpec(by="random", n=n, seed=seed, shots=shots)
    sessions = split_sessions(spec, labels, train)
    return sessions, session_streams(spec, sessions, train)


@pytest.mark.parametrize("dataset", ["wordnet", "debtags"])
def test_few_shot_sessions_keep_the_base_whole_and_at_most_shots_per_new_label(dataset, request):
    train, _, labels = request.getfixturevalue(dataset)
    sessions, streams = _streams(train, labels, shots=3)
    assert streams[0] == session_examples(train, sessions[0], 1)  # the base learns everything
    for t, (labs, stream) in enumerate(zip(sessions[1:], streams[1:], strict=True), start=2):
        shown = Counter(lab for ex in stream for lab in ex.labels)
        available = Counter(lab for ex in session_examples(train, labs, t) for lab in ex.labels)
        assert set(shown) == set(labs)
        assert all(shown[lab] == min(3, available[lab]) for lab in labs), shown
        assert len({ex.id for ex in stream}) == len(stream)


def test_few_shot_draw_is_set_by_the_seed(wordnet):
    train, _, labels = wordnet
    ids = lambda streams: [[ex.id for ex in s] for s in streams]  # noqa: E731
    assert ids(_streams(train, labels, 2, seed=4)[1]) == ids(_streams(train, labels, 2, seed=4)[1])
    assert ids(_streams(train, labels, 2, seed=4)[1]) != ids(_streams(train, labels, 2, seed=5)[1])
    # Without shots, the protocol is the plain class-incremental one.
    spec = SessionSpec(by="random", n=3, seed=4)
    sessions = split_sessions(spec, labels, train)
    plain = [session_examples(train, labs, t + 1) for t, labs in enumerate(sessions)]
    assert session_streams(spec, sessions, train) == plain


@pytest.mark.parametrize("shots", [0, -2])
def test_shots_must_be_positive(shots):
    with pytest.raises(ConfigError, match="shots"):
        EvalConfig.from_dict(
            {
                "name": "t",
                "dataset": {"path": "x"},
                "sessions": {"by": "random", "n": 2, "shots": shots},
                "methods": [{"name": "ecl", "scorer": "ncm"}],
            }
        )


def test_harmonic_mean_of_base_and_novel_accuracy():
    assert metrics.harmonic_mean(0.8, 0.4) == pytest.approx(2 * 0.8 * 0.4 / 1.2)
    assert metrics.harmonic_mean(0.0, 0.0) == 0.0
    assert np.isnan(metrics.harmonic_mean(0.5, float("nan")))
    with pytest.raises(ValueError):
        metrics.harmonic_mean(1.5, 0.2)
    # Base labels a, b; novel labels c, d (two later sessions). 3 of 4 base items right, 1 of 2
    # novel items right.
    gold = ["a", "a", "b", "b", "c", "d"]
    said = ["a", "a", "b", "c", "c", "a"]
    items = [Example(str(i), "x", [g]) for i, g in enumerate(gold)]
    decisions = [Decision((s,), (s,), (1.0,)) for s in said]
    out = _base_and_novel(items, decisions, [["a", "b"], ["c"], ["d"]], False, 1)
    assert out == {
        "base_accuracy": 0.75,
        "novel_accuracy": 0.5,
        "harmonic_mean": pytest.approx(0.6),
    }
    assert _base_and_novel(items, decisions, [["a", "b"]], False, 1) == {"base_accuracy": 0.75}


def _toy_stats() -> RunningStatistics:
    """Populated labels A (around e1) and B (around e2) with 20 examples each, few-shot C (two
    examples nearer e1 than e2), and D with no example."""
    rng = np.random.default_rng(0)
    stats = RunningStatistics(3)
    e1, e2 = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    a = e1 + 0.05 * rng.standard_normal((20, 3))
    b = e2 + 0.05 * rng.standard_normal((20, 3))
    c = np.array([[0.6, 0.1, 0.8], [0.7, 0.2, 0.6]])
    x = np.vstack([a, b, c])
    stats.apply(stats.delta(x, [["A"]] * 20 + [["B"]] * 20 + [["C"]] * 2))
    stats.add_label("D")
    return stats


def test_calibration_pulls_a_few_shot_mean_towards_its_nearest_populated_label():
    stats = _toy_stats()
    means = stats.means()
    out = calibrated_means(stats, max_examples=10, alpha=0.5, tau=16.0)
    a, b, c, d = (stats.col[x] for x in "ABCD")
    np.testing.assert_array_equal(out[[a, b, d]], means[[a, b, d]])  # only C moves
    assert np.linalg.norm(out[c] - means[a]) < np.linalg.norm(means[c] - means[a])
    assert np.linalg.norm(out[c] - means[a]) < np.linalg.norm(out[c] - means[b])
    # The formula, by hand.
    unit = means[[a, b, c]] / np.linalg.norm(means[[a, b, c]], axis=1, keepdims=True)
    w = np.exp(16.0 * (unit[:2] @ unit[2]))
    w /= w.sum()
    np.testing.assert_allclose(out[c], 0.5 * means[c] + 0.5 * (w @ means[[a, b]]))
    # A threshold below C's count, or alpha 1, leaves every mean as it was.
    np.testing.assert_array_equal(calibrated_means(stats, 1, 0.5, 16.0), means)
    np.testing.assert_array_equal(calibrated_means(stats, 10, 1.0, 16.0), means)


def test_calibrated_scorers_rank_a_few_shot_label_by_its_pulled_mean():
    from icl_cl.memory.scorers import build_scorer

    stats = _toy_stats()
    query = np.array([[0.9, 0.0, 0.45]], np.float32)
    query /= np.linalg.norm(query)
    c = stats.col["C"]
    for name in ("ncm", "mahalanobis"):
        plain = build_scorer(name, stats, MemoryConfig(teen_max_examples=0), None, None)  # type: ignore[arg-type]
        pulled = build_scorer(name, stats, MemoryConfig(teen_alpha=0.5), None, None)  # type: ignore[arg-type]
        s0, s1 = plain.scores(query)[0], pulled.scores(query)[0]
        assert s0[c] != s1[c], name
        populated = [stats.col["A"], stats.col["B"]]
        np.testing.assert_array_equal(s0[populated], s1[populated])
        assert s1[stats.col["D"]] == -np.inf  # no example: still never a candidate


def test_calibrated_scores_stay_exactly_incremental(tmp_path, embedder, wordnet):
    train, test, labels = wordnet
    sessions, streams = _streams(train, labels, shots=3, seed=1)
    config = ClassifierConfig(memory=MemoryConfig(teen_max_examples=10, teen_alpha=0.5))
    inc = ContinualClassifier.open(tmp_path / "inc", config, embedder=embedder)
    for labs, stream in zip(sessions, streams, strict=True):
        inc.learn(stream, [lab for lab in labels if lab.label in set(labs)], fit=False)
    joint = ContinualClassifier.open(tmp_path / "joint", config, embedder=embedder)
    joint.learn([ex for s in streams for ex in s], labels, fit=False)
    counts = inc.memory.stats.counts
    assert (counts <= 3).any() and (counts > 10).any()  # calibration is at work
    queries = embedder.encode([ex.text for ex in test])
    for scorer in ("ncm", "mahalanobis", "klda"):
        np.testing.assert_allclose(
            inc.memory.score_matrix(queries, scorer),
            joint.memory.score_matrix(queries, scorer),
            rtol=1e-4,
            atol=1e-4,
            err_msg=scorer,
        )


def test_protocol_reports_base_novel_and_harmonic_mean(tmp_path, embedder):
    config = EvalConfig.from_dict(
        {
            "name": "few-shot",
            "dataset": {"path": str(SAMPLES / "wordnet-sample"), "test_file": "test.jsonl"},
            "sessions": {"by": "random", "n": 3, "seed": 0, "shots": 2},
            "methods": [{"name": "ecl", "scorer": "ncm"}],
            "joint_check": False,
        }
    )
    results = run_protocol(config, tmp_path / "run", embedder=embedder)
    stages = results["methods"]["ecl"]["stages"]
    assert "novel_accuracy" not in stages[0] and "harmonic_mean" not in stages[0]
    for stage in stages[1:]:
        b, n = stage["base_accuracy"], stage["novel_accuracy"]
        assert stage["harmonic_mean"] == pytest.approx(metrics.harmonic_mean(b, n))
    assert results["methods"]["ecl"]["summary"]["harmonic_mean"] == stages[-1]["harmonic_mean"]
