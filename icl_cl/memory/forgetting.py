"""Exact forgetting and relabelling of stored examples (``icl-cl forget``, ``icl-cl relabel``).

An edit rewrites the store as if it had learned the corrected data: the forgotten rows leave the
database and the vector file (the remaining rows keep their order and sessions), relabelled rows
carry their new labels, a forgotten label leaves with its examples (in a multi-label store an
example keeps its other labels), and the statistics are recomputed from the remaining rows as
items, as ``verify`` recomputes them. The feature spaces the store keeps are edited, not
rebuilt: the changed items leave and re-enter their sums and Gram, at the strength of a store
never fitted (:mod:`~icl_cl.memory.edited_spaces`). Everything else derived from the old rows is
dropped: the spaces' solved weights and the saved HNSW indexes (made again from the stored state
on use), the fitted heads and the ``auto`` choice (made again by the next fit), the class
summaries of the labels touched. The edit is a session of the history, with its counts
and no content (table ``edits``); each earlier session keeps the count it learned, and how many
of its rows were forgotten since (``sessions.forgotten``).

Atomic: the new vector file is staged and committed with the database (see
:mod:`~icl_cl.memory.vector_swap`). Then the database is vacuumed (deleted rows were already
overwritten: ``secure_delete``) and its write-ahead log truncated, so no forgotten text stays in
the store's files.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from icl_cl.errors import DataError
from icl_cl.inputs.checks import StoreConflictError
from icl_cl.memory import vector_swap
from icl_cl.memory.checksums import block_digest, seal, seal_schema
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.edited_spaces import EditedRows, saved_spaces, write_edited
from icl_cl.memory.example_index import EXAMPLES_FILE, LABELS_FILE
from icl_cl.memory.idempotency import write_idempotency
from icl_cl.memory.item_groups import add_rows
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store import VECTORS, Store, transaction
from icl_cl.memory.store_feature_spaces import FeatureSpaces
from icl_cl.memory.stored_items import stored_inputs
from icl_cl.types import Label

EditKind = Literal["forget", "relabel"]
_SHOWN = 5

_EDITS_SCHEMA = """
CREATE TABLE IF NOT EXISTS edits (session INTEGER PRIMARY KEY, kind TEXT NOT NULL,
    examples_forgotten INTEGER NOT NULL, examples_relabelled INTEGER NOT NULL,
    labels_removed INTEGER NOT NULL, labels_added INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Edit:
    """What to forget or relabel.

    Attributes:
        kind: ``forget`` or ``relabel`` (what the history records).
        ids: Stored examples to forget.
        labels: Labels to forget with their examples.
        relabel: Per stored id, its new labels (all of them).
        definitions: Label definitions a relabel may use for labels the store does not know.
    """

    kind: EditKind
    ids: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    relabel: dict[str, tuple[str, ...]] = field(default_factory=dict)
    definitions: tuple[Label, ...] = ()


@dataclass(frozen=True)
class EditReport:
    """What an edit did (the history keeps the counts only)."""

    session: int
    kind: EditKind
    examples_forgotten: int
    examples_relabelled: int
    labels_removed: tuple[str, ...]
    labels_added: tuple[str, ...]
    examples: int
    seconds: float


@dataclass(frozen=True)
class EditPlan:
    """An edit worked out against the store, before anything is written.

    Attributes:
        keep: Per stored row, whether it stays.
        row_labels: Per stored row, its labels after the edit (``[]`` for a forgotten row).
        relabelled: Rows that stay with other labels (relabelled, or left with the labels not
            forgotten).
        removed: Labels that leave the store.
        added: New labels (definitions) a relabel brings, in order of first use.
    """

    keep: np.ndarray
    row_labels: list[list[str]]
    relabelled: list[int]
    removed: list[str]
    added: list[Label]

    @property
    def first_changed_row(self) -> int:
        changed = np.flatnonzero(~self.keep).tolist() + self.relabelled
        return min(changed, default=len(self.keep))


def _conn(store: Store) -> sqlite3.Connection:
    return store._conn  # the edit writes through the store's own connection


def stored_rows(conn: sqlite3.Connection) -> tuple[list[str], list[list[str]], list[int]]:
    """Ids, labels and sessions of every stored row, in row order."""
    rows = conn.execute("SELECT id, labels, session FROM examples ORDER BY row").fetchall()
    return [r[0] for r in rows], [json.loads(r[1]) for r in rows], [int(r[2]) for r in rows]


def plan_edit(
    store: Store, labels: Sequence[Label], multi_label: bool | None, edit: Edit
) -> EditPlan:
    """Check ``edit`` against the store (the labels it knows, in column order) and work it out.

    Rule: a label leaves only when asked (``labels``); an edit that would leave a label that had
    examples with none is refused, naming it, since predictions would silently stop giving it.

    Raises:
        DataError: An empty edit, an id, label or definition given twice, a relabel to no label.
        StoreConflictError: What the store's content refuses (the service answers 409): an id
            or label it does not hold, a relabel to several labels in a single-label store or
            to a label it does not know and the edit does not define, a definition unlike the
            stored one, or a label left without examples.
    """
    if not (edit.ids or edit.labels or edit.relabel):
        raise DataError(f"nothing to {edit.kind}: give ids or labels")
    ids, before, _sessions = stored_rows(_conn(store))
    row_of = {id_: r for r, id_ in enumerate(ids)}
    known = {lab.label for lab in labels}
    _check_given(list(edit.ids) + list(edit.relabel), row_of, "id", "stored examples")
    _check_given(list(edit.labels), known, "label", "labels of the store")
    defined = _definitions(edit.definitions, labels)
    after = [list(labs) for labs in before]
    for id_ in edit.ids:
        after[row_of[id_]] = []
    for id_, new in edit.relabel.items():
        new = list(dict.fromkeys(new))
        _check_relabel(id_, new, multi_label, known | set(defined))
        after[row_of[id_]] = new
    gone = set(edit.labels)
    after = [[lab for lab in labs if lab not in gone] for labs in after]
    keep = np.array([bool(labs) for labs in after], bool)
    _check_left(before, after, gone)
    used = dict.fromkeys(lab for labs in after for lab in labs if lab not in known)
    added = [defined[lab] for lab in used] + [d for n, d in defined.items() if n not in used]
    removed = [lab.label for lab in labels if lab.label in gone]
    changed = [r for r in range(len(after)) if keep[r] and after[r] != before[r]]
    return EditPlan(keep, after, changed, removed, added)


def _check_given(given: Sequence[str], known: object, what: str, where: str) -> None:
    seen: set[str] = set()
    for value in given:
        if value in seen:
            raise DataError(f"{what} {value!r} is given twice")
        seen.add(value)
    unknown = [value for value in given if value not in known]  # type: ignore[operator]
    if unknown:
        shown = ", ".join(repr(v) for v in unknown[:_SHOWN])
        more = f" and {len(unknown) - _SHOWN} more" if len(unknown) > _SHOWN else ""
        raise StoreConflictError(
            f"{len(unknown)} {what}s are not {where}: {shown}{more}; nothing changed"
        )


def _definitions(definitions: Sequence[Label], labels: Sequence[Label]) -> dict[str, Label]:
    """The definitions of labels the store does not know (a known one must agree)."""
    by_name = {lab.label: lab for lab in labels}
    new: dict[str, Label] = {}
    for lab in definitions:
        if lab.label in new:
            raise DataError(f"label {lab.label!r} is defined twice")
        stored = by_name.get(lab.label)
        if stored is None:
            new[lab.label] = lab
        elif (stored.name, stored.description) != (lab.name, lab.description):
            raise StoreConflictError(
                f"label {lab.label!r} is defined otherwise in the store; leave its definition "
                "out (or give the stored one)"
            )
    return new


def _check_relabel(id_: str, new: list[str], multi_label: bool | None, usable: set[str]) -> None:
    if not new:
        raise DataError(f"id {id_!r}: a relabel needs labels (forget the example instead)")
    if not multi_label and len(new) != 1:
        raise StoreConflictError(
            f"id {id_!r}: a single-label store takes exactly one label, got {new}"
        )
    unknown = [lab for lab in new if lab not in usable]
    if unknown:
        raise StoreConflictError(
            f"id {id_!r}: label {unknown[0]!r} is not in the store and has no definition; "
            "give its definition with the relabel"
        )


def _check_left(before: list[list[str]], after: list[list[str]], gone: set[str]) -> None:
    had = {lab for labs in before for lab in labs}
    has = {lab for labs in after for lab in labs}
    left = sorted(had - has - gone)
    if left:
        shown = ", ".join(repr(v) for v in left[:_SHOWN])
        raise StoreConflictError(
            f"this would leave label(s) {shown} without examples; forget a label with its "
            "examples by naming the label (icl-cl forget --label), or keep an example of it; "
            "nothing changed"
        )


def edited_statistics(
    plan: EditPlan,
    vectors: np.ndarray,
    labels: Sequence[str],
    inputs: Sequence[str | None],
    dim: int,
) -> RunningStatistics:
    """The statistics of the rows that stay, recomputed from them as items (the store's label
    order, less the removed labels, then the added ones)."""
    stats = RunningStatistics(dim)
    for label in [lab for lab in labels if lab not in set(plan.removed)]:
        stats.add_label(label)
    for lab in plan.added:
        stats.add_label(lab.label)
    kept = np.flatnonzero(plan.keep)
    add_rows(stats, vectors[kept], [plan.row_labels[r] for r in kept], [inputs[r] for r in kept])
    return stats


def drop_derived(path: Path) -> None:
    """Remove every file derived from the stored rows (rebuilt from them on use; the feature
    spaces' state is written again, edited, after the commit)."""
    for file in [*path.glob("features-*"), path / EXAMPLES_FILE, path / LABELS_FILE]:
        file.unlink(missing_ok=True)


def commit_edit(
    store: Store,
    edit: Edit,
    plan: EditPlan,
    stats: RunningStatistics,
    vectors: np.ndarray,
    added_vectors: np.ndarray,
    seconds: float,
) -> int:
    """Write an edit worked out by :func:`plan_edit` as one session (atomically: see the module)
    and return its number. The caller holds the writer lock and has checked that the store did
    not change since it was loaded."""
    store.require_writable()
    conn, path = _conn(store), Path(store.path)
    kept = np.ascontiguousarray(vectors[plan.keep], dtype=np.float32)
    drop_derived(path)
    staged = vector_swap.stage(path, kept.tobytes())
    conn.execute("PRAGMA secure_delete = ON")  # deleted rows are overwritten, not freed
    try:
        with transaction(conn):
            session = _write_edit(conn, edit, plan, stats, kept, added_vectors, seconds)
            conn.execute("INSERT INTO meta(key, value) VALUES (?, 'true')", (vector_swap.PENDING,))
            seal(conn, "meta", [vector_swap.PENDING])
            if store.pending_idempotency is not None:
                write_idempotency(conn, *store.pending_idempotency, session)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    os.replace(staged, path / VECTORS)
    vector_swap.fsync_dir(path)
    vector_swap.clear(conn)
    _vacuum(conn)
    return session


def _write_edit(
    conn: sqlite3.Connection,
    edit: Edit,
    plan: EditPlan,
    stats: RunningStatistics,
    kept: np.ndarray,
    added_vectors: np.ndarray,
    seconds: float,
) -> int:
    _ensure_schema(conn)
    session = int(conn.execute("SELECT COALESCE(MAX(session), 0) FROM sessions").fetchone()[0]) + 1
    _ids, before, sessions = stored_rows(conn)
    touched = _rewrite_examples(conn, before, sessions, plan)
    _rewrite_labels(conn, stats, plan, added_vectors, session)
    conn.executemany(
        "UPDATE statistics SET value = ? WHERE key = ?",
        [(stats.gram.tobytes(), "gram"), (stats.weighted_gram.tobytes(), "weighted_gram")],
    )
    seal(conn, "statistics", ["gram", "weighted_gram"])
    _rewrite_blocks(conn, kept, touched)
    _record(conn, session, edit, plan, seconds, len(kept))
    _drop_fitted(conn, _touched_labels(before, plan))
    return session


def _ensure_schema(conn: sqlite3.Connection) -> None:
    """The table of edits and the sessions' count of forgotten rows, added by the first edit
    (transactional DDL: rolled back with it; a column added as NULL leaves older seals valid)."""
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_schema")}
    columns = {c[1] for c in conn.execute("PRAGMA table_info(sessions)")}
    if "edits" in tables and "forgotten" in columns:
        return
    conn.execute(_EDITS_SCHEMA)
    if "forgotten" not in columns:
        conn.execute("ALTER TABLE sessions ADD COLUMN forgotten INTEGER")
    seal_schema(conn)


def _rewrite_examples(
    conn: sqlite3.Connection,
    before: list[list[str]],
    sessions: list[int],
    plan: EditPlan,
) -> list[int]:
    """Delete the forgotten rows, relabel, number the rows that stay from 0 again, and seal
    what changed; returns the sessions whose rows changed or moved."""
    n, first = len(plan.keep), plan.first_changed_row
    forgotten = np.flatnonzero(~plan.keep).tolist()
    conn.executemany("DELETE FROM examples WHERE row = ?", [(r,) for r in forgotten])
    conn.executemany(
        "UPDATE examples SET labels = ? WHERE row = ?",
        [(json.dumps(plan.row_labels[r]), r) for r in plan.relabelled],
    )
    new_row = np.cumsum(plan.keep) - 1
    moving = [r for r in range(first, n) if plan.keep[r] and new_row[r] != r]
    # Two passes through negative numbers: no row number is ever held twice.
    conn.executemany("UPDATE examples SET row = ? WHERE row = ?", [(-1 - r, r) for r in moving])
    conn.executemany(
        "UPDATE examples SET row = ? WHERE row = ?", [(int(new_row[r]), -1 - r) for r in moving]
    )
    touched = sorted({sessions[r] for r in range(first, n)})
    counts = {s: 0 for s in touched}
    for r in forgotten:
        counts[sessions[r]] += 1
    conn.executemany(
        "UPDATE sessions SET forgotten = COALESCE(forgotten, 0) + ? WHERE session = ?",
        [(c, s) for s, c in counts.items() if c],
    )
    seal(conn, "sessions", [s for s, c in counts.items() if c])
    left = {s for (s,) in conn.execute("SELECT DISTINCT session FROM examples")}
    seal(conn, "examples", [s for s in touched if s in left])
    conn.executemany(
        "DELETE FROM seals WHERE tbl = 'examples' AND unit = ?",
        [(str(s),) for s in touched if s not in left],
    )
    _drop_images(conn)
    return touched


def _drop_images(conn: sqlite3.Connection) -> None:
    """Images no stored example shows any more."""
    if not any(c[1] == "image" for c in conn.execute("PRAGMA table_info(examples)")):
        return
    gone = [
        key
        for (key,) in conn.execute(
            "SELECT key FROM images WHERE key NOT IN "
            "(SELECT image FROM examples WHERE image IS NOT NULL)"
        )
    ]
    conn.executemany("DELETE FROM images WHERE key = ?", [(k,) for k in gone])
    conn.executemany("DELETE FROM seals WHERE tbl = 'images' AND unit = ?", [(k,) for k in gone])


def _rewrite_labels(
    conn: sqlite3.Connection,
    stats: RunningStatistics,
    plan: EditPlan,
    added_vectors: np.ndarray,
    session: int,
) -> None:
    """Remove the forgotten labels, number the others from 0 again, add the new ones, write
    every label's count and sum, and seal them all."""
    conn.executemany("DELETE FROM labels WHERE label = ?", [(lab,) for lab in plan.removed])
    cols = [c for (c,) in conn.execute("SELECT col FROM labels ORDER BY col")]
    moving = [(i, c) for i, c in enumerate(cols) if i != c]
    conn.executemany("UPDATE labels SET col = ? WHERE col = ?", [(-1 - c, c) for _, c in moving])
    conn.executemany("UPDATE labels SET col = ? WHERE col = ?", [(i, -1 - c) for i, c in moving])
    conn.executemany(
        "INSERT INTO labels(col, label, name, description, grp, session, count, total, vector)"
        " VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?)",
        [
            (len(cols) + i, lab.label, lab.name, lab.description, lab.group, session,
             np.zeros(stats.dim).tobytes(), added_vectors[i].astype(np.float32).tobytes())
            for i, lab in enumerate(plan.added)
        ],
    )  # fmt: skip
    conn.executemany(
        "UPDATE labels SET count = ?, total = ? WHERE label = ?",
        [
            (int(stats.counts[c]), np.asarray(stats.sums[c], np.float64).tobytes(), label)
            for c, label in enumerate(stats.labels)
        ],
    )
    n = len(stats.labels)
    conn.execute("DELETE FROM seals WHERE tbl = 'labels' AND CAST(unit AS INTEGER) >= ?", (n,))
    seal(conn, "labels", list(range(n)))
    # The session log names the labels each session brought: a forgotten label's name goes.
    gone = set(plan.removed)
    scrubbed = []
    for s, names in conn.execute("SELECT session, new_labels FROM sessions").fetchall():
        listed = json.loads(names)
        if gone.intersection(listed):
            kept = [lab for lab in listed if lab not in gone]
            scrubbed.append((json.dumps(kept), s))
    conn.executemany("UPDATE sessions SET new_labels = ? WHERE session = ?", scrubbed)
    seal(conn, "sessions", [s for _, s in scrubbed])


def _rewrite_blocks(conn: sqlite3.Connection, kept: np.ndarray, touched: Sequence[int]) -> None:
    """The block of every session from the first touched one on (empty blocks of earlier
    edits move too): its first row in the new vector file, its rows and their checksum."""
    counts = dict(conn.execute("SELECT session, COUNT(*) FROM examples GROUP BY session"))
    end, updates, marked = 0, [], set()
    for (s,) in conn.execute("SELECT session FROM blocks ORDER BY session").fetchall():
        n = int(counts.get(s, 0))
        if touched and s >= min(touched):
            marked.add(s)
            updates.append((end, n, block_digest(kept[end : end + n].tobytes()), s))
        end += n
    conn.executemany(
        "UPDATE blocks SET first_row = ?, n_rows = ?, sha256 = ? WHERE session = ?", updates
    )
    seal(conn, "blocks", list(marked))


def _record(
    conn: sqlite3.Connection,
    session: int,
    edit: Edit,
    plan: EditPlan,
    seconds: float,
    n_rows: int,
) -> None:
    """The edit as a session of the history: its counts, no content."""
    added = [lab.label for lab in plan.added]
    conn.execute(
        "INSERT INTO sessions(session, created_at, n_examples, new_labels, seconds)"
        " VALUES (?, ?, 0, ?, ?)",
        (session, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), json.dumps(added), seconds),
    )
    conn.execute(
        "INSERT INTO blocks(session, first_row, n_rows, sha256) VALUES (?, ?, 0, ?)",
        (session, n_rows, block_digest(b"")),
    )
    conn.execute(
        "INSERT INTO edits(session, kind, examples_forgotten, examples_relabelled,"
        " labels_removed, labels_added) VALUES (?, ?, ?, ?, ?, ?)",
        (session, edit.kind, int((~plan.keep).sum()), len(plan.relabelled),
         len(plan.removed), len(plan.added)),
    )  # fmt: skip
    seal(conn, "sessions", [session])
    seal(conn, "blocks", [session])
    seal(conn, "edits", [session])


