"""Bad input and tampering, as a skeptical user would try them on copies of a learned store.

Every failure must be one line on stderr (no traceback) that names what was wrong and where,
with the exit code of its kind, and must leave the store as it was: the same SQLite dump, the
same vector file and manifest, and no file created or removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from icl_cl import ContinualClassifier, DataError, Example, StoreError
from icl_cl.cli import main
from icl_cl.memory.session_write import append_vectors
from icl_cl.memory.store import DATABASE, MANIFEST, VECTORS, Store
from icl_cl.memory.verify import verify_store

SAMPLE = Path(__file__).resolve().parents[1] / "eval" / "data" / "wordnet-sample"
# SQLite's own transient files come and go with connections; they hold no store state.
TRANSIENT = {f"{DATABASE}-wal", f"{DATABASE}-shm"}

DATA, USAGE, STORE, CORRUPT, BUSY, OUTPUT = 4, 2, 5, 6, 7, 8


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def fingerprint(store: Path) -> tuple:
    """The store's state: a hash of its SQLite dump (or of the raw file where SQLite cannot
    read it), of the vector file and manifest, and the names of its files."""
    names = tuple(sorted(p.name for p in store.iterdir() if p.name not in TRANSIENT))
    digest = hashlib.sha256()
    if not (store / DATABASE).exists():
        digest.update(b"no database")
    try:
        conn = sqlite3.connect(f"file:{store / DATABASE}?mode=ro", uri=True)
        for line in conn.iterdump():
            digest.update(line.encode())
        conn.close()
    except sqlite3.DatabaseError:
        if (store / DATABASE).exists():
            digest.update(b"raw:" + (store / DATABASE).read_bytes())
    for name in (VECTORS, MANIFEST):
        if (store / name).exists():
            digest.update(name.encode() + (store / name).read_bytes())
    return names, digest.hexdigest()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``icl-cl argv`` in-process: exit code, stdout, stderr; never a traceback, and a failure
    is exactly one ``icl-cl: error:`` line."""
    capsys.readouterr()
    code = main(["-q", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("icl-cl: error: "), err
    return code, out, err


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "store"
    code = main(
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
    assert code == 0
    return path


@pytest.fixture
def store(learned, tmp_path) -> Path:
    copy = tmp_path / "store"
    shutil.copytree(learned, copy)
    return copy


# ---- learn: bad input changes nothing ---------------------------------------------------------

EXISTING = json.loads((SAMPLE / "train.jsonl").read_text().splitlines()[0])["id"]
BAD_SESSIONS = [
    ("malformed", ['{"id": "n1", "text": "soup", "labels": ["noun.food"]}', '{"id": '], r":2: "),
    ("empty text", [{"id": "n1", "text": " ", "labels": ["noun.food"]}], "field 'text'"),
    ("labels missing", [{"id": "n1", "text": "soup"}], "field 'labels'"),
    ("labels not a list", [{"id": "n1", "text": "soup", "labels": "noun.food"}], "field 'labels'"),
    (
        "duplicate id",
        [
            {"id": "n1", "text": "soup", "labels": ["noun.food"]},
            {"id": "n1", "text": "stew", "labels": ["noun.food"]},
        ],
        "duplicate id (first at line 1)",
    ),
    (
        "id in the store",
        [{"id": EXISTING, "text": "stew", "labels": ["noun.food"]}],
        "id already in the store",
    ),
    (
        "no labels turns multi-label",
        [
            {"id": "n1", "text": "soup", "labels": ["noun.food"]},
            {"id": "n2", "text": "stew", "labels": []},
        ],
        "single-label and this example has 0 labels",
    ),
    (
        "two labels turn multi-label",
        [{"id": "n1", "text": "soup", "labels": ["noun.food", "noun.artifact"]}],
        "icl-cl learn --multi-label",
    ),
]


@pytest.mark.parametrize(
    "rows,message", [c[1:] for c in BAD_SESSIONS], ids=[c[0] for c in BAD_SESSIONS]
)
def test_bad_session_is_refused_naming_the_line(store, tmp_path, capsys, rows, message):
    bad = _write(tmp_path / "bad.jsonl", rows)
    before = fingerprint(store)
    code, _, err = run(capsys, "learn", "--store", str(store), "--data", str(bad))
    assert code == DATA
    assert "bad.jsonl:" in err and message in err, err
    assert fingerprint(store) == before


def test_non_utf8_is_refused_naming_the_line(store, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(
        b'{"id": "n1", "text": "ok", "labels": ["noun.food"]}\n{"id": "n2", "text": "\xff"}\n'
    )
    before = fingerprint(store)
    code, _, err = run(capsys, "learn", "--store", str(store), "--data", str(bad))
    assert code == DATA and "bad.jsonl:2: not valid UTF-8" in err
    assert fingerprint(store) == before


def test_multi_label_switch_is_explicit_and_new_labels_are_named(store, tmp_path, capsys):
    data = _write(
        tmp_path / "multi.jsonl",
        [
            {"id": "m1", "text": "a bowl of soup", "labels": ["noun.food", "noun.fod"]},
            {"id": "m2", "text": "a loaf of bread", "labels": []},
        ],
    )
    code, out, err = run(
        capsys, "learn", "--store", str(store), "--data", str(data), "--multi-label", "--no-fit"
    )
    assert code == 0
    assert json.loads(out)["new_label_names"] == ["noun.fod"]
    assert "1 new labels: noun.fod" in err  # the typo is visible
    code, out, _ = run(capsys, "info", "--store", str(store))
    assert code == 0 and json.loads(out)["multi_label"] is True


def test_non_finite_vectors_are_refused(store, embedder):
    with ContinualClassifier.open(store, embedder=embedder) as clf:
        before = fingerprint(store)
        examples = [
            Example("v1", "a pot of tea", ["noun.food"]),
            Example("v2", "a cup", ["noun.artifact"]),
        ]
        vectors = embedder.encode([ex.text for ex in examples])
        vectors[1, 7] = np.nan
        with pytest.raises(DataError, match=r"item .v2.*NaN or infinite"):
            clf.memory.learn(
                examples, vectors, [], np.zeros((0, embedder.dim), np.float32), multi_label=False
            )
        assert clf.memory.n_examples == 240
    assert fingerprint(store) == before


# ---- predict: inputs and output ---------------------------------------------------------------


def _predict(capsys, store: Path, inputs: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run(
        capsys,
        "predict",
        "--store",
        str(store),
        "--input",
        str(inputs),
        "--output",
        str(out),
        *extra,
    )


def test_predict_ids_missing_or_repeated_are_errors_naming_the_line(store, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    missing = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "soup"}, {"text": "a violin"}])
    code, _, err = _predict(capsys, store, missing, out)
    assert code == DATA and "in.jsonl:2, field 'id': missing" in err and "--ids line" in err
    twice = _write(
        tmp_path / "in2.jsonl", [{"id": "a", "text": "soup"}, {"id": "a", "text": "tea"}]
    )
    code, _, err = _predict(capsys, store, twice, out)
    assert (
        code == DATA and "in2.jsonl:2, item 'a', field 'id': duplicate id (first on line 1)" in err
    )
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
    code, _, _ = _predict(capsys, store, missing, out, "--ids", "line", "--k", "3")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]


def test_output_that_cannot_be_written_fails_before_work_and_leaves_nothing(
    store, tmp_path, capsys
):
    inputs = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "soup"}])
    before = fingerprint(store)
    folder = tmp_path / "a-folder"
    folder.mkdir()
    code, _, err = _predict(capsys, store, inputs, folder)
    assert code == OUTPUT and f"{folder}: is a directory" in err
    plain = _write(tmp_path / "plain.txt", ["x"])
    code, _, err = _predict(capsys, store, inputs, plain / "sub" / "out.jsonl")
    assert code == OUTPUT and f"{plain} is not a directory" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a-folder",
        "in.jsonl",
        "plain.txt",
        "store",
    ]
    assert list(folder.iterdir()) == []
    assert fingerprint(store) == before


