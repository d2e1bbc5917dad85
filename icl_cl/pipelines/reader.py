"""The LLM reads each input with its ECL candidates (and demonstrations) and scores every candidate."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from icl_cl.backends.base import LLMBackend, Usage
from icl_cl.config import PromptConfig
from icl_cl.errors import BackendError, ContextLengthError
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.prompting import RenderedPrompt, load_template, render_prompt, select_demonstrations

logger = logging.getLogger(__name__)

# Room left for the option tokens and chat-template slack when the budget is the context window.
_CONTEXT_MARGIN = 16


@dataclass
class Reading:
    """What the LLM said about one input.

    Attributes:
        scores: Normalised log-probability per candidate label (``-inf`` for candidates the
            context policy dropped); ``None`` when the LLM could not be used.
        prompt: The rendered prompt, when there was one.
        fallback: Why the ECL decides alone for this input, or ``None``.
        calls: Model calls made for this input (0 for a cache hit).
        token_counts: Tokens of each option, aligned with the candidates.
        seconds: This input's share of the wall time of the scoring call it was batched in.
    """

    scores: np.ndarray | None
    prompt: RenderedPrompt | None = None
    fallback: str | None = None
    calls: int = 0
    token_counts: np.ndarray | None = None
    seconds: float = 0.0


@dataclass
class ReadBatch:
    readings: list[Reading]
    usage: Usage = field(default_factory=Usage)


class LLMReader:
    """Renders prompts by the configured strategy and asks the backend to score the candidates."""

    def __init__(
        self, backend: LLMBackend, memory: ExternalContinualLearner, prompt: PromptConfig
    ) -> None:
        self.backend = backend
        self.memory = memory
        self.config = prompt

    def template_name(self) -> str:
        if self.config.template != "auto":
            return self.config.template
        return "classify_multi" if self.memory.multi_label else "classify"

    def budget(self) -> int:
        if self.config.max_prompt_tokens is not None:
            return self.config.max_prompt_tokens
        context = self.backend.capabilities.max_context
        return (context - _CONTEXT_MARGIN) if context else 2048

    def read(
        self,
        texts: Sequence[str],
        queries: np.ndarray,
        candidates: Sequence[Sequence[str]],
        exclude: Sequence[frozenset[str]] | None = None,
    ) -> ReadBatch:
        """Score every input's candidates with the LLM."""
        template = load_template(self.template_name())
        labels = {lab.label: lab for lab in self.memory.labels}
        names = {lab.label: lab.name for lab in self.memory.labels}
        summaries = (
            self.memory.store.summaries() if self.config.label_presentation == "summaries" else {}
        )
        readings: list[Reading] = []
        for i, text in enumerate(texts):
            cands = list(candidates[i])
            demos = select_demonstrations(
                self.memory,
                queries[i],
                cands,
                self.config.demonstrations,
                self.config.n_demonstrations,
                exclude=exclude[i] if exclude else frozenset(),
                seed=i,
            )
            try:
                rendered = render_prompt(
                    self.backend,
                    template,
                    text,
                    [labels[c] for c in cands],
                    demos,
                    presentation=self.config.label_presentation,
                    label_names=names,
                    summaries=summaries,
                    max_tokens=self.budget(),
                )
            except ContextLengthError as exc:
                readings.append(Reading(None, fallback=f"context too small: {exc}"))
                continue
            readings.append(Reading(None, prompt=rendered))
        batch = ReadBatch(readings)
        self._score(batch, candidates)
        return batch

    def _score(self, batch: ReadBatch, candidates: Sequence[Sequence[str]]) -> None:
        # Prompts whose candidate lists were shortened have fewer options: score by group size.
        groups: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(batch.readings):
            if r.prompt is not None:
                groups[len(r.prompt.options)].append(i)
        for members in groups.values():
            prompts = [batch.readings[i].prompt for i in members]
            try:
                result = self.backend.score([p.text for p in prompts], [p.options for p in prompts])  # type: ignore[union-attr]
            except BackendError as exc:
                logger.warning("LLM unavailable, the ECL decides alone: %s", exc)
                for i in members:
                    batch.readings[i].fallback = f"backend error: {exc}"
                batch.usage.failures += 1
                continue
            batch.usage.add(result.usage)
            values = result.logprobs
            if self.config.length_normalization == "mean":
                values = values / np.maximum(result.token_counts, 1)
            for row, i in enumerate(members):
                reading = batch.readings[i]
                assert reading.prompt is not None
                position = {lab: j for j, lab in enumerate(reading.prompt.labels)}
                scores = np.full(len(candidates[i]), -np.inf)
                counts = np.zeros(len(candidates[i]), dtype=np.int64)
                for j, lab in enumerate(candidates[i]):
                    if lab in position:
                        scores[j] = values[row, position[lab]]
                        counts[j] = result.token_counts[row, position[lab]]
                reading.scores = scores
                reading.token_counts = counts
                reading.calls = 0 if result.cached is not None and result.cached[row] else 1
                reading.seconds = result.usage.seconds / len(members)
