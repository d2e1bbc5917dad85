"""Where distributed work reads from: a JSONL or Parquet file, or a folder of them.

Each file is one shard of a distributed learn; errors name the file and its line (JSONL) or row
(Parquet, counted from 1), like the in-process reader's.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from icl_cl.errors import DataError
from icl_cl.inputs import iter_jsonl

SUFFIXES = (".jsonl", ".parquet")
"""File kinds read as input; a folder's other files are ignored."""


def input_files(path: str | Path) -> list[Path]:
    """The files of an input: the file itself, or a folder's JSONL and Parquet files (sorted by
    name, looked up recursively), so that shard order does not depend on the file system."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise DataError(f"expected a {' or '.join(SUFFIXES)} file", source=str(path))
        return [path]
    if not path.is_dir():
        raise DataError("no such file or folder", source=str(path))
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise DataError(f"no {' or '.join(SUFFIXES)} files in this folder", source=str(path))
    return files


def iter_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, object)`` per record of a JSONL file, or ``(row, object)`` of a Parquet file."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise DataError(f"unreadable Parquet: {exc}", source=str(path)) from exc
        yield from enumerate(table.to_pylist(), start=1)
    else:
        yield from iter_jsonl(path)
