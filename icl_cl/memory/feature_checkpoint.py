"""Files a feature space keeps beside the store, both derived (rebuilt from the stored vectors
when missing, stale or damaged, never a source of truth):

- ``features-<map>.npz``, the learner state: label counts and sums, and the inverse Gram as its
  upper triangle (half the bytes of the square). Rewritten once enough rows are missing from it;
  an open catches it up from the stored vectors by the same Woodbury update as a session.
- ``features-<map>.solved.npy`` with a ``.json`` header, the solved weights and biases in float32
  (labels x (M + 1)): all a prediction reads, memory-mapped, never the learner state. The header
  names the rows, labels, map and settings it was solved for, and the SHA-256 of the weights.

Every file is written to a temporary name, fsynced, then renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.memory.feature_space import FeatureSpace, SpaceKind
from icl_cl.memory.inverse_gram import InverseGram
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.scorers import LinearHead
from icl_cl.memory.statistics import RunningStatistics

logger = logging.getLogger(__name__)

# Written by this version; another is rebuilt.
FORMAT = 2
# Columns mirrored at a time when a packed triangle is unpacked.
_BAND = 256


def _fsynced(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def pack_upper(matrix: np.ndarray) -> np.ndarray:
    """The upper triangle of a symmetric matrix, row by row."""
    return np.concatenate([matrix[i, i:] for i in range(len(matrix))])


def unpack_upper(packed: np.ndarray, size: int) -> np.ndarray:
    """The symmetric matrix whose upper triangle :func:`pack_upper` gave."""
    out = np.empty((size, size), dtype=np.float64)
    at = 0
    for i in range(size):
        out[i, i:] = packed[at : at + size - i]
        at += size - i
    # The lower triangle, a band of columns at a time (whole-row copies, not strided writes).
    for lo in range(0, size, _BAND):
        hi = min(lo + _BAND, size)
        out[hi:, lo:hi] = out[lo:hi, hi:].T
        block = out[lo:hi, lo:hi]
        block[:] = np.triu(block) + np.triu(block, 1).T
    return out


def write_state(space: FeatureSpace, path: Path) -> None:
    """Save the learner state of ``space``."""
    stats = space.stats
    header = {
        "format": FORMAT,
        "kind": space.kind,
        "features": space.features.name,
        "digest": space.features.digest,
        "rows": space.rows,
        "labels": stats.labels,
        "items": space.items,
        "strength": space.solver.strength,
        "scale": space.scale,
        "n_examples": stats.n_examples,
        "choice": space.choice,
        "strength_items": space.strength_items,
    }
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(
            f,
            header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            counts=stats.counts,
            sums=stats.sums,
            inverse=pack_upper(space.solver.inverse),
        )
    _fsynced(tmp, path)


def read_state(
    path: Path, kind: SpaceKind, features: RandomFeatures, labels: Sequence[str], items: bool
) -> FeatureSpace | None:
    """The learner state at ``path`` if it exists and fits this map, kind and these labels."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(data["header"].tobytes().decode())
            ok = (
                header.get("format") == FORMAT
                and header["kind"] == kind
                and header["digest"] == features.digest
                and header["items"] == items
                and header["labels"] == list(labels[: len(header["labels"])])
            )
            if not ok:
                logger.warning("%s does not match this store's feature space: rebuilt", path)
                return None
            stats = RunningStatistics(features.size, weighted=False, gram=False)
            counts, sums = data["counts"], data["sums"]
            for i, label in enumerate(header["labels"]):
                stats.add_label(label, int(counts[i]), sums[i])
            stats.n_examples = int(header["n_examples"])
            size = features.size + (1 if kind == "ridge" else 0)
            inverse = unpack_upper(data["inverse"], size)
    except (OSError, ValueError, KeyError, EOFError) as exc:
        logger.warning("unreadable feature checkpoint %s (%s): rebuilt", path, exc)
        return None
    solver = InverseGram(inverse, float(header["strength"]))
    space = FeatureSpace(
        kind, features, stats, solver, float(header["scale"]), int(header["rows"]), items
    )
    space.choice = header.get("choice")
    space.strength_items = int(header.get("strength_items", 0))
    return space


def solved_paths(state: Path) -> tuple[Path, Path]:
    """The solved weights' file and its header, beside the learner state ``state``."""
    stem = state.name.removesuffix(".npz")
    return state.with_name(f"{stem}.solved.npy"), state.with_name(f"{stem}.solved.json")


def write_solved(head: LinearHead, state: Path, describes: Mapping[str, Any]) -> None:
    """Save a solved head (what ``describes`` says it was solved for) beside ``state``."""
    weights_path, header_path = solved_paths(state)
    table = np.hstack([head.weights, head.bias[:, None]]).astype(np.float32)
    tmp = weights_path.with_name(f".{weights_path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, table)
    _fsynced(tmp, weights_path)
    header = {
        **describes,
        "counts": [int(c) for c in head.counts],
        "sha256": hashlib.sha256(table.tobytes()).hexdigest(),
    }
    tmp = header_path.with_name(f".{header_path.name}.tmp")
    tmp.write_text(json.dumps(header))
    _fsynced(tmp, header_path)


def read_solved(state: Path, describes: Mapping[str, Any]) -> LinearHead | None:
    """The solved head beside ``state`` if it was solved for what ``describes`` says and its
    bytes are intact; ``None`` otherwise (the caller solves in memory)."""
    weights_path, header_path = solved_paths(state)
    try:
        header = json.loads(header_path.read_text())
        if any(header.get(key) != value for key, value in describes.items()):
            return None
        table = np.load(weights_path, mmap_mode="r", allow_pickle=False)
        if hashlib.sha256(np.ascontiguousarray(table).tobytes()).hexdigest() != header["sha256"]:
            logger.warning("%s is damaged: solved again in memory", weights_path)
            return None
    except (OSError, ValueError, KeyError) as exc:
        logger.debug("no usable solved weights at %s (%s)", weights_path, exc)
        return None
    counts = np.asarray(header["counts"], np.int64)
    return LinearHead(table[:, :-1], table[:, -1], counts)
