"""The store: crash safety (real SIGKILL), atomic creation, versions, single writer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from icl_cl import ContinualClassifier, Example, StoreError
from icl_cl.memory.session_write import append_vectors
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store import MANIFEST, VECTORS, Store

CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["HF_HUB_OFFLINE"] = "1"
    from icl_cl import ContinualClassifier, Example
    clf = ContinualClassifier.open(sys.argv[1])
    words = ["river", "stone", "cloud", "engine", "violin", "garden", "planet", "market"]
    session = 0
    while True:
        examples = [
            Example(f"s{session}-{j}", f"{words[j % 8]} number {j} of batch {session}",
                    [f"label-{(session + j) % 5}"])
            for j in range(60)
        ]
        clf.learn(examples, fit=False)
        print(f"ACK {session}", flush=True)
        session += 1
    """
)


def _check_consistent(path) -> int:
    """Reopen, recompute statistics from the stored vectors and labels, compare; return sessions."""
    store = Store.open(path)
    vectors = store.load_vectors()
    stats, _labels, _ = store.load_statistics()
    recomputed = RunningStatistics(store.dim)
    rows = store.row_labels()
    recomputed.apply(recomputed.delta(vectors, rows))
    assert sorted(recomputed.labels) == sorted(stats.labels)
    order = [stats.col[lab] for lab in recomputed.labels]
    np.testing.assert_array_equal(stats.counts[order], recomputed.counts)
    np.testing.assert_allclose(stats.sums[order], recomputed.sums, atol=1e-6)
    np.testing.assert_allclose(stats.gram, recomputed.gram, atol=1e-6)
    sessions = store.sessions()
    assert sum(s.n_examples for s in sessions) == len(vectors) == store.n_examples()
    store.close()
    return len(sessions)


@pytest.mark.parametrize("delay", [0.05, 0.25, 0.6])
def test_sigkill_during_learn_keeps_every_acknowledged_session(tmp_path, delay):
    path = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    acked = -1
    deadline = time.time() + 120
    assert proc.stdout is not None
    while acked < 1 and time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("ACK"):
            acked = int(line.split()[1])
    time.sleep(delay)  # land somewhere inside a later learn: embedding, vector append or commit
    proc.send_signal(signal.SIGKILL)
    rest, _ = proc.communicate()
    acked = max([acked] + [int(x.split()[1]) for x in rest.splitlines() if x.startswith("ACK")])
    assert acked >= 1
    n_sessions = _check_consistent(path)
    assert n_sessions >= acked + 1  # nothing acknowledged is lost (one more may have committed)
    # The store is fully usable afterwards: a new session lands after the committed ones.
    clf = ContinualClassifier.open(path)
    clf.learn([Example("after-crash", "a quiet river", ["label-0"])])
    assert clf.predict(["river"], k=2)[0].labels
    clf.close()
    assert _check_consistent(path) == n_sessions + 1


def test_vectors_of_an_unfinished_session_are_ignored_and_overwritten(tmp_path, embedder):
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.learn([Example("a", "red apple", ["fruit"]), Example("b", "green pear", ["fruit"])])
    # Simulate a crash after the vectors were appended but before the commit.
    append_vectors(clf.memory.store.path, embedder.dim, 2, np.ones((5, embedder.dim), np.float32))
    clf.close()
    assert (tmp_path / "s" / VECTORS).stat().st_size == 7 * 4 * embedder.dim
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    assert clf.memory.index.size == 2
    clf.learn([Example("c", "yellow banana", ["fruit"])])
    assert (tmp_path / "s" / VECTORS).stat().st_size == 3 * 4 * embedder.dim
    assert _check_consistent(tmp_path / "s") == 2


def test_failed_commit_changes_nothing_on_disk_or_in_memory(tmp_path, embedder, monkeypatch):
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.learn([Example("a", "red apple", ["fruit"])])
    sums = clf.memory.stats.sums.copy()

    # Inject a storage fault after the vector append (the commit's executemany fails).
    monkeypatch.setattr(clf.memory.store, "_conn", _FailingConnection(clf.memory.store._conn))
    with pytest.raises(OSError):
        clf.learn([Example("b", "blue car", ["vehicle"])])
    monkeypatch.undo()
    np.testing.assert_array_equal(clf.memory.stats.sums, sums)
    assert clf.memory.stats.labels == ["fruit"]
    assert clf.memory.index.size == 1
    clf.close()
    assert _check_consistent(tmp_path / "s") == 1


class _FailingConnection:
    """Wraps a sqlite3 connection and fails the first example insert, like a full disk would."""

    def __init__(self, conn):
        self._conn = conn

    def executemany(self, sql, rows):
        if sql.startswith("INSERT INTO examples"):
            raise OSError("disk full")
        return self._conn.executemany(sql, rows)

    def __getattr__(self, name):
        return getattr(self._conn, name)


def test_store_from_another_format_version_is_refused(tmp_path, embedder):
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    clf.close()
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    manifest["format_version"] = 99
    (tmp_path / "s" / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="version 99"):
        ContinualClassifier.open(tmp_path / "s", embedder=embedder)


def test_creation_never_leaves_a_half_store(tmp_path, embedder):
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "notes.txt").write_text("user data")
    with pytest.raises(StoreError, match="not an empty directory"):
        ContinualClassifier.open(target, embedder=embedder)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["occupied"]  # no temporary leftovers
    empty = tmp_path / "empty"
    empty.mkdir()
    ContinualClassifier.open(empty, embedder=embedder).close()
    assert (empty / MANIFEST).exists()


def test_second_writer_is_refused(tmp_path, embedder):
    clf = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    other = ContinualClassifier.open(tmp_path / "s", embedder=embedder)
    with clf.memory.store.writer_lock(), pytest.raises(StoreError, match="another process"):
        other.learn([Example("x", "some text", ["a"])])
    assert other.memory.n_examples == 0
    clf.close()
    other.close()


def test_store_does_not_mix_embedders(tmp_path, embedder):
    from icl_cl import ClassifierConfig, ConfigError, EmbedderConfig

    ContinualClassifier.open(tmp_path / "s", embedder=embedder).close()
    with pytest.raises(ConfigError, match="built with embedder"):
        ContinualClassifier.open(
            tmp_path / "s", ClassifierConfig(embedder=EmbedderConfig(model="some/other-model"))
        )


def test_wal_mode_and_layout(tmp_path, embedder):
    ContinualClassifier.open(tmp_path / "s", embedder=embedder).close()
    store = Store.open(tmp_path / "s")
    assert store._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    assert {p.name for p in (tmp_path / "s").iterdir()} >= {MANIFEST, "store.sqlite", VECTORS}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert os.access(tmp_path / "s" / MANIFEST, os.R_OK)
