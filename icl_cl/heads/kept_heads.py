"""The fitted heads a store keeps: one fit per :class:`HeadSpec`, stored under its digest with
the store's size when it was fitted, and fits made for this session kept in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from icl_cl.errors import BackendError
from icl_cl.heads.fitted import SOURCES, FittedHeads, serves_as_current
from icl_cl.heads.fusion import FusionWeights
from icl_cl.heads.heldout import HeldOutSource
from icl_cl.heads.spec import HeadSpec
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.types import Fallback, FallbackReason

logger = logging.getLogger(__name__)

# Stored fits are keyed by this prefix and their spec's digest.
KEY_PREFIX = "heads:"


class KeptHeads:
    """The fitted heads of one store.

    Args:
        memory: The ECL over the store.
    """

    def __init__(self, memory: ExternalContinualLearner) -> None:
        self.memory = memory
        self._in_memory: dict[str, FittedHeads] = {}
        self._warned: set[str] = set()

    def find(self, spec: HeadSpec) -> FittedHeads | None:
        """The fit of ``spec`` made in this session or stored, current or stale; ``None`` if
        there is none for the store's label mode."""
        heads = self._in_memory.get(spec.digest)
        if heads is None:
            stored = self.memory.store.fitted(KEY_PREFIX + spec.digest)
            heads = FittedHeads.from_dict(spec, stored[0]) if stored is not None else None
        if heads is None or heads.calibrator.multi_label != bool(self.memory.multi_label):
            return None
        self._in_memory[spec.digest] = heads
        return heads

    def current(self, heads: FittedHeads) -> bool:
        """Whether ``heads`` serve the store as it is now: fitted on it, or on a store it has
        outgrown by less than :data:`REFIT_GROWTH`."""
        return serves_as_current(heads.n_examples, self.memory.n_examples)

    def fit(
        self, spec: HeadSpec, heldout: HeldOutSource, fusion: FusionWeights | None = None
    ) -> FittedHeads:
        """Fit the heads of ``spec`` on the store as it is (see :meth:`FittedHeads.fit`) and keep
        them in memory (:meth:`save` stores them)."""
        heads = FittedHeads.fit(
            spec,
            heldout,
            multi_label=bool(self.memory.multi_label),
            n_examples=self.memory.n_examples,
            fusion=fusion,
        )
        if fusion is None:
            self._in_memory[spec.digest] = heads
        return heads

    def fit_and_save(
        self, spec: HeadSpec, heldout: Callable[[], HeldOutSource], *, full: bool = False
    ) -> FittedHeads:
        """The fit of ``spec`` on the store as it is: the stored one if it is current (and not
        ``full``), else a new one (on ``heldout()``), stored."""
        heads = self.find(spec)
        if full or heads is None or not self.current(heads):
            heads = self.fit(spec, heldout())
            self.save(heads)
        return heads

    def for_prediction(
        self, spec: HeadSpec, heldout: Callable[[], HeldOutSource]
    ) -> tuple[FittedHeads, Fallback | None]:
        """The heads a prediction uses, without writing: the fit of ``spec``, stale or not;
        else one fitted now on ``heldout()`` and kept in memory; and while the LLM cannot be
        reached, the ECL's alone (not kept: the next prediction tries again), with the reason."""
        heads = self.find(spec)
        if heads is not None:
            if not self.current(heads) and spec.digest not in self._warned:
                self._warned.add(spec.digest)
                logger.warning(
                    "the heads for %s were fitted on %d stored examples, there are %d now: "
                    "using them (icl-cl fit refits them)",
                    spec.describe(),
                    heads.n_examples,
                    self.memory.n_examples,
                )
            return heads, None
        logger.warning(
            "no heads fitted for %s: fitting them in memory, not saved (icl-cl fit saves them)",
            spec.describe(),
        )
        try:
            return self.fit(spec, heldout()), None
        except BackendError as exc:
            ecl_alone = self.fit(spec, heldout(), FusionWeights.base_only(SOURCES))
            return ecl_alone, Fallback(FallbackReason.BACKEND_ERROR, str(exc))

    def save(self, heads: FittedHeads) -> None:
        """Store ``heads`` (replacing an earlier fit of the same spec)."""
        key = KEY_PREFIX + heads.spec.digest
        self.memory.store.save_fitted(key, heads.to_dict(), heads.n_examples)

    def forget(self) -> None:
        """Drop the fits kept in memory (the store has changed)."""
        self._in_memory.clear()

    def summaries(self) -> list[dict[str, Any]]:
        """What ``info`` shows of every stored fit."""
        out = []
        for key in self.memory.store.fitted_keys(KEY_PREFIX):
            stored = self.memory.store.fitted(key)
            if stored is not None:
                spec = HeadSpec.from_dict(stored[0]["spec"])
                heads = FittedHeads.from_dict(spec, stored[0])
                out.append(heads.summary(self.memory.n_examples))
        return out
