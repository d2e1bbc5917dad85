"""The CLI end to end (in-process), and every kind of bad input: a clear error, nothing changed."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from icl_cl.cli import build_parser, main, missing_extra
from icl_cl.memory.store import Store
from icl_cl.progress_bars import progress_bars

SAMPLE = Path(__file__).resolve().parents[1] / "eval" / "data" / "wordnet-sample"
DEBTAGS = Path(__file__).resolve().parents[1] / "eval" / "data" / "debtags-sample"


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _snapshot(store: Path) -> tuple:
    s = Store.open(store)
    try:
        return (
            s.n_examples(),
            len(s.sessions()),
            (store / "examples.f32").stat().st_size,
            s._conn.execute("SELECT COUNT(*) FROM labels").fetchone()[0],
        )
    finally:
        s.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "store"
    assert (
        main(
            [
                "-q",
                "learn",
                "--store",
                str(path),
                "--data",
                str(SAMPLE / "train.jsonl"),
                "--labels",
                str(SAMPLE / "labels.jsonl"),
            ]
        )
        == 0
    )
    return path


def test_learn_predict_labels_info(store, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "-q",
                "predict",
                "--store",
                str(store),
                "--input",
                str(SAMPLE / "test.jsonl"),
                "--output",
                str(out),
                "--k",
                "3",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [json.loads(line) for line in (SAMPLE / "test.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [g["id"] for g in gold]
    assert all(len(r["labels"]) == 1 and len(r["scores"]) == 3 for r in rows)
    assert all(r["labels"][0] == max(r["scores"], key=r["scores"].get) for r in rows)
    accuracy = sum(r["labels"] == g["labels"] for r, g in zip(rows, gold, strict=True)) / len(rows)
    assert accuracy > 0.6
    # --no-llm is accepted and gives the ECL decision.
    out2 = tmp_path / "pred2.jsonl"
    assert (
        main(
            [
                "-q",
                "predict",
                "--store",
                str(store),
                "--input",
                str(SAMPLE / "test.jsonl"),
                "--output",
                str(out2),
                "--k",
                "3",
                "--no-llm",
            ]
        )
        == 0
    )
    assert out2.read_text() == out.read_text()
    capsys.readouterr()
    assert main(["labels", "--store", str(store), "--json"]) == 0
    labels = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {lab["label"] for lab in labels} == {
        json.loads(line)["label"] for line in (SAMPLE / "labels.jsonl").read_text().splitlines()
    }
    assert all(lab["count"] == 30 and lab["session"] == 1 for lab in labels)
    assert main(["info", "--store", str(store)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["examples"] == 240 and info["labels"] == 8 and len(info["sessions"]) == 1
    assert info["config"]["memory"]["scorer"] == "auto"


def test_multilabel_store_predicts_sets(tmp_path):
    store = tmp_path / "tags"
    assert (
        main(
            [
                "-q",
                "learn",
                "--store",
                str(store),
                "--data",
                str(DEBTAGS / "train.jsonl"),
                "--labels",
                str(DEBTAGS / "labels.jsonl"),
            ]
        )
        == 0
    )
    out = tmp_path / "pred.jsonl"
    assert (
        main(
            [
                "-q",
                "predict",
                "--store",
                str(store),
                "--input",
                str(DEBTAGS / "test.jsonl"),
                "--output",
                str(out),
                "--k",
                "10",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert any(len(r["labels"]) > 1 for r in rows)
    assert all(len(r["scores"]) == 10 and set(r["labels"]) <= set(r["scores"]) for r in rows)


BAD_DATA = [
    (
        "malformed",
        ['{"id": "x1", "text": "fine", "labels": ["noun.food"]}', '{"id": "x2", "text": '],
        r"bad\.jsonl:2: malformed JSON",
    ),
    (
        "missing text",
        [{"id": "x1", "labels": ["noun.food"]}],
        r"bad\.jsonl:1, item 'x1', field 'text': missing",
    ),
    (
        "empty text",
        [{"id": "x1", "text": "  ", "labels": ["noun.food"]}],
        r"bad\.jsonl:1, item 'x1', field 'text': is empty",
    ),
    (
        "labels not list",
        [{"id": "x1", "text": "soup", "labels": "noun.food"}],
        r"bad\.jsonl:1, item 'x1', field 'labels': must be a list",
    ),
    (
        "duplicate in file",
        [
            {"id": "x1", "text": "soup", "labels": ["noun.food"]},
            {"id": "x1", "text": "bread", "labels": ["noun.food"]},
        ],
        r"bad\.jsonl:2, item 'x1', field 'id': duplicate id \(first at line 1\)",
    ),
    (
        "duplicate vs store",
        [
            {"id": "fresh", "text": "soup", "labels": ["noun.food"]},
            {"id": "__EXISTING__", "text": "bread", "labels": ["noun.food"]},
        ],
        r"bad\.jsonl:2, item '.*', field 'id': id already in the store",
    ),
    (
        "oversized",
        [{"id": "x1", "text": "word " * 20001, "labels": ["noun.food"]}],
        r"field 'text': is 100005 characters; the limit is 100000",
    ),
]


@pytest.mark.parametrize("case,rows,message", BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_is_refused_and_changes_nothing(store, tmp_path, capsys, case, rows, message):
    existing = json.loads((SAMPLE / "train.jsonl").read_text().splitlines()[0])["id"]
    rows = [
        r.replace("__EXISTING__", existing)
        if isinstance(r, str)
        else {k: (existing if v == "__EXISTING__" else v) for k, v in r.items()}
        for r in rows
    ]
    bad = _write(tmp_path / "bad.jsonl", rows)
    before = _snapshot(store)
    capsys.readouterr()
    assert main(["-q", "learn", "--store", str(store), "--data", str(bad)]) == 4  # DataError
    err = capsys.readouterr().err
    assert err.startswith("icl-cl: error: ")
    import re

    assert re.search(message, err), err
    assert _snapshot(store) == before


def test_non_utf8_input_names_the_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"id": "a", "text": "ok", "labels": ["noun.food"]}\n{"id": "b", "text": "caf\xe9", "labels": []}\n'
    )
    before = _snapshot(store)
    assert main(["-q", "learn", "--store", str(store), "--data", str(bad)]) == 4
    assert "bad.jsonl:2: not valid UTF-8" in capsys.readouterr().err
    assert _snapshot(store) == before


def test_conflicting_label_file_is_refused(store, tmp_path, capsys):
    labels = _write(
        tmp_path / "labels.jsonl",
        [
            {
                "label": "noun.animal",
                "name": "noun.animal",
                "description": "something else entirely",
                "group": "noun",
            }
        ],
    )
    data = _write(
        tmp_path / "data.jsonl", [{"id": "new1", "text": "a zebra", "labels": ["noun.animal"]}]
    )
    before = _snapshot(store)
    assert (
        main(["-q", "learn", "--store", str(store), "--data", str(data), "--labels", str(labels)])
        == 4
    )
    err = capsys.readouterr().err
    assert (
        "labels.jsonl:1, item 'noun.animal', field 'description': conflicts with the stored label"
        in err
    )
    assert _snapshot(store) == before


def test_predict_errors(store, tmp_path, capsys):
    inputs = _write(tmp_path / "in.jsonl", [{"id": "q", "text": "a kind of bread"}])
    out = tmp_path / "out.jsonl"
    assert (
        main(
            [
                "-q",
                "predict",
                "--store",
                str(store),
                "--input",
                str(inputs),
                "--output",
                str(out),
                "--k",
                "0",
            ]
        )
        == 2
    )
    assert "--k must be a positive integer" in capsys.readouterr().err
    empty = tmp_path / "empty-store"
    assert (
        main(["-q", "predict", "--store", str(empty), "--input", str(inputs), "--output", str(out)])
        == 5  # StoreError
    )
    assert "no store here" in capsys.readouterr().err
    bad_inputs = _write(tmp_path / "in2.jsonl", [{"id": "q", "text": ""}])
    assert (
        main(
            [
                "-q",
                "predict",
                "--store",
                str(store),
                "--input",
                str(bad_inputs),
                "--output",
                str(out),
            ]
        )
        == 4
    )
    assert "in2.jsonl:1, item 'q', field 'text': is empty" in capsys.readouterr().err
    assert not out.exists()


def test_predict_with_an_empty_store(tmp_path, capsys, embedder):
    from icl_cl import ContinualClassifier, DataError

    clf = ContinualClassifier.open(tmp_path / "empty", embedder=embedder)
    with pytest.raises(DataError, match="store is empty"):
        clf.predict(["anything"])
    with pytest.raises(DataError, match="k must be a positive integer"):
        clf.predict(["anything"], k=-1)


def test_every_command_has_help():
    for command in ([], ["learn"], ["predict"], ["labels"], ["info"], ["eval"]):
        result = subprocess.run(
            [sys.executable, "-m", "icl_cl.cli", *command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "usage: icl-cl" in result.stdout
        assert len(result.stdout.splitlines()) > 4


def test_predict_gives_probabilities_conformal_sets_and_abstention(store, tmp_path, capsys):
    out = tmp_path / "sets.jsonl"
    args = ["-q", "predict", "--store", str(store), "--input", str(SAMPLE / "test.jsonl")]
    assert main([*args, "--output", str(out), "--k", "5", "--confidence", "0.9"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    gold = [
        json.loads(line)["labels"][0] for line in (SAMPLE / "test.jsonl").read_text().splitlines()
    ]
    for r in rows:
        probs = list(r["scores"].values())
        assert all(0 <= p <= 1 for p in probs) and sum(probs) <= 1 + 1e-9
        # The set is the candidates above the conformal threshold, most probable first.
        assert r["set"] and set(r["set"]) <= set(r["scores"])
        assert r["set"] == sorted(r["set"], key=r["scores"].get, reverse=True)
        assert r["labels"][0] == r["set"][0]
    coverage = sum(g in r["set"] for r, g in zip(rows, gold, strict=True)) / len(rows)
    assert coverage >= 0.8  # 90% is the target; the sample has 80 test items
    # A higher confidence can only grow the sets.
    wide = tmp_path / "wide.jsonl"
    assert main([*args, "--output", str(wide), "--k", "5", "--confidence", "0.99"]) == 0
    wider = [json.loads(line) for line in wide.read_text().splitlines()]
    assert all(set(a["set"]) <= set(b["set"]) for a, b in zip(rows, wider, strict=True))
    # Abstention: below the threshold no label is given, and the line says so.
    abstain = tmp_path / "abstain.jsonl"
    assert main([*args, "--output", str(abstain), "--k", "5", "--abstain-below", "0.6"]) == 0
    for r, full in zip(
        [json.loads(line) for line in abstain.read_text().splitlines()], rows, strict=True
    ):
        top = max(full["scores"].values())
        assert r["abstained"] == (top < 0.6)
        assert r["labels"] == ([] if top < 0.6 else full["labels"])
    for flag, value in (("--confidence", "1.5"), ("--abstain-below", "-0.1")):
        assert main([*args, "--output", str(abstain), flag, value]) == 2
        assert flag in capsys.readouterr().err


def test_learn_with_labels_only_adds_labels_without_examples(tmp_path, capsys):
    copy = tmp_path / "s"
    assert main(["-q", "learn", "--store", str(copy), "--data", str(SAMPLE / "train.jsonl")]) == 0
    before = _snapshot(copy)
    new = _write(
        tmp_path / "new.jsonl",
        [{"label": "noun.quark", "name": "quark", "description": "an elementary particle"}],
    )
    capsys.readouterr()
    assert main(["-q", "learn", "--store", str(copy), "--labels", str(new)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["examples"] == 0 and report["new_labels"] == 1
    after = _snapshot(copy)
    assert after[0] == before[0] and after[3] == before[3] + 1  # same examples, one more label
    # Again: nothing new, refused, nothing changed.
    assert main(["-q", "learn", "--store", str(copy), "--labels", str(new)]) == 4
    assert "nothing to learn" in capsys.readouterr().err and _snapshot(copy) == after
    assert main(["-q", "learn", "--store", str(copy)]) == 2
    assert "give --data" in capsys.readouterr().err


def test_labels_and_info_help_describe_the_command():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("labels", "info"):
        text = commands.choices[name].format_help()
        # The description: a paragraph of its own between the usage and the options.
        description = text.split("\n\n")[1]
        assert "store" in description and not description.lstrip().startswith("options:"), name
    assert "held-out items" in commands.choices["info"].format_help()


def test_every_command_describes_itself_with_no_escaped_percent():
    """Every command has a description paragraph; argparse formats ``%`` only in argument help,
    so a ``%%`` written in a description would be shown as it is."""
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        text = command.format_help()
        assert "%%" not in text, name
        assert not text.split("\n\n")[1].lstrip().startswith("options:"), name


def test_predict_prints_a_summary_on_stderr_unless_quiet(store, tmp_path, capsys):
    out = tmp_path / "p.jsonl"
    n = len((SAMPLE / "test.jsonl").read_text().splitlines())
    args = ["predict", "--store", str(store), "--input", str(SAMPLE / "test.jsonl")]
    assert main([*args, "--output", str(out)]) == 0
    err = capsys.readouterr().err
    line = rf"^icl-cl: wrote {n} predictions to {re.escape(str(out))} in \d+\.\d s$"
    assert re.search(line, err, re.MULTILINE), err
    assert re.search(rf"embedding:\s+0%\|\s*\| 0/{n} ", err)  # the bar shows from the start
    assert main(["-q", *args, "--output", str(out)]) == 0
    assert capsys.readouterr().err == ""


def test_progress_bars_name_what_they_count_and_an_honest_rate(capsys):
    progress = progress_bars(quiet=False)
    time.sleep(0.5)
    # A stage whose first report comes after all its work: the rate counts from the start.
    progress("embedding", 96, 96)
    progress("fitting: choosing the ECL scorer on 240 held-out items", 4, 4)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    embedding = [line for line in lines if line.startswith("embedding") and "96/96" in line]
    rate = re.search(r"([\d.]+)item/s\]", embedding[-1])
    assert rate and float(rate.group(1)) < 96 / 0.45, embedding[-1]
    scorers = [line for line in lines if "4/4" in line][-1]
    assert "scorer" in scorers.split("4/4")[1] and "item" not in scorers.split("4/4")[1]
    # A curve's rounds count rounds; a stage that starts again (the next seed's) gets a new bar.
    for _seed in range(2):
        for done in (1, 2, 3):
            progress("combined: rounds", done, 3)
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    rounds = [line for line in lines if line.startswith("combined: rounds")]
    assert sum("3/3" in line for line in rounds) >= 2, rounds
    assert all("round" in line.split("/3")[1] and "item" not in line for line in rounds)
    quiet = progress_bars(quiet=True)
    quiet("embedding", 1, 2)
    assert capsys.readouterr().err == ""


def _one_line_error(capsys, extra: str) -> None:
    err = capsys.readouterr().err
    assert err.startswith("icl-cl: error:") and err.count("\n") == 1, err
    assert f"icl-cl[{extra}]" in err and "Traceback" not in err


@pytest.mark.parametrize("module", ["uvicorn", "fastapi"])
def test_serve_without_its_extra_says_which_to_install(tmp_path, capsys, monkeypatch, module):
    # Fault injection: the module is missing (None in sys.modules makes its import fail).
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.delitem(sys.modules, "icl_cl.service.app", raising=False)
    assert main(["serve", "--store", str(tmp_path / "s")]) == 3
    _one_line_error(capsys, "serve")
    assert "pip install 'icl-cl[serve]'" in missing_extra(ModuleNotFoundError(name=module)).args[0]


def test_ray_engine_without_ray_says_which_extra_to_install(store, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    data = ["--data", str(SAMPLE / "train.jsonl")]
    assert main(["learn", "--store", str(tmp_path / "s"), *data, "--engine", "ray"]) == 3
    _one_line_error(capsys, "ray")
    inputs = ["--input", str(SAMPLE / "test.jsonl"), "--output", str(tmp_path / "p.jsonl")]
    assert main(["predict", "--store", str(store), *inputs, "--engine", "ray"]) == 3
    _one_line_error(capsys, "ray")
    assert not (tmp_path / "s").exists() and not (tmp_path / "p.jsonl").exists()


def test_onnx_embedder_without_onnxruntime_says_which_extra_to_install(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.setenv("ICL_CL_CACHE", str(tmp_path / "cache"))  # no export made before
    config = tmp_path / "onnx.yaml"
    config.write_text("embedder: {backend: onnx}\n")
    data = ["--data", str(SAMPLE / "train.jsonl"), "--config", str(config)]
    assert main(["-q", "learn", "--store", str(tmp_path / "s"), *data]) == 3
    _one_line_error(capsys, "onnx")


def test_a_missing_module_of_no_extra_is_not_hidden():
    assert missing_extra(ModuleNotFoundError(name="numpy")) is None
    assert missing_extra(ModuleNotFoundError(name="icl_cl.memory")) is None
    assert missing_extra(ModuleNotFoundError(name="vllm.sampling_params")).exit_code == 3


def _eval_config(path: Path, **extra: Any) -> Path:
    """The quickstart's shape, small: two sessions, the ECL and InCA with a tiny LLM."""
    inca = {
        "name": "inca",
        "kind": "inca",
        "scorer": "mahalanobis",
        "evaluate_at": "last_session",
        "llm": {"backend": "transformers", "model": "tiny-random"},
        "prompt": {"n_demonstrations": 2, "label_presentation": "names"},
        "classifier": {"fusion": {"heldout": 10}, "calibration": {"heldout_llm": 10}},
    }
    config = {
        "name": "small",
        "dataset": {"path": str(SAMPLE), "test_file": "test.jsonl", "max_test": 12},
        "sessions": {"by": "random", "n": 2, "seed": 0},
        "k": 3,
        "methods": [{"name": "ecl", "scorer": "mahalanobis"}, inca],
        "joint_check": False,
        **extra,
    }
    path.write_text(json.dumps(config))
    return path


