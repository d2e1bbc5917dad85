"""The built wheel ships the prompt templates: installed into a fresh environment that cannot see
the repository, it runs an LLM prediction from a folder outside the repository.

The wheel is built from a copy of the sources (so the build writes nothing into the checkout),
with this environment's setuptools (``--no-build-isolation``, offline). The fresh environment
gets its dependencies from this one through a ``.pth`` line naming this environment's
site-packages: a plain path, so ``.pth`` files there (such as an editable install of the
repository) are not run, and ``icl_cl`` can only come from the installed wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "eval" / "data" / "wordnet-sample"
# What the build reads: the metadata, the package and the templates.
SOURCES = ("pyproject.toml", "setup.py", "README.md", "icl_cl", "prompts")
# Seconds allowed to each command (the LLM steps load SmolLM2 and read a few prompts on a CPU).
TIMEOUT = 900


def _clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the repository on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    return env


def _run(cmd: list[str], cwd: Path) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == 0, (
        f"{' '.join(cmd)} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    dist = tmp / "dist"
    pip = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run([*pip, "--wheel-dir", str(dist), str(src)], cwd=tmp)
    [built] = dist.glob("icl_cl-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed and this environment's packages
    (but not the repository) importable."""
    root = tmp_path_factory.mktemp("venv") / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    new_site = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        cwd=root,
    ).strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert not any(Path(p).resolve() == ROOT or Path(p).resolve() in ROOT.parents for p in ours)
    (Path(new_site) / "icl_cl_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    # pip itself comes from this environment too, and installs into the fresh one.
    install = [str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed"]
    _run([*install, str(wheel)], cwd=root)
    return root


def test_wheel_carries_every_template(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    templates = {f"icl_cl/prompts/{p.name}" for p in (ROOT / "prompts").glob("*.j2")}
    assert templates, "no templates in prompts/"
    assert templates <= names, sorted(templates - names)
    assert "icl_cl/py.typed" in names


def _sample(folder: Path) -> tuple[list[str], list[str]]:
    """A few WordNet examples per label and a few inputs to predict, written into ``folder``;
    returns the label names and the input ids."""
    rows = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
    taken: dict[str, int] = {}
    train = []
    for row in rows:
        label = row["labels"][0]
        if taken.get(label, 0) < 3:
            taken[label] = taken.get(label, 0) + 1
            train.append(row)
    tests = [json.loads(line) for line in (SAMPLE / "test.jsonl").read_text().splitlines()][::24]
    inputs = [{"id": row["id"], "text": row["text"]} for row in tests]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (folder / "inputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in inputs))
    shutil.copy2(SAMPLE / "labels.jsonl", folder / "labels.jsonl")
    (folder / "config.yaml").write_text(
        "llm:\n"
        "  backend: transformers\n"
        "  model: smollm2-135m-instruct\n"
        "  options: {device: cpu, dtype: float32, batch_size: 8}\n"
        "prompt: {demonstrations: knn, n_demonstrations: 2}\n"
        "fusion: {heldout: 10}\n"
        "calibration: {heldout: 10, heldout_llm: 10}\n"
    )
    return sorted(taken), [row["id"] for row in inputs]


def test_llm_predict_from_the_installed_wheel(venv: Path, tmp_path: Path) -> None:
    assert ROOT not in tmp_path.resolve().parents
    labels, ids = _sample(tmp_path)
    python, cli = str(venv / "bin" / "python"), str(venv / "bin" / "icl-cl")
    where = _run(
        [
            python,
            "-c",
            "import icl_cl; from icl_cl.prompting.templates import prompts_dir; "
            "print(icl_cl.__file__); print(prompts_dir())",
        ],
        cwd=tmp_path,
    ).split()
    # The code and the templates are the installed package's, not the repository's.
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in where), where

    config = ["--config", "config.yaml"]
    _run(
        [cli, "-q", "learn", "--store", "store", "--data", "train.jsonl", "--labels",
         "labels.jsonl", *config],
        cwd=tmp_path,
    )  # fmt: skip
    _run(
        [cli, "-q", "predict", "--store", "store", "--input", "inputs.jsonl", "--output",
         "out.jsonl", "--k", "4", *config],
        cwd=tmp_path,
    )  # fmt: skip
    predictions = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ids
    for p in predictions:
        assert p["labels"] and set(p["labels"]) <= set(labels)
        # The LLM stage ran (it reads held-out items to earn its weight); a failure there would
        # be reported as the reason for falling back to the ECL.
        fallback = p["llm"]["fallback"]
        assert fallback is None or fallback["reason"] != "backend error", fallback
