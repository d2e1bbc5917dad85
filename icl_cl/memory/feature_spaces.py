"""The feature spaces of one store: a :class:`~icl_cl.memory.feature_space.FeatureSpace` per
feature scorer (ranpac, klda), built on first use, carried through sessions that keep its width,
and checkpointed beside the store."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from icl_cl.config import MemoryConfig
from icl_cl.memory.example_index import ExampleIndex
from icl_cl.memory.feature_space import FeatureSpace
from icl_cl.memory.features import RandomFeatures, feature_width
from icl_cl.memory.item_groups import Additions
from icl_cl.memory.statistics import StatisticsDelta
from icl_cl.memory.store import Store


class FeatureSpaces:
    """The feature scorers' spaces of ``store`` (whose vectors ``index`` holds).

    Args:
        store: The open store.
        index: Its example index (the stored vectors).
        config: The feature maps' seed, kind and widths.
    """

    def __init__(self, store: Store, index: ExampleIndex, config: MemoryConfig) -> None:
        self.store, self.index, self.config = store, index, config
        self._spaces: dict[str, FeatureSpace] = {}

    def features(self, name: str, n_items: int) -> RandomFeatures:
        """The random feature map of a feature scorer for a store of ``n_items`` items: its seed
        and kind are fixed by the config, its width by the size."""
        c = self.config
        # The count of items, not of rows: sessions learned one by one (an input copied into
        # several) and their union at once get the same width.
        if name == "ranpac":
            return RandomFeatures(
                "relu", self.store.dim, feature_width(n_items, c.ranpac_features), c.feature_seed
            )
        width = feature_width(n_items, c.klda_features)
        return RandomFeatures("rff", self.store.dim, width, c.feature_seed, c.klda_bandwidth)

    @staticmethod
    def weighted(name: str, multi_label: bool | None) -> bool:
        """Whether a space keeps the label-count-weighted Gram: klda's shared covariance needs it
        in a multi-label store only (single-label, it equals the Gram)."""
        return name == "klda" and bool(multi_label)

    def space(
        self,
        name: str,
        *,
        n_items: int,
        n_rows: int,
        labels: Sequence[str],
        multi_label: bool | None,
    ) -> FeatureSpace:
        """The space of scorer ``name``: read from its checkpoint, caught up or rebuilt from the
        first ``n_rows`` stored vectors if needed."""
        if name not in self._spaces:
            features = self.features(name, n_items)
            self._spaces[name] = FeatureSpace.build(
                features,
                weighted=self.weighted(name, multi_label),
                labels=labels,
                vectors=self.index.vectors_all(),
                row_labels=self.store.row_labels()[:n_rows],
                inputs=self.store.input_keys()[:n_rows] if multi_label else None,
                checkpoint=self.checkpoint(features),
            )
            self._spaces[name].save_if_behind(self.checkpoint(features))
        return self._spaces[name]

    def session_deltas(
        self, added: Additions, *, n_items: int, multi_label: bool | None, regrouped: bool
    ) -> dict[str, StatisticsDelta]:
        """A session's delta for each space that it leaves at the same width (and grouping), for
        a store of ``n_items`` items after it; any other space is rebuilt on first use."""
        if regrouped:
            return {}
        return {
            name: space.delta(added)
            for name, space in self._spaces.items()
            if space.features == self.features(name, n_items)
            and space.stats.weighted == self.weighted(name, multi_label)
        }

    def apply(
        self, deltas: dict[str, StatisticsDelta], rows: int, new_labels: Sequence[str]
    ) -> None:
        """After the session's commit: the spaces with a delta take it (``rows`` stored rows
        more, then the declared ``new_labels`` with no example yet); the others are dropped."""
        self._spaces = {name: self._spaces[name] for name in deltas}
        for name, space in self._spaces.items():
            space.apply(deltas[name], rows)
            for label in new_labels:
                space.stats.add_label(label)
            space.save_if_behind(self.checkpoint(space.features))

    def checkpoint(self, features: RandomFeatures) -> Path:
        return Path(self.store.path) / f"features-{features.name}.npz"
