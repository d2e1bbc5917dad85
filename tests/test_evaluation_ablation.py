"""``icl-cl ablate``: one protocol run, one row and one plotted point per cell."""

from __future__ import annotations

import json

import pytest
import yaml

from icl_cl.config import ClassifierConfig
from icl_cl.errors import ConfigError
from icl_cl.evaluation.ablation import AXES, load_grid, run_ablation
from icl_cl.evaluation.llm_pool import SharedBackend
from tests.conftest import ROOT, SAMPLES
from tests.test_evaluation import LABEL_WORDS
from tests.tiny_models import tiny_backend


def _grid(tmp_path, axes, **extra):
    base = {
        "name": "base",
        "dataset": {"path": str(SAMPLES / "wordnet-sample"), "test_file": "test.jsonl"},
        "sessions": {"by": "random", "n": 2},
        "k": 3,
        "classifier": {
            "llm": {"backend": "transformers", "model": "tiny-random"},
            "fusion": {"heldout": 10},
        },
        "methods": [{"name": "ecl-ncm", "scorer": "ncm"}, {"name": "old", "kind": "zero_shot"}],
        "joint_check": False,
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    grid = {
        "name": "grid",
        "base": "base.yaml",
        "overrides": {"dataset": {"max_test": 30}},
        "method": {"kind": "inca", "max_test": 6, "evaluate_at": "last_session"},
        "axes": axes,
        **extra,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def test_ablation_writes_one_row_and_one_point_per_cell(tmp_path, embedder):
    tiny = tiny_backend(seed=3, words=LABEL_WORDS, context=512)
    path = _grid(
        tmp_path,
        {"demonstrations": ["none", "knn"], "label_presentation": ["names", "descriptions"]},
    )
    out = tmp_path / "out"
    table = run_ablation(
        path, out, embedder=embedder, backend_factory=lambda llm: SharedBackend(tiny)
    )
    cells = table["cells"]
    assert [(c["demonstrations"], c["label_presentation"]) for c in cells] == [
        ("none", "names"),
        ("none", "descriptions"),
        ("knn", "names"),
        ("knn", "descriptions"),
    ]
    # The base config's ECL methods stay as reference; its LLM methods are replaced by cells.
    assert [r["method"] for r in table["reference"]] == ["ecl-ncm"]
    assert table == json.loads((out / "ablation.json").read_text())
    for c in cells:
        assert c["n_test"] == 6 and 0 <= c["llm_accuracy"] <= 1
    tokens = {
        (c["demonstrations"], c["label_presentation"]): c["prompt_tokens_per_item"] for c in cells
    }
    # The prompt strategies really differ: descriptions and demonstrations make longer prompts.
    assert tokens[("none", "descriptions")] > tokens[("none", "names")]
    assert tokens[("knn", "names")] > tokens[("none", "names")]
    md = (out / "ablation.md").read_text()
    first_table = md.split("## Reference")[0]
    rows = [
        line for line in first_table.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert len(rows) == 1 + len(cells)  # header + one row per cell
    assert (out / "ablation.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "report.md").exists() and (out / "results.json").exists()
    # Only tested after the last session: one stage each; the ECL learned once for all cells.
    results = json.loads((out / "results.json").read_text())
    assert all(len(results["methods"][n]["stages"]) == 1 for n in results["methods"] if "=" in n)


def test_bad_grids_are_refused_clearly(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown axes"):
        load_grid(_grid(tmp_path, {"temperature": [0.1]}))
    # An axis passed through to a classifier field this version lacks is refused up front.
    monkeypatch.setitem(AXES, "colour", ("classifier", "colour"))
    with pytest.raises(ConfigError, match=r"axis 'colour' sets classifier.colour"):
        load_grid(_grid(tmp_path, {"colour": ["red"]}))
    if "calibration" not in ClassifierConfig.model_fields:
        with pytest.raises(ConfigError, match=r"axis 'calibration'"):
            load_grid(_grid(tmp_path, {"calibration": ["platt"]}))
    else:  # passed through: a value the classifier config rejects names the cell
        with pytest.raises(ConfigError, match=r"method 'calibration=12'"):
            load_grid(_grid(tmp_path, {"calibration": [12]}))


def test_shipped_ablation_grid_expands_to_twelve_cells():
    _, config, base, cells = load_grid(ROOT / "eval" / "configs" / "ablation-wordnet.yaml")
    assert len(cells) == 12
    assert {c["k"] for c in cells} == {5, 10}
    assert (base / config.dataset.path).as_posix().endswith("shared/datasets/wordnet-supersenses")
    assert not config.dataset.path.startswith("/")
