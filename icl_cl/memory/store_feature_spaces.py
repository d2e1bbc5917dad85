"""The feature spaces of one store: a :class:`~icl_cl.memory.feature_space.FeatureSpace` per
feature scorer (ranpac, klda), loaded on first use, carried through the sessions that keep its
width, and saved beside the store by the steps that write (learn, fit), never by a prediction.

A prediction reads only the solved weights (:mod:`~icl_cl.memory.feature_checkpoint`); it loads
the learner state only when they are missing or stale (a session learned with ``--no-fit``), and
then solves in memory without writing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.config import MemoryConfig
from icl_cl.errors import ConfigError
from icl_cl.memory import feature_checkpoint as checkpoints
from icl_cl.memory.example_index import ExampleIndex
from icl_cl.memory.feature_space import (
    FeatureSpace,
    HeldOutScorer,
    SpaceDelta,
    SpaceKind,
    Strength,
)
from icl_cl.memory.item_groups import Additions, stored_additions
from icl_cl.memory.partial import SpaceSums
from icl_cl.memory.random_features import RandomFeatures, feature_width
from icl_cl.memory.scorer_choice import CHOICE_GROWTH, ScorerChoice
from icl_cl.memory.scorers import InFeatureSpace, LinearHead, class_prototypes
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store import Store

logger = logging.getLogger(__name__)

KINDS: dict[str, SpaceKind] = {"ranpac": "ridge", "klda": "lda"}
# The most labels a feature space keeps state for: each label holds a sum of width M in float64
# (and a solved row in float32), 48 KB a label at M = 4,096. Past it, the sums would outweigh
# everything else in the store (20,000 tags: 1 GB a space); such label sets are ranked from the
# example and label indexes and the embedding-space statistics instead.
MAX_LABELS = 2048
# The learner state is rewritten once this many rows are missing from it: an open catches up
# at most that many rows (``O(n M^2)``), and a session of fewer rows rewrites nothing large.
CHECKPOINT_EVERY = 512
# Stored rows taken into a space at a time when catching up.
_CHUNK = 4096


class FeatureSpaces:
    """The feature scorers' spaces of ``store`` (whose vectors ``index`` holds).

    Args:
        store: The open store.
        index: Its example index (the stored vectors).
        config: The feature maps' seed, kind and widths, and the scorers' settings.
        choice: The stored choice now (``None`` before any): ranpac's strength, and what solved
            weights name.
    """

    def __init__(
        self,
        store: Store,
        index: ExampleIndex,
        config: MemoryConfig,
        choice: Callable[[], ScorerChoice | None],
    ) -> None:
        self.store, self.index, self.config = store, index, config
        self._stored_choice = choice
        self._spaces: dict[str, FeatureSpace] = {}
        self._saved: dict[str, int] = {}  # rows of each space's state on disk
        self._heads: dict[str, LinearHead] = {}

    def features(self, name: str, n_items: int, width: int | None = None) -> RandomFeatures:
        """The map of a feature scorer for a store of ``n_items`` items: seed and kind fixed by
        the config, width by the size within what the stored choice found earned (or ``width``)."""
        c = self.config
        if width is None:
            choice, widest = self._stored_choice(), widest_width(c, name)
            earned = None if choice is None else choice.widths.get(name)
            width = feature_width(n_items, min(widest, earned or widest))
        if name == "ranpac":
            return RandomFeatures("relu", self.store.dim, width, c.feature_seed)
        return RandomFeatures("rff", self.store.dim, width, c.feature_seed, c.klda_bandwidth)

    def _rho(self) -> float:
        """ranpac's relative ridge strength: the stored choice's, else the config's."""
        choice = self._stored_choice()
        rho = None if choice is None else choice.ranpac_rho
        return self.config.ranpac_lambda if rho is None else rho

    def _choice(self) -> int | None:
        """Identifies the stored choice (the store size it was made at; ``None`` before any)."""
        return getattr(self._stored_choice(), "n_examples", None)

    def checkpoint(self, features: RandomFeatures) -> Path:
        return Path(self.store.path) / f"features-{features.name}.npz"

    # ---- the learner state -----------------------------------------------------------------

    def space(
        self,
        name: str,
        *,
        n_items: int,
        n_rows: int,
        labels: Sequence[str],
        multi_label: bool | None,
    ) -> FeatureSpace:
        """The space of scorer ``name``: read from its state on disk and caught up, or built
        from the first ``n_rows`` stored vectors."""
        if name not in self._spaces:
            if len(labels) > MAX_LABELS:
                raise ConfigError(
                    f"the {name} scorer keeps a width-M state per label; this store has "
                    f"{len(labels)} labels (at most {MAX_LABELS}): use knn, mahalanobis or auto"
                )
            features, items = self.features(name, n_items), bool(multi_label)
            vectors, row_labels, inputs = stored_rows(self.store, self.index, n_rows, items)
            path = self.checkpoint(features)
            space = checkpoints.read_state(path, KINDS[name], features, labels, items)
            if space is None:
                space = FeatureSpace.build(
                    KINDS[name], features, labels=labels, vectors=vectors,
                    row_labels=row_labels, inputs=inputs, items=items,
                    strength=strength_rule(name, self._rho(), self.config.shrinkage),
                )  # fmt: skip
                space.choice = self._choice()
                self._saved[name] = -1
            else:
                self._saved[name] = space.rows
                _catch_up(space, labels, vectors, row_labels, inputs)
                if space.choice != self._choice():  # a choice was made since it was saved
                    self._restrengthen(name, space)
            if space.stats.labels != list(labels):
                raise ValueError(f"feature space {name}: label columns differ from the store's")
            self._spaces[name] = space
        return self._spaces[name]

    def session_deltas(
        self,
        added: Additions,
        *,
        n_items: int,
        n_rows: int,
        labels: Sequence[str],
        multi_label: bool | None,
        regrouped: bool,
        sums: SpaceSums | None = None,
    ) -> dict[str, SpaceDelta]:
        """A session's delta for each space loaded or saved at the width of a store of
        ``n_items`` items after it (with ``n_rows`` stored rows and ``labels`` before it): the
        session keeps them current, so that no fit, predict or restart after it catches its rows
        up. From the workers' ``sums`` (see :meth:`summable`) where they fit; any other space is
        rebuilt on use."""
        if regrouped:
            return {}
        deltas = {}
        for name in KINDS:
            features = self.features(name, n_items)
            if name not in self._spaces and not self.checkpoint(features).exists():
                continue
            space = self.space(
                name, n_items=n_items, n_rows=n_rows, labels=labels, multi_label=multi_label
            )
            if space.features != features or space.items != bool(multi_label):
                continue
            summed = (sums or {}).get(name)
            if summed is not None and summed[0] == features:
                deltas[name] = space.summed_delta(summed[1], added)
                logger.info("feature space %s: session summed on workers", features.name)
            else:
                deltas[name] = space.delta(added)
        return deltas

    def summable(
        self, *, n_items: int, n_rows: int, multi_label: bool | None
    ) -> dict[str, tuple[RandomFeatures, bool]]:
        """The spaces whose sums workers should compute for a session of ``n_rows`` new items
        that leaves the store at ``n_items``: those with a saved state at that width, when one
        ``O(M^3)`` solve beats adding the rows one block at a time (``O(n M^2)``, at about
        ``n = M / 2``). Each with its map and whether its Gram weighs rows by label count."""
        out = {}
        for name in KINDS:
            features = self.features(name, n_items)
            if 2 * n_rows >= features.size and self.checkpoint(features).exists():
                out[name] = (features, name == "klda" and bool(multi_label))
        return out

    def apply(self, deltas: dict[str, SpaceDelta], rows: int, new_labels: Sequence[str]) -> None:
        """After the session's commit: the spaces with a delta take it (``rows`` stored rows
        more, then the declared ``new_labels`` with no example yet); the others are dropped."""
        self._spaces = {name: self._spaces[name] for name in deltas}
        self._heads.clear()
        for name, space in self._spaces.items():
            space.apply(deltas[name], rows)
            for label in new_labels:
                space.stats.add_label(label)

    def restrengthen(self) -> None:
        """After a new choice: a space at a width it does not keep is dropped (built again on
        use); ranpac takes the chosen strength, klda the shrinkage estimated on the store now
        (each one ``O(M^3)``, only when a choice is made)."""
        for name, space in list(self._spaces.items()):
            if space.features != self.features(name, space.stats.n_examples):
                del self._spaces[name]
            else:
                self._restrengthen(name, space)
        self._heads.clear()

    def _restrengthen(self, name: str, space: FeatureSpace) -> None:
        if name == "ranpac":
            values, vectors = space.eigen()
            strength = space.ridge_strength(float(values.sum()), self._rho())
            space.restrengthen(strength, eigen=(values, vectors))
        else:
            gram = space.solver.gram()
            space.restrengthen(space.lda_strength(gram, self.config.shrinkage), gram=gram)
        space.choice = self._choice()
        space.strength_items = space.stats.n_examples
        self._saved[name] = -1  # its state on disk has the old strength
        self._heads.pop(name, None)

    def refresh_strengths(self, names: Sequence[str], *, full: bool, **at: Any) -> None:
        """Set the strengths of the feature scorers among ``names`` again (klda's shrinkage,
        ranpac's lambda for its relative rho) once the store has doubled since they were set,
        or with ``full``; not twice at one size. ``at``: as :meth:`space` takes it."""
        for name in [n for n in names if n in KINDS]:
            space = self.space(name, **at)
            n = space.stats.n_examples
            if space.strength_items != n and (full or n >= CHOICE_GROWTH * space.strength_items):
                self._restrengthen(name, space)

    def keep_only(self, names: Sequence[str]) -> None:
        """Drop the spaces of the feature scorers not in ``names`` (a choice that does not use
        them), from memory and from disk: state is kept only where it pays; a later use builds
        it again from the stored vectors."""
        for name in [n for n in KINDS if n not in names]:
            self._spaces.pop(name, None)
            self._heads.pop(name, None)
            kind = self.features(name, 1).kind
            try:
                for old in Path(self.store.path).glob(f"features-{kind}-*"):
                    old.unlink()
            except OSError as exc:
                logger.warning("cannot remove the unused %s state (%s)", name, exc)

    def persist(self) -> None:
        """Save what the loaded spaces changed: the learner state once enough rows are missing
        from it, and the solved weights when they are not those of the current state. A store
        that cannot be written keeps them in memory (caught up again on the next open)."""
        for name, space in self._spaces.items():
            path = self.checkpoint(space.features)
            saved = self._saved.get(name, -1)  # -1: nothing valid on disk
            try:
                if saved < 0 or space.rows - saved >= CHECKPOINT_EVERY:
                    checkpoints.write_state(space, path)
                    self._saved[name] = space.rows
                    self._drop_other_widths(space.features, path)
                # The strength too: a fit may set it again at the same size.
                describes = {
                    **self._describes(name, space.features, space.rows, space.stats.labels),
                    "strength": space.solver.strength,
                    "scale": space.scale,
                }
                if checkpoints.read_solved(path, describes) is None:
                    checkpoints.write_solved(self._solved(name, space), path, describes)
            except OSError as exc:
                logger.warning("cannot write %s (%s): caught up in memory on open", path, exc)

    def _drop_other_widths(self, features: RandomFeatures, path: Path) -> None:
        """Files of this kind at another width are obsolete once the store has grown."""
        for old in path.parent.glob(f"features-{features.kind}-*"):
            if not old.name.startswith(path.name.removesuffix(".npz")):
                old.unlink()

    # ---- what a prediction reads -----------------------------------------------------------

    def _describes(
        self, name: str, features: RandomFeatures, n_rows: int, labels: Sequence[str]
    ) -> dict[str, Any]:
        """What solved weights must have been solved for to serve now."""
        c = self.config
        settings = (
            {"rho": self._rho()}
            if name == "ranpac"
            else {"shrinkage": c.shrinkage, "teen": [c.teen_max_examples, c.teen_alpha, c.teen_tau]}
        )
        return {
            "format": checkpoints.FORMAT,
            "digest": features.digest,
            "rows": n_rows,
            "labels": len(labels),
            "choice": self._choice(),
            "settings": settings,
        }

    def _solved(self, name: str, space: FeatureSpace) -> LinearHead:
        if name not in self._heads:
            self._heads[name] = space.head(self.prototypes(name, space.stats))
        return self._heads[name]

    def prototypes(self, name: str, stats: RunningStatistics) -> np.ndarray | None:
        """klda's class means (calibrated for few-shot labels); ranpac has none."""
        return class_prototypes(stats, self.config) if name == "klda" else None

    def heldout_scorer(
        self, name: str, vectors: np.ndarray, held: Sequence[Sequence[str]], **at: Any
    ) -> HeldOutScorer:
        """Scorer ``name`` had the items ``vectors`` (with the labels ``held``) never been
        learned (see :meth:`FeatureSpace.heldout_scorer`); ``at``: the store's size and labels,
        as :meth:`space` takes them."""
        space = self.space(name, **at)
        prototypes = lambda stats: self.prototypes(name, stats)  # noqa: E731
        return space.heldout_scorer(name, vectors, held, prototypes)

    def scorer(
        self,
        name: str,
        *,
        n_items: int,
        n_rows: int,
        labels: Sequence[str],
        multi_label: bool | None,
    ) -> InFeatureSpace:
        """The feature scorer ``name`` for predictions: solved from the learner state when this
        process holds it (it may have set a new strength since the weights on disk were
        written), else the solved weights from disk when they describe this store, else solved
        in memory from the state read from disk."""
        features = self.features(name, n_items)
        head = None
        if name in self._spaces:
            head = self._solved(name, self._spaces[name])
        else:
            describes = self._describes(name, features, n_rows, labels)
            head = checkpoints.read_solved(self.checkpoint(features), describes)
        if head is None:
            space = self.space(
                name, n_items=n_items, n_rows=n_rows, labels=labels, multi_label=multi_label
            )
            head = self._solved(name, space)
        return InFeatureSpace(name, features, head)


