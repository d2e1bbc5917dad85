"""The active-learning protocol of ``icl-cl eval``: the shipped sample config end to end through
the CLI, a killed run resumed, and the configs it refuses.

The embedder, FAISS and SQLite are the real ones; nothing is mocked but the embedder's loading
(the session's instance) and, to kill and to check a resume, ``pick`` and ``learn``.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

import pytest
import yaml

from icl_cl.classifier import ContinualClassifier
from icl_cl.cli import main
from icl_cl.errors import ConfigError
from icl_cl.evaluation import active_learning
from icl_cl.evaluation.active_learning import ActiveLearningConfig
from icl_cl.evaluation.cli import load_eval_config
from icl_cl.evaluation.protocol import EvalConfig
from icl_cl.labelling.suggest import SuggestOptions
from tests.conftest import ROOT

CONFIGS = ROOT / "eval" / "configs"
SAMPLE = CONFIGS / "active-learning-wordnet-sample.yaml"
DATA = ROOT / "eval" / "data" / "wordnet-sample"


def reach(curve: list[dict[str, Any]], target: float) -> float | None:
    """The labels at which ``curve`` first reaches ``target``, linear between its points."""
    for i, point in enumerate(curve):
        if point["accuracy"] >= target:
            if i == 0:
                return float(point["labels"])
            before = curve[i - 1]
            slope = (point["labels"] - before["labels"]) / (point["accuracy"] - before["accuracy"])
            return before["labels"] + (target - before["accuracy"]) * slope
    return None


def expected_points(curve: list[dict[str, Any]], target: float, rounds: int, past: int) -> int:
    """Points of a strategy's curve (not random's): it stops once more than ``past`` of its
    points reach the target."""
    for i in range(len(curve)):
        if sum(p["accuracy"] >= target for p in curve[: i + 1]) > past:
            return i + 1
    return rounds + 1


def check_curves(results: dict[str, Any], config: dict[str, Any]) -> None:
    """One point after the seed and one per round (until a strategy stops), the labels growing
    by the batches, accuracies in [0, 1], and the headline as documented."""
    batches, target = results["batches"], results["target"]
    assert results["seed_labels"] == config["seed_per_label"] * 8  # the sample's 8 labels
    assert results["seed_labels"] + sum(batches) == config["max_labels"]
    assert target == pytest.approx(config["target"] * results["full_accuracy"])
    assert list(results["curves"]) == config["strategies"]
    for strategy, curve in results["curves"].items():
        labels = [p["labels"] for p in curve]
        assert labels[0] == results["seed_labels"]
        assert [b - a for a, b in itertools.pairwise(labels)] == batches[: len(curve) - 1]
        assert all(0.0 <= p["accuracy"] <= 1.0 for p in curve)
        assert all(p["pick_s"] >= 0 and p["learn_s"] > 0 for p in curve[1:])
        rounds, past = len(batches), config["rounds_past_target"]
        wanted = (
            rounds + 1 if strategy == "random" else expected_points(curve, target, rounds, past)
        )
        assert len(curve) == wanted, strategy
    # Every strategy starts from the same seed store: the same first accuracy.
    assert len({c[0]["accuracy"] for c in results["curves"].values()}) == 1
    random_needs = reach(results["curves"]["random"], target)
    assert random_needs is not None  # random's last point learned all of train
    rows = {row["strategy"]: row for row in results["summary"]}
    assert rows["random"]["ratio_to_random"] == 1.0
    for strategy, curve in results["curves"].items():
        needs = reach(curve, target)
        row = rows[strategy]
        assert row["labels_to_target"] == pytest.approx(needs)
        assert row["ratio_to_random"] == (
            None if needs is None else pytest.approx(needs / random_needs)
        )
        assert row["final_accuracy"] == curve[-1]["accuracy"]


def test_the_sample_config_draws_learning_curves_and_resumes_a_killed_run(
    tmp_path, embedder, monkeypatch, capsys
):
    monkeypatch.setattr(active_learning, "load_embedder", lambda config: embedder)
    config = yaml.safe_load(SAMPLE.read_text())
    out = tmp_path / "run"
    # Killed (Ctrl-C) in the second strategy's first pick: random's curve is finished.
    pick = active_learning.pick

    def killed(clf, strategy, *args):
        if strategy == config["strategies"][1]:
            raise KeyboardInterrupt
        return pick(clf, strategy, *args)

    monkeypatch.setattr(active_learning, "pick", killed)
    assert main(["-q", "eval", str(SAMPLE), "--out", str(out)]) == 130
    assert not (out / "results.json").exists()
    monkeypatch.setattr(active_learning, "pick", pick)

    assert main(["-q", "eval", str(SAMPLE), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["resumed"] == {"reference": True, "strategies": ["random"]}
    assert results["protocol"] == "active_learning"
    assert results["dataset"] == {"name": "wordnet-sample", "train": 240, "dev": 96, "labels": 8}
    check_curves(results, config)
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    for text in (printed, report):
        assert "| strategy | labels to 95% | / random's |" in text
        assert "| random |" in text and "| 1.00 |" in text
        assert "| labels | random | combined | margin | bt |" in text
    assert (out / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "stores").exists()  # the curves' stores go once they are drawn

    # Finished: a rerun learns nothing and gives the same curves, timings included.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run learned again")

    monkeypatch.setattr(ContinualClassifier, "learn", refuse)
    assert main(["-q", "eval", str(SAMPLE), "--out", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["resumed"] == {"reference": True, "strategies": config["strategies"]}
    assert again["curves"] == results["curves"] and again["summary"] == results["summary"]
    assert again["embedded_texts"] == 0  # the run folder's embedding cache had every text

    # Other defaults of a strategy's options (another release): its curve is made again.
    monkeypatch.undo()
    monkeypatch.setattr(active_learning, "load_embedder", lambda config: embedder)
    other = functools.partial(SuggestOptions, coverage_weight=0.5)
    monkeypatch.setattr(active_learning, "SuggestOptions", other)
    assert main(["-q", "eval", str(SAMPLE), "--out", str(out)]) == 0
    redone = json.loads((out / "results.json").read_text())
    # random and the baselines take no options; every suggest strategy is redone.
    assert redone["resumed"] == {"reference": True, "strategies": ["random", "bt"]}


def test_repeats_run_each_seed_as_its_own_run_and_head_their_mean(tmp_path, embedder, monkeypatch):
    """repeats: 2 runs seed 0 and seed 1, each exactly the run a config of that seed makes;
    the curves are their means, the headline the mean labels against random's mean."""
    monkeypatch.setattr(active_learning, "load_embedder", lambda config: embedder)
    config = yaml.safe_load(SAMPLE.read_text())
    config.update(
        strategies=["random", "combined"],
        dataset={**config["dataset"], "path": str(SAMPLE.parent / config["dataset"]["path"])},
    )
    paths = {}
    for name, change in (("both", {"repeats": 2}), ("one", {"seed": 1})):
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({**config, **change}))
        assert main(["-q", "eval", str(paths[name]), "--out", str(tmp_path / name)]) == 0
    both = json.loads((tmp_path / "both" / "results.json").read_text())
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert both["seeds"] == [0, 1] and [run["seed"] for run in both["runs"]] == [0, 1]
    second = both["runs"][1]  # timings aside, the run of seed 1
    assert (second["full_accuracy"], second["target"]) == (one["full_accuracy"], one["target"])
    accuracies = lambda run: {  # noqa: E731
        s: [p["accuracy"] for p in c] for s, c in run["curves"].items()
    }
    assert accuracies(second) == accuracies(one)
    needs = lambda run: [r["labels_to_target"] for r in run["summary"]]  # noqa: E731
    assert needs(second) == needs(one)
    runs = both["runs"]
    assert both["full_accuracy"] == pytest.approx(
        (runs[0]["full_accuracy"] + runs[1]["full_accuracy"]) / 2
    )
    for strategy, curve in both["curves"].items():
        per_seed = [run["curves"][strategy] for run in runs]
        assert len(curve) == min(len(c) for c in per_seed)
        for i, point in enumerate(curve):
            assert point["accuracy"] == pytest.approx(sum(c[i]["accuracy"] for c in per_seed) / 2)
    rows = {row["strategy"]: row for row in both["summary"]}
    needed = {s: [] for s in rows}
    for run in runs:
        for row in run["summary"]:
            needed[row["strategy"]].append(row["labels_to_target"])
    assert rows["combined"]["labels_to_target"] == pytest.approx(sum(needed["combined"]) / 2)
    assert rows["combined"]["ratio_to_random"] == pytest.approx(
        sum(needed["combined"]) / sum(needed["random"])
    )
    assert rows["combined"]["ratios"] == [
        pytest.approx(a / b) for a, b in zip(needed["combined"], needed["random"], strict=True)
    ]
    report = (tmp_path / "both" / "report.md").read_text()
    assert "Repeated with seeds 0, 1" in report
    assert "| strategy | labels to 95% | / random's | each seed's |" in report