def test_eval_reads_no_test_item_with_an_llm_fusion_gave_weight_0(tmp_path, capsys, monkeypatch):
    from icl_cl.evaluation import llm_pool
    from tests.tiny_models import tiny_backend

    # A random-weight LLM (real transformers code) in place of SmolLM2: fusion gives it weight 0.
    words = "noun verb adj . animal plant food artifact person motion communication all".split()
    tiny = llm_pool.SharedBackend(tiny_backend(seed=3, words=words, context=512))
    monkeypatch.setattr(llm_pool, "registry_factory", lambda llm: tiny)
    out = tmp_path / "run"
    config = _eval_config(tmp_path / "small.yaml", score_llm_alone=False)
    assert main(["-q", "eval", str(config), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    ecl, inca = (results["methods"][m]["summary"] for m in ("ecl", "inca"))
    assert inca["fusion_llm_weight"] == 0 and inca["fit_llm_calls"] >= 10  # it read held-out items
    # As predict: no test item read, no cost, and the ECL's decisions.
    assert inca["llm_calls_per_item"] == 0 and inca["prompt_tokens_per_item"] == 0
    assert "llm_accuracy" not in inca and inca["accuracy"] == ecl["accuracy"]
    note = r"inca: on \d+ held-out stored examples the LLM did not improve on the ECL.*"
    assert re.search(f"{note}it read no test item", printed)
    assert re.search(f"{note}it read no test item", (out / "report.md").read_text())
    # With score_llm_alone (the default) it reads every test item to score its own choice.
    assert main(["-q", "eval", str(_eval_config(tmp_path / "alone.yaml")), "--out", str(out)]) == 0
    inca = json.loads((out / "results.json").read_text())["methods"]["inca"]["summary"]
    assert inca["fusion_llm_weight"] == 0 and inca["llm_calls_per_item"] == 1
    assert 0 <= inca["llm_accuracy"] <= 1
    assert "it read no test item" not in capsys.readouterr().out