def _drop_fitted(conn: sqlite3.Connection, labels: set[str]) -> None:
    """What was fitted on the old rows (heads, the ``auto`` choice) and the class summaries of
    the labels whose examples changed: made again from the rows that stay."""
    conn.execute("DELETE FROM fitted")
    conn.execute("DELETE FROM seals WHERE tbl = 'fitted'")
    conn.executemany("DELETE FROM summaries WHERE label = ?", [(lab,) for lab in labels])
    conn.executemany(
        "DELETE FROM seals WHERE tbl = 'summaries' AND unit = ?", [(lab,) for lab in labels]
    )


def _touched_labels(before: list[list[str]], plan: EditPlan) -> set[str]:
    """Labels whose examples change: those of forgotten and relabelled rows, before and after."""
    rows = np.flatnonzero(~plan.keep).tolist() + plan.relabelled
    touched = {lab for r in rows for lab in before[r]}
    touched |= {lab for r in plan.relabelled for lab in plan.row_labels[r]}
    return touched | set(plan.removed)


def _vacuum(conn: sqlite3.Connection) -> None:
    """Rebuild the database file from its live rows and empty the write-ahead log."""
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA secure_delete = OFF")


def edit_memory(
    memory: ExternalContinualLearner,
    edit: Edit,
    encode: Callable[[list[str]], np.ndarray],
    start: float,
) -> EditReport:
    """Check, work out and commit ``edit`` on the store of ``memory`` (whose state must be the
    store's: the caller holds the writer lock and reloaded it if another process wrote);
    ``encode`` embeds the texts of the labels a relabel adds. ``memory`` is stale afterwards:
    open a new one on the store."""
    store = memory.store
    store.require_writable()
    plan = plan_edit(store, memory.labels, memory.multi_label, edit)
    added_vectors = (
        encode([lab.text for lab in plan.added])
        if plan.added
        else np.zeros((0, store.dim), np.float32)
    )
    vectors = memory.index.vectors_all()
    inputs = stored_inputs(store, len(vectors), bool(memory.multi_label))
    stats = edited_statistics(plan, vectors, memory.stats.labels, inputs, store.dim)
    # The feature spaces the store keeps, read (and caught up) before the edit removes them.
    spaces = FeatureSpaces(store, memory.index, memory.config, lambda: None)
    carried = {name: memory.feature_space(name) for name in saved_spaces(spaces, memory.n_items)}
    stored_labels = store.row_labels() if carried else []
    seconds = time.perf_counter() - start
    session = commit_edit(store, edit, plan, stats, vectors, added_vectors, seconds)
    if carried:
        changed = np.flatnonzero(~plan.keep).tolist() + plan.relabelled
        rows = EditedRows(plan.keep, changed, stored_labels, plan.row_labels)
        write_edited(
            spaces, carried, rows, vectors, inputs, labels=stats.labels, n_items=stats.n_examples
        )
    return EditReport(
        session=session,
        kind=edit.kind,
        examples_forgotten=int((~plan.keep).sum()),
        examples_relabelled=len(plan.relabelled),
        labels_removed=tuple(plan.removed),
        labels_added=tuple(lab.label for lab in plan.added),
        examples=int(plan.keep.sum()),
        seconds=time.perf_counter() - start,
    )


def edits(store: Store) -> list[dict[str, object]]:
    """The edits in the store's history, oldest first (counts only)."""
    conn = _conn(store)
    if conn.execute("SELECT 1 FROM sqlite_schema WHERE name = 'edits'").fetchone() is None:
        return []
    cursor = conn.execute("SELECT * FROM edits ORDER BY session")
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor]
