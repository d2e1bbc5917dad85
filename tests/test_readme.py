"""The README's library example, run as a user would (from a copy of the repository's layout),
and its printed lines checked against the output the README shows, so that the two cannot drift.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"-?\d+\.\d+(?:e[+-]?\d+)?")
# Wall time is the one thing a run cannot repeat.
SECONDS = re.compile(r"seconds=-?\d+\.\d+(?:e[+-]?\d+)?")


def library_example(readme: str) -> tuple[str, list[str]]:
    """The Python block of the README's Library section and the lines of the output block shown
    after it."""
    section = readme.split("\n## Library\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    output = re.search(r"\nOutput\b.*?:\n\n```\n(.*?)```", section, re.DOTALL)
    assert code and output, "the Library section has a python block and an Output block"
    assert code.end() < output.start(), "the output is shown after the example"
    return code.group(1), output.group(1).splitlines()


def same_line(got: str, shown: str) -> bool:
    """Equal text, numbers equal to float32 precision (1e-6), and any wall time."""
    got, shown = SECONDS.sub("seconds=…", got), SECONDS.sub("seconds=…", shown)
    if NUMBER.sub("#", got) != NUMBER.sub("#", shown):
        return False
    pairs = zip(NUMBER.findall(got), NUMBER.findall(shown), strict=True)
    return all(math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9) for a, b in pairs)


def test_same_line_compares_text_and_numbers():
    assert same_line("Cost(calls=0, seconds=1.5)", "Cost(calls=0, seconds=0.0)")
    assert same_line("{'a': 0.671}", "{'a': 0.671}")
    assert not same_line("{'a': 0.672}", "{'a': 0.671}")
    assert not same_line("{'b': 0.671}", "{'a': 0.671}")
    assert not same_line("calls=1", "calls=0")


def test_library_example_is_complete_python():
    code, shown = library_example((ROOT / "README.md").read_text(encoding="utf-8"))
    compile(code, "README.md", "exec")
    assert shown and code.count("print(") == len(shown)


@pytest.mark.slow
def test_library_example_prints_what_the_readme_shows(tmp_path):
    code, shown = library_example((ROOT / "README.md").read_text(encoding="utf-8"))
    # A folder that looks like the repository root to the example (its data paths are relative
    # to it), so that whatever the example writes outside a temporary folder would show here.
    (tmp_path / "eval").symlink_to(ROOT / "eval", target_is_directory=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = run.stdout.splitlines()
    assert len(got) == len(shown), run.stdout
    for g, s in zip(got, shown, strict=True):
        assert same_line(g, s), f"the example printed\n  {g}\nwhere the README shows\n  {s}"
    # It left nothing behind, so it runs again the same.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