# ---- tampering: a clear error, never a traceback, nothing created ------------------------------


def _edit_manifest(store: Path, **changes) -> None:
    manifest = json.loads((store / MANIFEST).read_text())
    manifest.update(changes)
    (store / MANIFEST).write_text(json.dumps(manifest))


def _random_floats(store: Path) -> None:
    size = (store / VECTORS).stat().st_size
    (store / VECTORS).write_bytes(np.random.default_rng(0).random(size // 4, np.float32).tobytes())


def _nan_rows(store: Path) -> None:
    vectors = np.fromfile(store / VECTORS, np.float32).reshape(-1, 384)
    vectors[-10:] = np.nan
    vectors.tofile(store / VECTORS)


TAMPERING = [
    ("vectors missing", lambda s: (s / VECTORS).unlink(), CORRUPT, "examples.f32: missing"),
    ("database missing", lambda s: (s / DATABASE).unlink(), CORRUPT, "store.sqlite: missing"),
    (
        "database not a database",
        lambda s: (s / DATABASE).write_bytes(b"\x00junk" * 999),
        CORRUPT,
        "store.sqlite: damaged",
    ),
    ("database cut short", lambda s: os.truncate(s / DATABASE, 4096), CORRUPT, "store.sqlite"),
    ("dim edited", lambda s: _edit_manifest(s, dim=768), CORRUPT, "says dim 768"),
    (
        "dim not a number",
        lambda s: _edit_manifest(s, dim="384"),
        CORRUPT,
        "dim must be a positive integer",
    ),
    (
        "manifest not JSON",
        lambda s: (s / MANIFEST).write_text("{oops"),
        CORRUPT,
        "unreadable manifest",
    ),
    ("another format version", lambda s: _edit_manifest(s, format_version=99), STORE, "version 99"),
    ("vectors overwritten", _random_floats, CORRUPT, "do not match their checksum"),
    ("ten rows of NaN", _nan_rows, CORRUPT, "do not match their checksum"),
    (
        "vectors cut short",
        lambda s: os.truncate(s / VECTORS, 4 * 384 * 100),
        CORRUPT,
        "examples.f32",
    ),
]


@pytest.mark.parametrize("command", ["info", "labels"])
@pytest.mark.parametrize(
    "tamper,code,message", [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING]
)
def test_tampered_store_gives_one_clear_error(store, capsys, tamper, code, message, command):
    tamper(store)
    before = fingerprint(store)
    got, _, err = run(capsys, command, "--store", str(store))
    assert got == code and message in err and str(store) in err, err
    assert fingerprint(store) == before  # nothing created (info used to create store.sqlite)
    got, _, _ = run(capsys, "verify", "--store", str(store))
    assert got == code
    assert fingerprint(store) == before


def test_database_row_edits_are_found_by_verify(store, capsys):
    assert run(capsys, "verify", "--store", str(store))[0] == 0
    conn = sqlite3.connect(store / DATABASE)
    conn.execute("UPDATE examples SET text = 'tampered' WHERE row = 3")
    conn.execute("UPDATE labels SET count = count + 1 WHERE col = 0")
    conn.commit()
    conn.close()
    code, out, _ = run(capsys, "verify", "--store", str(store))
    assert code == CORRUPT
    problems = json.loads(out)["problems"]
    assert any("examples session 1 does not match its checksum" in p for p in problems)
    assert any("labels col 0 does not match its checksum" in p for p in problems)
    assert any("stored counts differ" in p for p in problems)


def test_no_store_here_creates_nothing(tmp_path, capsys):
    for command in ("info", "labels", "verify"):
        code, _, err = run(capsys, command, "--store", str(tmp_path / "nothing"))
        assert code == STORE and "nothing" in err
    with pytest.raises(StoreError, match="no store here to open read-only"):
        ContinualClassifier.open(tmp_path / "nothing", read_only=True)
    assert list(tmp_path.iterdir()) == []


def test_forced_read_only_predicts_and_refuses_writes(store, embedder):
    """``read_only=True`` on writable storage: SQLite's ``mode=ro``, the path a read-only mount
    takes before its ``immutable=1`` fallback."""
    before = fingerprint(store)
    with ContinualClassifier.open(store, embedder=embedder, read_only=True) as clf:
        assert clf.memory.store.read_only
        assert len(clf.predict(["a bowl of soup"], k=3, use_llm=False)[0].labels) == 1
        with pytest.raises(StoreError, match="open read-only"):
            clf.learn([Example("ro1", "a cup of tea", ["noun.food"])])
        with pytest.raises(StoreError, match="open read-only"):
            clf.fit(3)
    assert fingerprint(store) == before


def test_closed_pipe_ends_quietly(learned):
    python = sys.executable
    for reader, codes in (("head -2", (0, 141)), ("true", (141,))):
        result = subprocess.run(
            [
                "bash",
                "-c",
                f"set -o pipefail; {python} -m icl_cl.cli info --store {learned} | {reader}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode in codes, result.stderr
        assert result.stderr == "", result.stderr


# ---- concurrent learns -------------------------------------------------------------------------


def test_a_busy_store_fails_fast_or_after_waiting(store, tmp_path, capsys):
    data = _write(tmp_path / "d.jsonl", [{"id": "w1", "text": "soup", "labels": ["noun.food"]}])
    holder = Store.open(store)
    before = fingerprint(store)
    with holder.writer_lock():
        code, _, err = run(
            capsys, "learn", "--store", str(store), "--data", str(data), "--wait", "0"
        )
        assert code == BUSY and "another process is learning into this store" in err
        code, _, err = run(
            capsys, "learn", "--store", str(store), "--data", str(data), "--wait", "0.3"
        )
        assert code == BUSY and "waited 0.3 s" in err
    holder.close()
    assert fingerprint(store) == before


def test_a_learn_sees_what_another_committed_meanwhile(store, embedder):
    first = ContinualClassifier.open(store, embedder=embedder)
    second = ContinualClassifier.open(store, embedder=embedder)
    same = [Example("r1", "a jar of honey", ["noun.food"])]
    second.learn(same, fit=False)
    # The same ids: the clear error, not a UNIQUE constraint from SQLite.
    with pytest.raises(DataError, match="item 'r1', field 'id': id already in the store"):
        first.learn(same, fit=False)
    # Other ids: learned on top of the other session, statistics consistent.
    first.learn([Example("r2", "a glass of milk", ["noun.food"])], fit=False)
    assert first.memory.n_examples == second.memory.n_examples + 1 == 242
    first.close()
    second.close()
    report = verify_store(store)
    assert report.ok, report.problems


# ---- read-only storage -------------------------------------------------------------------------


def _read_only_mount_works(tmp_path: Path) -> bool:
    src, mnt = tmp_path / "probe-src", tmp_path / "probe-mnt"
    src.mkdir()
    mnt.mkdir()
    script = f"mount --bind {src} {mnt} && mount -o remount,bind,ro {mnt} && ! touch {mnt}/x"
    try:
        result = subprocess.run(
            ["unshare", "-m", "sh", "-c", script], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def test_read_only_store_answers_predict_info_labels(learned, tmp_path):
    """On a real read-only bind mount (a private mount namespace, where ``unshare`` may do it),
    else with the store's files and folder made read-only for a non-root user; as root without
    ``unshare`` permission bits stop nothing, so the test is skipped rather than prove less."""
    src = tmp_path / "src"
    shutil.copytree(learned, src / "store")
    before = fingerprint(src / "store")
    inputs = _write(tmp_path / "in.jsonl", [{"id": "a", "text": "a bowl of soup"}])
    out = tmp_path / "out.jsonl"
    cli = f"{sys.executable} -m icl_cl.cli -q"
    if _read_only_mount_works(tmp_path):
        store = tmp_path / "ro"
        store.mkdir()
        prefix = f"mount --bind {src} {store} && mount -o remount,bind,ro {store} && "
        wrap = lambda cmd: ["unshare", "-m", "sh", "-c", prefix + cmd]  # noqa: E731
    elif os.geteuid() != 0:
        store = src
        for path in [*src.rglob("*"), src]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        wrap = lambda cmd: ["sh", "-c", cmd]  # noqa: E731
    else:
        pytest.skip("running as root without permission to make a read-only mount")
    s = store / "store"
    commands = [
        f"{cli} predict --store {s} --input {inputs} --output {out} --k 3",
        f"{cli} info --store {s}",
        f"{cli} labels --store {s}",
    ]
    for command in commands:
        result = subprocess.run(wrap(command), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    assert len(json.loads(out.read_text())["labels"]) == 1
    data = _write(tmp_path / "d.jsonl", [{"id": "z1", "text": "soup", "labels": ["noun.food"]}])
    result = subprocess.run(
        wrap(f"{cli} learn --store {s} --data {data}"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == STORE and "read-only" in result.stderr, result.stderr
    assert fingerprint(src / "store") == before


# ---- corruption found by verify ----------------------------------------------------------------


def test_verify_finds_random_byte_flips(tmp_path, embedder):
    """20 random single-byte flips in the vector file and 20 in the database, one at a time, of
    a store of three sessions with stored fits. A flip that verify does not report must have
    landed in bytes that hold nothing (the database's dump and the vectors are unchanged)."""
    clean = tmp_path / "clean"
    train = [json.loads(line) for line in (SAMPLE / "train.jsonl").read_text().splitlines()]
    with ContinualClassifier.open(clean, embedder=embedder) as clf:
        for part in (train[:80], train[80:160], train[160:]):
            clf.learn([Example(r["id"], r["text"], r["labels"]) for r in part], k=3)
    assert verify_store(clean).ok
    original = fingerprint(clean)
    rng = random.Random(20)
    found = {VECTORS: 0, DATABASE: 0}
    for name in (VECTORS, DATABASE):
        for _ in range(20):
            copy = tmp_path / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(clean, copy)
            data = bytearray((copy / name).read_bytes())
            data[rng.randrange(len(data))] ^= rng.randrange(1, 256)
            (copy / name).write_bytes(bytes(data))
            if not verify_store(copy).ok:
                found[name] += 1
            else:  # only where SQLite keeps no data (free space in a page, say)
                assert name == DATABASE and fingerprint(copy)[1] == original[1]
    assert found[VECTORS] == 20
    assert found[DATABASE] >= 18  # 19 of these 20; the other held no data (see above)


def test_verify_of_a_sound_store_with_an_unfinished_session(store, capsys):
    s = Store.open(store)
    append_vectors(
        s.path, s.dim, 240, np.ones((3, 384), np.float32)
    )  # as a learn killed before its commit
    s.close()
    code, out, _ = run(capsys, "verify", "--store", str(store))
    report = json.loads(out)
    assert code == 0 and report["ok"] and report["vectors_checked"] == 240
    assert "after the committed vectors" in report["notes"][0]
