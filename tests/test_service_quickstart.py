"""docs/service.md's curl quickstart, run as written: its ``bash`` block (on a free port, in a
temporary folder) against a real ``icl-cl serve`` on 127.0.0.1, and each answer checked against
the ``json`` block the doc shows after it."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "service.md"


def quickstart() -> tuple[str, list[Any]]:
    """The quickstart's script and the answers it shows."""
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    script = re.search(r"```bash\n(.*?)```", section, re.S)
    shown = re.search(r"```json\n(.*?)```", section, re.S)
    assert script is not None and shown is not None, "the quickstart has a bash and a json block"
    answers = [json.loads(line) for line in shown.group(1).splitlines() if line.strip()]
    return script.group(1), answers


def matches(shown: Any, got: Any, where: str = "") -> list[str]:
    """Where ``got`` differs from ``shown``: every key shown must be there with its value
    (``got`` may have more keys), floats within 0.02, everything else equal."""
    if isinstance(shown, dict):
        if not isinstance(got, dict):
            return [f"{where}: {got!r} is not an object"]
        return [m for key in shown for m in matches(shown[key], got.get(key), f"{where}.{key}")]
    if isinstance(shown, list):
        if not isinstance(got, list) or len(got) != len(shown):
            return [f"{where}: {got!r} is not a list of {len(shown)}"]
        return [
            m
            for i, (a, b) in enumerate(zip(shown, got, strict=True))
            for m in matches(a, b, f"{where}[{i}]")
        ]
    if isinstance(shown, float) and isinstance(got, float | int):
        return [] if math.isclose(shown, got, abs_tol=0.02) else [f"{where}: {got} != {shown}"]
    return [] if shown == got else [f"{where}: {got!r} != {shown!r}"]


def test_the_quickstart_runs_and_answers_as_the_doc_shows(tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from tests.service_helpers import free_port

    script, shown = quickstart()
    port = str(free_port())
    assert script.count("8080") >= 5
    script = script.replace("8080", port)
    # Whatever happens, the server the script started goes with it.
    wrapped = "set -e\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    run = subprocess.run(
        ["bash", "-c", wrapped], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    assert len(got) == len(shown), run.stdout
    problems = [
        m for i, (a, b) in enumerate(zip(shown, got, strict=True)) for m in matches(a, b, f"[{i}]")
    ]
    assert not problems, (problems, run.stdout)
    assert (tmp_path / "quickstart.store" / "manifest.json").exists()
    # Start-up is news, not a warning: logged at INFO, where uvicorn logs its own.
    assert "INFO:     serving quickstart.store on 127.0.0.1" in run.stderr, run.stderr[-3000:]
    assert "WARNING:  serving" not in run.stderr


def test_matches_sees_a_difference() -> None:
    assert matches({"a": 1.0, "b": ["x"]}, {"a": 1.01, "b": ["x"], "c": 3}) == []
    assert matches({"a": 1.0}, {"a": 1.5}) and matches({"b": ["x"]}, {"b": ["y"]})
    assert matches({"a": 1}, {}) and matches([1], [1, 2])
