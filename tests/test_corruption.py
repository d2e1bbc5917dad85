"""The corruption matrix: damage to each part of a store's source data, and what the commands do.

One store of three sessions with stored fits is learned once; each case damages a fresh copy of
one part (a vector block of the first, a middle or the last session; a statistics row, a fitted
row, a label row) and runs the real command line on it. For every case ``verify`` exits 6
naming the part, ``predict`` exits 6 with one line naming the part (never an answer, never a
traceback) and writes nothing, unless it does not read that part at all, and ``info`` exits 6 the
same way.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from icl_cl import ContinualClassifier, StoreCorruptError
from icl_cl.cli import main
from icl_cl.memory.checksums import READ_CHECKS
from icl_cl.memory.store import DATABASE, VECTORS
from tests.test_integrity import CORRUPT, SAMPLE, fingerprint, run

ROW_BYTES = 4 * 384


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    """Three sessions of 80 examples; heads fitted and stored after the last."""
    folder = tmp_path_factory.mktemp("corruption")
    lines = (SAMPLE / "train.jsonl").read_text().splitlines()
    path = folder / "store"
    for i in range(3):
        part = folder / f"part{i}.jsonl"
        part.write_text("\n".join(lines[80 * i : 80 * (i + 1)]) + "\n")
        argv = ["-q", "learn", "--store", str(path), "--data", str(part), "--k", "3"]
        if i == 0:
            argv += ["--labels", str(SAMPLE / "labels.jsonl")]
        if i < 2:
            argv.append("--no-fit")
        assert main(argv) == 0
    return path


def _flip_vectors(session: int) -> Callable[[Path], None]:
    """XOR one bit of a high byte of a float in session ``session``'s block."""

    def damage(store: Path) -> None:
        conn = sqlite3.connect(store / DATABASE)
        first_row, n_rows = conn.execute(
            "SELECT first_row, n_rows FROM blocks WHERE session = ?", (session,)
        ).fetchone()
        conn.close()
        with open(store / VECTORS, "r+b") as f:
            f.seek((first_row + n_rows // 2) * ROW_BYTES + 3)
            byte = f.read(1)[0]
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte ^ 64]))

    return damage


def _edit_row(sql: str, *params: object) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        conn = sqlite3.connect(store / DATABASE)
        assert conn.execute(sql, params).rowcount == 1
        conn.commit()
        conn.close()

    return damage