def stored_rows(
    store: Store, index: ExampleIndex, n_rows: int, items: bool
) -> tuple[np.ndarray, list[list[str]], list[str | None]]:
    """What a space is built from: the first ``n_rows`` stored vectors, their labels, and their
    inputs where copies of an input group into one item (``items``; else ``None`` each)."""
    inputs = list(store.input_keys()[:n_rows]) if items else [None] * n_rows
    return index.vectors_all()[:n_rows], store.row_labels()[:n_rows], inputs


def strength_rule(
    name: str, rho: float, shrinkage: float | str
) -> Callable[[FeatureSpace, np.ndarray], Strength]:
    """How a space of scorer ``name`` sets its strength from its Gram when it is built: ranpac
    at the relative strength ``rho``, klda at the ``shrinkage`` of its covariance."""
    if name == "ranpac":
        return lambda space, gram: space.ridge_strength(float(np.trace(gram)), rho)
    return lambda space, gram: space.lda_strength(gram, shrinkage)


def widest_width(config: MemoryConfig, name: str, n_items: int | None = None) -> int:
    """The widest map of feature scorer ``name`` the config allows (for a store of ``n_items``:
    no wider than its item count). The count of items, not of rows: sessions learned one by
    one (an input copied into several) and their union at once get the same width."""
    budget = config.ranpac_features if name == "ranpac" else config.klda_features
    return budget if n_items is None else feature_width(n_items, budget)


def _catch_up(
    space: FeatureSpace,
    labels: Sequence[str],
    vectors: np.ndarray,
    row_labels: Sequence[Sequence[str]],
    inputs: Sequence[str | None],
) -> None:
    """Add to a state read from disk the labels and stored rows it does not cover."""
    stats = space.stats
    for label in labels:
        if label not in stats.col:
            stats.add_label(label)
    start = space.rows
    if start >= len(vectors):
        return
    logger.info(
        "feature space %s: adding %d stored rows", space.features.name, len(vectors) - start
    )
    for added, rows in stored_additions(
        vectors, row_labels, inputs, stats.col, start=start, chunk=_CHUNK
    ):
        space.apply(space.delta(added), rows)
