"""The corruption matrix: damage to each part of a store, and what the commands and the service do.

One store of three sessions with stored fits, both feature scorers' checkpoints and saved HNSW
indexes is learned once; each case damages a fresh copy of one part and runs the real command
line and the service's app on it.

- Source data (a vector block of the first, a middle or the last session; a statistics row, a
  fitted row, a label row): ``verify`` exits 6 naming the part, ``predict`` exits 6 with one
  line naming the part (never an answer, never a traceback) and writes nothing, unless it does
  not read that part at all, and ``info`` exits 6 the same way. The service does not start on a
  part that opening reads (``icl-cl serve`` exits 6 with that line), and answers a predict that
  reads a damaged part with an error naming it, never a 200 and never a traceback.
- Derived files (each feature checkpoint: learner state, solved weights, their header; each
  saved index): ``verify`` exits 6 naming the file, and ``predict``, ``info`` and the service
  answer as from the undamaged store (the file rebuilt in memory), writing nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from starlette.testclient import TestClient

from icl_cl import ContinualClassifier, StoreCorruptError
from icl_cl.cli import main
from icl_cl.memory.checksums import READ_CHECKS
from icl_cl.memory.store import DATABASE, VECTORS
from icl_cl.service.app import create_app, open_store
from icl_cl.service.settings import ServiceSettings
from tests.service_helpers import free_port, start_cli
from tests.test_integrity import CORRUPT, SAMPLE, TRANSIENT, fingerprint, run

ROW_BYTES = 4 * 384
# Saved HNSW indexes above these sizes: 100 examples (the store has 240), 4 labels (it has 8).
SMALL_EXACT_LIMITS = "memory:\n  exact_search_max: 100\n  label_exact_search_max: 4\n"
# The service at the k of the stored heads: no refit at start, so nothing rewrites a damaged
# file while a case runs, and an answer of 200 comes from what it rebuilt in memory.
SERVICE = ServiceSettings(default_k=3)
TEXTS = [json.loads(line) for line in (SAMPLE / "test.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    """Three sessions of 80 examples; heads fitted and stored after the last; klda's and
    ranpac's checkpoints; the saved HNSW indexes of examples and labels."""
    folder = tmp_path_factory.mktemp("corruption")
    lines = (SAMPLE / "train.jsonl").read_text().splitlines()
    path = folder / "store"
    config = folder / "config.yaml"
    config.write_text(SMALL_EXACT_LIMITS)
    for i in range(3):
        part = folder / f"part{i}.jsonl"
        part.write_text("\n".join(lines[80 * i : 80 * (i + 1)]) + "\n")
        argv = ["-q", "learn", "--store", str(path), "--data", str(part), "--k", "3"]
        if i == 0:
            argv += ["--labels", str(SAMPLE / "labels.jsonl"), "--config", str(config)]
        if i < 2:
            argv.append("--no-fit")
        assert main(argv) == 0
    for scorer in ("klda", "ranpac"):  # each keeps its feature space's checkpoint
        assert main(["-q", "fit", "--store", str(path), "--k", "3", "--scorer", scorer]) == 0
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
    """Edit every stored calibration temperature (fitted rows) to another valid number."""
    conn = sqlite3.connect(store / DATABASE)
    edited = 0
    for key, value in conn.execute("SELECT key, value FROM fitted").fetchall():
        fitted = json.loads(value)
        if _scale(fitted):
            conn.execute(
                "UPDATE fitted SET value = ? WHERE key = ?",
                (json.dumps(fitted, sort_keys=True), key),
            )
            edited += 1
    conn.commit()
    conn.close()
    assert edited, "no stored temperature"


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


def _body(scorer: str) -> dict[str, Any]:
    return {"inputs": [{"id": t["id"], "text": t["text"]} for t in TEXTS], "k": 3, "scorer": scorer}


def _served(
    store: Path, embedder: Any, scorers: list[str], settings: ServiceSettings = SERVICE
) -> list[Any]:
    """The service's answers to a predict of the sample's test texts with each scorer: the real
    app (routes, middleware, error answers) in-process, its store opened as ``icl-cl serve``
    opens it before it listens."""
    app = create_app(store, settings=settings, embedder=embedder)
    open_store(app)
    with TestClient(app, raise_server_exceptions=False) as client:
        return [client.post("/v1/predict", json=_body(scorer)) for scorer in scorers]


@pytest.mark.parametrize("damage,part,on_open", [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX])
def test_the_service_never_answers_from_damaged_source_data(store, embedder, damage, part, on_open):
    """The service does not start on any of them: opening reads the source data, and the stored
    heads of its default k; the error names the part (``icl-cl serve`` reports it as one line,
    exit code 6). A service whose default k is another than the stored heads' starts on a
    damaged fitted row, and answers the predicts that use those heads with an error naming it,
    while the kNN scorer's, fitted in memory, answer 200."""
    damage(store)
    with pytest.raises(StoreCorruptError, match=re.escape(part)):
        open_store(create_app(store, settings=SERVICE, embedder=embedder))
    if on_open:
        return
    default, knn = _served(store, embedder, ["auto", "knn"], ServiceSettings(default_k=10))
    assert default.status_code == 500 and part in default.json()["detail"], default.text
    assert "checksum" in default.json()["detail"] and "Traceback" not in default.text
    assert knn.status_code == 200 and len(knn.json()["predictions"]) == len(TEXTS)