def _flip_blob(table: str, column: str, key: str, value: object) -> Callable[[Path], None]:
    """XOR one byte in the middle of a blob, as a flipped bit on disk would."""

    def damage(store: Path) -> None:
        conn = sqlite3.connect(store / DATABASE)
        (blob,) = conn.execute(f"SELECT {column} FROM {table} WHERE {key} = ?", (value,)).fetchone()
        data = bytearray(blob)
        data[len(data) // 2 + 7] ^= 64
        conn.execute(f"UPDATE {table} SET {column} = ? WHERE {key} = ?", (bytes(data), value))
        conn.commit()
        conn.close()

    return damage


def _temperature(store: Path) -> None:
    """Edit a stored calibration temperature (a fitted row) to another valid number."""
    conn = sqlite3.connect(store / DATABASE)
    for key, value in conn.execute("SELECT key, value FROM fitted").fetchall():
        fitted = json.loads(value)
        if _scale(fitted):
            conn.execute(
                "UPDATE fitted SET value = ? WHERE key = ?",
                (json.dumps(fitted, sort_keys=True), key),
            )
            conn.commit()
            conn.close()
            return
    raise AssertionError("no stored temperature")


def _scale(value: object) -> bool:
    """Multiply every ``temperature`` in ``value`` by 3, in place; whether there was one."""
    found = False
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "temperature" and isinstance(item, float | int):
                value[key] = item * 3 + 0.5
                found = True
            else:
                found = _scale(item) or found
    elif isinstance(value, list):
        for item in value:
            found = _scale(item) or found
    return found


# (name, damage, what the error names, whether opening the classifier reads the part)
MATRIX = [
    ("vectors of the first session", _flip_vectors(1), "session 1's vectors", True),
    ("vectors of a middle session", _flip_vectors(2), "session 2's vectors", True),
    ("vectors of the last session", _flip_vectors(3), "session 3's vectors", True),
    (
        "statistics row (gram)",
        _flip_blob("statistics", "value", "key", "gram"),
        "statistics key gram",
        True,
    ),
    ("label row (sum)", _flip_blob("labels", "total", "col", 0), "labels col 0", True),
    (
        "label row (count)",
        _edit_row("UPDATE labels SET count = count + 1 WHERE col = 1"),
        "labels col 1",
        True,
    ),
    (
        "label row (name)",
        _edit_row("UPDATE labels SET name = 'food!' WHERE col = 2"),
        "labels col 2",
        True,
    ),
    ("fitted row (temperature)", _temperature, "fitted key", False),
]


@pytest.fixture
def store(learned, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(learned, copy)
    return copy


def _predict(capsys, store: Path, out: Path, *extra: str) -> tuple[int, str]:
    code, _, err = run(
        capsys,
        "predict",
        "--store",
        str(store),
        "--input",
        str(SAMPLE / "test.jsonl"),
        "--output",
        str(out),
        "--k",
        "3",
        *extra,
    )
    return code, err


def test_the_undamaged_store_verifies_and_predicts(learned, tmp_path, capsys):
    assert run(capsys, "verify", "--store", str(learned))[0] == 0
    code, _ = _predict(capsys, learned, tmp_path / "out.jsonl")
    assert code == 0 and len((tmp_path / "out.jsonl").read_text().splitlines()) == 96
    conn = sqlite3.connect(learned / DATABASE)
    assert conn.execute("SELECT COUNT(*) FROM fitted").fetchone()[0] > 0
    conn.close()


@pytest.mark.parametrize("damage,part,on_open", [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_damaged_source_data_is_never_used(store, tmp_path, capsys, damage, part, on_open):
    """Source data read on open stops every predict; a damaged fitted row stops the predictions
    that use those heads (the default scorer at k 3 here), while a predict with other heads (the
    kNN scorer's, fitted in memory) does not read it and answers. ``info`` reads all of them."""
    damage(store)
    before = fingerprint(store)
    code, out, _ = run(capsys, "verify", "--store", str(store))
    assert code == CORRUPT and any(part in p for p in json.loads(out)["problems"]), out
    for extra, reads in (((), True), (("--scorer", "knn"), on_open)):
        output = tmp_path / "out.jsonl"
        code, err = _predict(capsys, store, output, *extra)
        if not reads:
            assert code == 0 and len(output.read_text().splitlines()) == 96
            continue
        assert code == CORRUPT and part in err and "checksum" in err, err
        assert str(store) in err and "icl-cl verify" in err, err
        assert not output.exists()
    code, _, err = run(capsys, "info", "--store", str(store))  # it lists the fits too
    assert code == CORRUPT and part in err, err
    assert fingerprint(store) == before  # predict and info wrote nothing


def test_a_damaged_first_block_stops_the_cli_process(store, tmp_path):
    """The reproduction from the issue, as a user runs it: a separate ``icl-cl`` process."""
    _flip_vectors(1)(store)
    output = tmp_path / "out.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "icl_cl.cli",
            "-q",
            "predict",
            "--store",
            str(store),
            "--input",
            str(SAMPLE / "test.jsonl"),
            "--output",
            str(output),
            "--scorer",
            "knn",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == CORRUPT and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("icl-cl: error: ") and "session 1's vectors" in done.stderr
    assert done.stdout == "" and not output.exists()


def _opened(store: Path, embedder) -> tuple[int, int]:
    """Open the classifier; the blocks hashed and found checked before meanwhile."""
    hashed, cached = READ_CHECKS.blocks_hashed, READ_CHECKS.blocks_cached
    with ContinualClassifier.open(store, embedder=embedder, read_only=True):
        pass
    return READ_CHECKS.blocks_hashed - hashed, READ_CHECKS.blocks_cached - cached


def test_blocks_are_hashed_once_per_process_unless_the_file_changes(store, embedder, wordnet):
    """A block checked once is not hashed again while its file is as it was then, or as this
    process's own learn left it; a write elsewhere, or a file put in its place, has it checked
    again."""
    assert _opened(store, embedder)[0] == 3
    assert _opened(store, embedder) == (0, 4)  # the last block on open, then all three
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        clf.learn(wordnet[1][:5], fit=False)
    assert _opened(store, embedder) == (1, 4)  # only the new session's block
    _flip_vectors(2)(store)  # in place, after the blocks were checked
    with pytest.raises(StoreCorruptError, match="session 2's vectors"):
        _opened(store, embedder)
    _flip_vectors(2)(store)  # undone: sound again, but a new file (another inode) now
    replaced = store / "replaced.f32"
    shutil.copyfile(store / VECTORS, replaced)
    os.replace(replaced, store / VECTORS)
    assert _opened(store, embedder)[0] == 4
