"""Running statistics of the stored examples in a random feature space (RanPAC, KLDA).

They are sums over items like the embedding-space statistics (see
:mod:`~icl_cl.memory.item_groups`), but ``M x M`` with ``M`` in the
thousands, so they are not rewritten into SQLite at every session. They are *derived* state: a
pure function of the stored vectors and labels. A checkpoint file beside the store records how
many stored rows it covers; opening reads it and adds the rows learned since (exact: sums do not
depend on order), and a missing, stale or damaged checkpoint is rebuilt from the stored vectors.
Nothing acknowledged can be lost through it, and a read-only store still opens.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from icl_cl.memory.features import RandomFeatures
from icl_cl.memory.item_groups import Additions, add_rows
from icl_cl.memory.statistics import RunningStatistics, StatisticsDelta

logger = logging.getLogger(__name__)

# A checkpoint is rewritten once this many learned rows are not in it yet: catching up that many
# rows on open costs about as much as one rewrite.
CHECKPOINT_EVERY = 2048


class FeatureSpace:
    """Per-label sums and Gram matrices of the stored examples' random features.

    Args:
        features: The fixed feature map.
        stats: Statistics over the features, label columns aligned with the store's.
        rows: Stored rows (from the first) that ``stats`` covers.
    """

    def __init__(self, features: RandomFeatures, stats: RunningStatistics, rows: int) -> None:
        self.features = features
        self.stats = stats
        self.rows = rows
        self._saved_rows = rows
        # Whether rows are grouped into items (a multi-label store): kept in the checkpoint, so
        # that one written with every row counted apart is never read as item statistics.
        self.items = False

    @classmethod
    def build(
        cls,
        features: RandomFeatures,
        *,
        weighted: bool,
        labels: Sequence[str],
        vectors: np.ndarray,
        row_labels: Sequence[Sequence[str]],
        inputs: Sequence[str] | None,
        checkpoint: Path | None = None,
    ) -> FeatureSpace:
        """The statistics of ``vectors`` (every stored row), starting from ``checkpoint`` when it
        is valid for this map, and adding the rows it does not cover; rows are grouped into
        items by their ``inputs`` (``None``: every row is an item, as in a single-label store)."""
        items = inputs is not None
        space = cls._read(checkpoint, features, weighted, labels, items) if checkpoint else None
        if space is None:
            stats = RunningStatistics(features.size, weighted=weighted)
            space = cls(features, stats, 0)
            space._saved_rows = -1  # nothing valid on disk
        space.items = items
        # Every store column first (in the store's order), so the rows added below find theirs.
        for label in labels:
            if label not in space.stats.col:
                space.stats.add_label(label)
        missing = len(vectors) - space.rows
        if missing:
            logger.info("feature space %s: adding %d stored rows", features.name, missing)
            add_rows(
                space.stats,
                vectors,
                row_labels,
                [None] * len(vectors) if inputs is None else inputs,
                start=space.rows,
                transform=features.transform,
            )
            space.rows = len(vectors)
        if space.stats.labels != list(labels):
            raise ValueError(
                f"feature space {features.name}: label columns differ from the store's"
            )
        return space

    def delta(self, added: Additions) -> StatisticsDelta:
        """What new rows add in this space (computed block by block)."""
        return added.delta(self.stats, self.features.transform)

    def apply(self, delta: StatisticsDelta, rows: int) -> None:
        """Add the delta of ``rows`` new stored rows (copies of stored items add no example)."""
        self.stats.apply(delta)
        self.rows += rows

    def save_if_behind(self, checkpoint: Path) -> bool:
        """Rewrite the checkpoint when enough rows are missing from it; ``False`` when the store
        cannot be written (read-only): the statistics are then caught up in memory on open."""
        if self.rows - self._saved_rows < CHECKPOINT_EVERY:
            return True
        try:
            self._write(checkpoint)
            # Checkpoints of this kind at another width are obsolete once the store has grown.
            for old in checkpoint.parent.glob(f"features-{self.features.kind}-*.npz"):
                if old != checkpoint:
                    old.unlink()
        except OSError as exc:
            logger.warning("cannot write %s (%s): it will be caught up on open", checkpoint, exc)
            return False
        self._saved_rows = self.rows
        return True

    def _write(self, path: Path) -> None:
        stats = self.stats
        header = {
            "features": self.features.name,
            "digest": self.features.digest,
            "rows": self.rows,
            "labels": stats.labels,
            "weighted": stats.weighted_gram is not None,
            "items": self.items,
        }
        arrays = {
            "header": np.frombuffer(json.dumps(header).encode(), dtype=np.uint8),
            "counts": stats.counts,
            "sums": stats.sums,
            "gram": stats.gram,
            "n_examples": np.array([stats.n_examples]),
        }
        if stats.weighted_gram is not None:
            arrays["weighted_gram"] = stats.weighted_gram
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def _read(
        cls,
        path: Path,
        features: RandomFeatures,
        weighted: bool,
        labels: Sequence[str],
        items: bool,
    ) -> FeatureSpace | None:
        """The checkpoint at ``path`` if it exists and fits this map and these labels."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(data["header"].tobytes().decode())
                ok = (
                    header["digest"] == features.digest
                    and header["weighted"] == weighted
                    and header.get("items", False) == items
                    and header["labels"] == list(labels[: len(header["labels"])])
                )
                if not ok:
                    logger.warning("%s does not match this store's feature map: rebuilt", path)
                    return None
                stats = RunningStatistics(features.size, weighted=weighted)
                counts, sums = data["counts"], data["sums"]
                for i, label in enumerate(header["labels"]):
                    stats.add_label(label, int(counts[i]), sums[i])
                stats.gram = np.array(data["gram"])
                if weighted:
                    stats.weighted_gram = np.array(data["weighted_gram"])
                stats.n_examples = int(data["n_examples"][0])
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("unreadable feature checkpoint %s (%s): rebuilt", path, exc)
            return None
        return cls(features, stats, int(header["rows"]))