def _flip_file(pattern: str) -> Callable[[Path], None]:
    """XOR one byte in the middle of the store's one file named like ``pattern``."""

    def damage(store: Path) -> None:
        (file,) = store.glob(pattern)
        data = bytearray(file.read_bytes())
        data[len(data) // 2 + 7] ^= 64
        file.write_bytes(bytes(data))

    return damage


def _other_sha256(pattern: str) -> Callable[[Path], None]:
    """Another SHA-256 in a solved weights' header (its JSON still valid)."""

    def damage(store: Path) -> None:
        (file,) = store.glob(pattern)
        header = json.loads(file.read_text())
        header["sha256"] = hashlib.sha256(b"other weights").hexdigest()
        file.write_text(json.dumps(header))

    return damage


KLDA, RANPAC = "features-rff-*", "features-relu-*"  # their random feature maps
# (name, damage, the file verify names, the scorer whose predictions read it)
DERIVED = [
    ("examples index", _flip_file("examples.hnsw"), "examples.hnsw", "knn"),
    ("labels index", _flip_file("labels.hnsw"), "labels.hnsw", "knn"),
    ("klda learner state", _flip_file(f"{KLDA}.npz"), f"{KLDA}.npz", "klda"),
    ("klda solved weights", _flip_file(f"{KLDA}.solved.npy"), f"{KLDA}.solved.npy", "klda"),
    ("klda weights' header", _other_sha256(f"{KLDA}.solved.json"), f"{KLDA}.solved.npy", "klda"),
    ("ranpac learner state", _flip_file(f"{RANPAC}.npz"), f"{RANPAC}.npz", "ranpac"),
    ("ranpac solved weights", _flip_file(f"{RANPAC}.solved.npy"), f"{RANPAC}.solved.npy", "ranpac"),
    (
        "ranpac weights' header",
        _other_sha256(f"{RANPAC}.solved.json"),
        f"{RANPAC}.solved.npy",
        "ranpac",
    ),
]
SCORERS = sorted({d[3] for d in DERIVED})


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _files(store: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(store.iterdir()) if p.name not in TRANSIENT}


def _same(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """The same labels, and scores within float rounding (a rebuilt HNSW graph sums in another
    order)."""
    assert [(r["id"], r["labels"]) for r in got] == [(r["id"], r["labels"]) for r in expected]
    for row, want in zip(got, expected, strict=True):
        assert row["scores"].keys() == want["scores"].keys()
        np.testing.assert_allclose(
            [row["scores"][label] for label in want["scores"]],
            list(want["scores"].values()),
            atol=1e-5,
        )


@pytest.fixture(scope="module")
def reference(learned, embedder, tmp_path_factory) -> dict[str, tuple[list, list]]:
    """Each scorer's predictions on the undamaged store: the command line's and the service's."""
    folder = tmp_path_factory.mktemp("reference")
    answers = {}
    for scorer in SCORERS:
        out = folder / f"{scorer}.jsonl"
        argv = ["-q", "predict", "--store", str(learned), "--input", str(SAMPLE / "test.jsonl")]
        assert main([*argv, "--output", str(out), "--k", "3", "--scorer", scorer]) == 0
        answers[scorer] = _rows(out)
    shutil.copytree(learned, folder / "store")  # the service opens its store to write
    served = _served(folder / "store", embedder, SCORERS)
    assert all(answer.status_code == 200 for answer in served)
    return {s: (answers[s], a.json()["predictions"]) for s, a in zip(SCORERS, served, strict=True)}


@pytest.mark.parametrize(
    "damage,named,scorer", [d[1:] for d in DERIVED], ids=[d[0] for d in DERIVED]
)
def test_damaged_derived_files_are_rebuilt_in_memory(
    store, tmp_path, capsys, embedder, reference, damage, named, scorer
):
    """verify reports the file; predict, info and the service answer as from the undamaged
    store, from what they rebuild in memory, and leave the file as it is (a learn or fit
    rewrites it)."""
    damage(store)
    (file,) = store.glob(named)
    before = _files(store)
    code, out, _ = run(capsys, "verify", "--store", str(store))
    problems = json.loads(out)["problems"]
    assert code == CORRUPT and len(problems) == 1, out
    assert file.name in problems[0] and "derived" in problems[0], out
    output = tmp_path / "out.jsonl"
    assert _predict(capsys, store, output, "--scorer", scorer)[0] == 0
    _same(_rows(output), reference[scorer][0])
    assert run(capsys, "info", "--store", str(store))[0] == 0
    assert _files(store) == before  # verify, predict and info wrote nothing
    (answer,) = _served(store, embedder, [scorer])
    assert answer.status_code == 200, answer.text
    _same(answer.json()["predictions"], reference[scorer][1])
    assert file.read_bytes() == before[file.name]  # answered from what was rebuilt in memory


def test_a_damaged_labels_index_is_rebuilt_to_the_same_neighbours(learned, store, embedder):
    """What reads the labels' index (label retrieval: Infer-Retrieve-Rank, suggest) finds the
    same labels in a store whose saved index is damaged."""
    _flip_file("labels.hnsw")(store)
    queries = embedder.encode([t["text"] for t in TEXTS[:16]])
    found = []
    for path in (learned, store):
        with ContinualClassifier.open(path, embedder=embedder, read_only=True) as clf:
            found.append(clf.memory.retrieve_labels(queries, 3))
    np.testing.assert_array_equal(found[0][1], found[1][1])
    np.testing.assert_allclose(found[0][0], found[1][0], atol=1e-5)


def test_a_damaged_first_block_stops_the_cli_process(store, tmp_path):
    """The reproduction from the issue, as a user runs it: a separate ``icl-cl`` process; and
    ``icl-cl serve`` on the same store."""
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
    # The service does not start on it: one line and the exit code, before it listens.
    log = tmp_path / "serve.log"
    server = start_cli(store, free_port(), log)
    try:
        code = server.wait(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)
    text = log.read_text()
    assert code == CORRUPT and "Traceback" not in text, text
    assert text.splitlines()[-1].startswith("icl-cl: error: "), text
    assert "session 1's vectors" in text.splitlines()[-1], text


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