def test_held_out_scores_train_items_that_no_seed_learns(tmp_path, embedder, monkeypatch):
    """held_out: the items scored are train items out of the pool and the reference's data, one
    draw for every seed, each seed scoring its own sample of them; the test file is not read
    for them."""
    config = ActiveLearningConfig.from_yaml(SAMPLE).model_copy(update={"held_out": 60, "dev": 40})
    train_ids = [json.loads(line)["id"] for line in (DATA / "train.jsonl").open()]
    held: set[str] = set()
    for seed in (0, 1):
        seeded = config.model_copy(update={"seed": seed})
        plan = active_learning._plan(seeded, SAMPLE.parent, embedder, tmp_path)
        dev, train = {ex.id for ex in plan.dev}, [ex.id for ex in plan.train]
        assert len(dev) == 40 and dev <= set(train_ids) and not dev & set(train)
        assert train == [i for i in train_ids if i in set(train)]  # in train order
        assert len(train) == len(train_ids) - 60 and {ex.id for ex in plan.seed} <= set(train)
        held |= set(train_ids) - set(train)
        assert dev <= held
    assert len(held) == 60  # the same draw for both seeds
    everything = config.model_copy(update={"held_out": len(train_ids)})
    with pytest.raises(ConfigError, match="leaves no train item"):
        active_learning._plan(everything, SAMPLE.parent, embedder, tmp_path)

    # Through `icl-cl eval`: the reference learned the other 180, the report says what it scored.
    monkeypatch.setattr(active_learning, "load_embedder", lambda config: embedder)
    raw = yaml.safe_load(SAMPLE.read_text())
    raw.update(strategies=["random", "margin"], held_out=60, dev=40, max_labels=120)
    raw["dataset"]["path"] = str(SAMPLE.parent / raw["dataset"]["path"])
    path = tmp_path / "held-out.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["-q", "eval", str(path), "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (results["dataset"]["train"], results["dataset"]["dev"]) == (180, 40)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "40 of 60 train items held out of the pool" in report


def test_eval_configs_pick_their_protocol():
    for path in sorted(CONFIGS.glob("*.yaml")) + sorted(CONFIGS.glob("hf/*.yaml")):
        if path.name.startswith("ablation"):  # a grid file, not an eval config
            continue
        config = load_eval_config(path)
        active = path.name.startswith("active-learning")
        assert isinstance(config, ActiveLearningConfig if active else EvalConfig), path
    # The headline runs use the store's own scorer (auto), as a user's store does.
    for name in ("wordnet-supersenses", "wordnet-supersenses-held-out", "debian-sections"):
        headline = ActiveLearningConfig.from_yaml(CONFIGS / f"active-learning-{name}.yaml")
        assert headline.scorer is None and headline.store_config().memory.scorer == "auto", name
    full = ActiveLearningConfig.from_yaml(
        CONFIGS / "active-learning-wordnet-supersenses-mahalanobis.yaml"
    )
    assert "random" in full.strategies and {"lc", "plain-entropy", "bt"} <= set(full.strategies)
    # Each run without TEEN is comparable with its calibrated one: only the calibration differs.
    for name in (
        "active-learning-wordnet-supersenses-mahalanobis",
        "active-learning-debian-sections-mahalanobis",
    ):
        default = ActiveLearningConfig.from_yaml(CONFIGS / f"{name}.yaml")
        no_teen = ActiveLearningConfig.from_yaml(CONFIGS / f"{name}-no-teen.yaml")
        assert no_teen.store_config().memory.teen_max_examples == 0, name
        assert default.store_config().memory.teen_max_examples > 0, name
        same = no_teen.model_copy(update={"name": name, "classifier": default.classifier})
        assert same == default, name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"strategies": ["combined", "bt"]}, "must include 'random'"),
        ({"strategies": ["random", "cleverest"]}, "unknown strategy 'cleverest'"),
        ({"strategies": ["random", "combined@mmr_lambda=high"]}, "is not a number"),
        ({"strategies": ["random", "bt@coverage_weight=2"]}, "is not an option"),
        ({"strategies": ["random", "random"]}, "repeated"),
        ({"growth": 0}, "growth"),
        ({"repeats": 0}, "repeats"),
        ({"sessions": {"by": "random"}}, "sessions"),
        ({"held_out": 10, "train_from_dev": True}, "takes neither"),
        ({"held_out": 0}, "held_out"),
    ],
)
def test_bad_active_learning_configs_are_refused(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(SAMPLE.read_text()), **change}))
    with pytest.raises(ConfigError, match=message):
        load_eval_config(path)
