"""The LLM reads each input with its ECL candidates (and demonstrations) and scores every candidate."""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icl_cl.backends.base import LLMBackend, Usage
from icl_cl.config import CalibrationConfig, PromptConfig
from icl_cl.errors import BackendError, ContextLengthError
from icl_cl.images import Image
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.prompting import RenderedPrompt, load_template, render_prompt, select_demonstrations
from icl_cl.reading.option_bias import OptionBias, domain_strings
from icl_cl.types import Cost, Fallback, FallbackReason, Upstream

logger = logging.getLogger(__name__)

# Room left for the option tokens and chat-template slack when the budget is the context window.
_CONTEXT_MARGIN = 16
# Prompts per scoring call, so that progress can be told as they are read. A multiple of the
# transformers backend's default batch (8): its batches, and so its scores, are those of one
# call; backends that score each prompt on its own are unaffected.
READ_CHUNK = 16

Done = Callable[[int], None]
"""Told how many more inputs were read."""


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
        raw_scores: The scores before in-context calibration (``scores`` when there is none).
        calibration_tokens: Prompt tokens of the content-free / in-domain variants read to
            estimate this input's bias.
    """

    scores: np.ndarray | None
    prompt: RenderedPrompt | None = None
    fallback: Fallback | None = None
    calls: int = 0
    token_counts: np.ndarray | None = None
    seconds: float = 0.0
    raw_scores: np.ndarray | None = None
    calibration_tokens: int = 0
    variants: list[RenderedPrompt] = field(default_factory=list)

    def cost(self) -> Cost:
        """The LLM work of this reading (none without a prompt)."""
        if self.prompt is None:
            return Cost()
        tokens = self.prompt.tokens + self.calibration_tokens
        return Cost(calls=self.calls, prompt_tokens=tokens, seconds=self.seconds)

    def after(self, before: Upstream) -> Upstream:
        """``before`` (the candidate step's) with this reading's cost, fallback and evidence:
        the demonstrations the prompt showed, and what was cut from it."""
        evidence = before.evidence
        if self.prompt is not None:
            shown, cut = tuple(self.prompt.demonstrations), self.prompt.shortened or None
            evidence = dataclasses.replace(evidence, demonstrations=shown, shortened=cut)
        return Upstream(before.cost + self.cost(), self.fallback, evidence)


@dataclass
class ReadBatch:
    readings: list[Reading]
    usage: Usage = field(default_factory=Usage)
    error: str | None = None


class LLMReader:
    """Renders prompts by the configured strategy and asks the backend to score the candidates."""

    def __init__(
        self,
        backend: LLMBackend,
        memory: ExternalContinualLearner,
        prompt: PromptConfig,
        calibration: CalibrationConfig | None = None,
    ) -> None:
        self.backend = backend
        self.memory = memory
        self.config = prompt
        self.calibration = calibration or CalibrationConfig()

    def template_name(self, image: bool = False) -> str:
        """The configured template, or by default the one for this store and input kind."""
        if self.config.template != "auto":
            return self.config.template
        name = "classify_image" if image else "classify"
        return f"{name}_multi" if self.memory.multi_label else name

    def budget(self) -> int:
        if self.config.max_prompt_tokens is not None:
            return self.config.max_prompt_tokens
        context = self.backend.capabilities.max_context
        return (context - _CONTEXT_MARGIN) if context else 2048

    def read(
        self,
        texts: Sequence[str | Image],
        queries: np.ndarray,
        candidates: Sequence[Sequence[str]],
        exclude: Sequence[frozenset[str]] | None = None,
        progress: Done | None = None,
    ) -> ReadBatch:
        """Score every input's candidates with the LLM (texts, or images for a backend that
        reads them); ``progress`` is told as inputs are read."""
        render = self._renderer({isinstance(t, Image) for t in texts})
        fillers = self._fillers()
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
                rendered = render(text, cands, demos)
            except ContextLengthError as exc:
                fallback = Fallback(FallbackReason.CONTEXT_TOO_SMALL, str(exc))
                readings.append(Reading(None, fallback=fallback))
                continue
            reading = Reading(None, prompt=rendered)
            # Content-free stand-ins are texts: in-context calibration applies to text inputs.
            for filler in fillers if isinstance(text, str) else ():
                # The same prompt with the input replaced; kept only if it shows the same options.
                try:
                    shown = set(rendered.demonstrations)
                    variant = render(filler, rendered.labels, [d for d in demos if d.id in shown])
                except ContextLengthError:
                    continue
                if variant.labels == rendered.labels:
                    reading.variants.append(variant)
            readings.append(reading)
        return self._score_all(ReadBatch(readings), candidates, bool(fillers), progress)

    def _renderer(
        self, kinds: set[bool]
    ) -> Callable[[str | Image, list[str], list[Any]], RenderedPrompt]:
        """Renders one input's prompt by the configured strategy; ``kinds``: which inputs come
        (``True`` for images), whose templates are loaded once."""
        templates = {image: load_template(self.template_name(image)) for image in kinds}
        labels = {lab.label: lab for lab in self.memory.labels}
        names = {lab.label: lab.name for lab in self.memory.labels}
        presentation = self.config.label_presentation
        summaries = self.memory.store.summaries() if presentation == "summaries" else {}

        def render(text: str | Image, cands: list[str], demos: list[Any]) -> RenderedPrompt:
            return render_prompt(
                self.backend,
                templates[isinstance(text, Image)],
                text,
                [labels[c] for c in cands],
                demos,
                presentation=presentation,
                label_names=names,
                summaries=summaries,
                max_tokens=self.budget(),
            )

        return render

    def _score_all(
        self,
        batch: ReadBatch,
        candidates: Sequence[Sequence[str]],
        with_variants: bool,
        progress: Done | None,
    ) -> ReadBatch:
        """Score the rendered prompts (with their in-context calibration variants)."""
        done = progress or (lambda n: None)
        done(sum(r.prompt is None for r in batch.readings))
        if with_variants:
            self._score_with_variants(batch, candidates, done)
        else:
            self._score(batch, candidates, done)
        if self.calibration.in_context == "batch":
            self._batch_calibrate(batch, candidates)
        return batch

    def scores(
        self,
        texts: Sequence[str | Image],
        queries: np.ndarray,
        candidates: Sequence[Sequence[str]],
        exclude: Sequence[frozenset[str]] | None = None,
        progress: Done | None = None,
    ) -> list[np.ndarray]:
        """The LLM's score of each candidate (``-inf`` where it gave none), for fitting.

        Raises:
            BackendError: The backend failed on every input.
        """
        readings = self.read(texts, queries, candidates, exclude, progress).readings
        failed = [
            r.fallback
            for r in readings
            if r.fallback is not None and r.fallback.reason is FallbackReason.BACKEND_ERROR
        ]
        if failed and len(failed) == len(readings):
            raise BackendError(failed[0].detail)
        return [
            r.scores if r.scores is not None else np.full(len(c), -np.inf)
            for r, c in zip(readings, candidates, strict=True)
        ]

    def _fillers(self) -> list[str]:
        """Inputs that stand in for the real one to show the prompt's own bias."""
        method = self.calibration.in_context
        if method == "contextual":
            return list(self.calibration.content_free)
        if method == "domain":
            n = self.memory.n_examples
            rows = np.random.default_rng(0).choice(n, size=min(n, 500), replace=False)
            texts = [ex.text for ex in self.memory.store.examples(np.sort(rows).tolist())]
            return domain_strings(texts, self.calibration.domain_samples, seed=0)
        return []

    def _score(self, batch: ReadBatch, candidates: Sequence[Sequence[str]], done: Done) -> None:
        # Prompts whose candidate lists were shortened have fewer options: score by group size.
        groups: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(batch.readings):
            if r.prompt is not None:
                groups[len(r.prompt.options)].append(i)
        chunks = [
            members[lo : lo + READ_CHUNK]
            for members in groups.values()
            for lo in range(0, len(members), READ_CHUNK)
        ]
        for chunk in chunks:
            prompts = [batch.readings[i].prompt for i in chunk]
            # After one failure the rest is not asked: a dead backend costs one round of retries.
            result = None
            if batch.error is None:
                result = self._call(batch, [p.text for p in prompts], [p.options for p in prompts])  # type: ignore[union-attr]
            if result is None:
                for i in chunk:
                    batch.readings[i].fallback = Fallback(
                        FallbackReason.BACKEND_ERROR, batch.error or ""
                    )
                done(len(chunk))
                continue
            values = self._normalised(result)
            for row, i in enumerate(chunk):
                self._assign(
                    batch.readings[i], candidates[i], values[row], result.token_counts[row]
                )
                batch.readings[i].calls = (
                    0 if result.cached is not None and result.cached[row] else 1
                )
                batch.readings[i].seconds = result.usage.seconds / len(chunk)
            done(len(chunk))

    def _score_with_variants(
        self, batch: ReadBatch, candidates: Sequence[Sequence[str]], done: Done
    ) -> None:
        """Each input with its content-free variants in one call (they share all but the input,
        so a backend that shares prefixes computes the prompt once), then the bias divided out."""
        for i, reading in enumerate(batch.readings):
            if reading.prompt is None:
                continue
            group = [reading.prompt, *reading.variants]
            result = self._call(batch, [p.text for p in group], [p.options for p in group])
            done(1)
            if result is None:
                reading.fallback = Fallback(FallbackReason.BACKEND_ERROR, batch.error or "")
                continue
            values = self._normalised(result)
            self._assign(reading, candidates[i], values[0], result.token_counts[0])
            cached = result.cached if result.cached is not None else np.zeros(len(group), bool)
            reading.calls = int((~cached).sum())
            reading.seconds = result.usage.seconds
            reading.calibration_tokens = sum(v.tokens for v in reading.variants)
            if reading.variants:
                labels = reading.prompt.labels
                bias = OptionBias().fit(values[1:], [labels] * len(reading.variants))
                calibrated = bias.transform(values[:1], [labels])[0]
                self._assign(reading, candidates[i], calibrated, result.token_counts[0], raw=False)

    def _batch_calibrate(self, batch: ReadBatch, candidates: Sequence[Sequence[str]]) -> None:
        """Batch calibration: the mean prediction over this call's inputs is the bias."""
        rows = [i for i, r in enumerate(batch.readings) if r.scores is not None]
        if not rows:
            return
        scores = [batch.readings[i].scores for i in rows]
        width = max(len(x) for x in scores)  # type: ignore[arg-type]
        matrix = np.full((len(rows), width), -np.inf)
        names = []
        for r, i in enumerate(rows):
            matrix[r, : len(candidates[i])] = batch.readings[i].scores  # type: ignore[assignment]
            names.append(list(candidates[i]) + [""] * (width - len(candidates[i])))
        bias = OptionBias(prior_count=1.0).fit(matrix, names)
        calibrated = bias.transform(matrix, names)
        for r, i in enumerate(rows):
            batch.readings[i].scores = calibrated[r, : len(candidates[i])]

    def _call(self, batch: ReadBatch, prompts: list[str], options: list[list[str]]) -> Any:
        try:
            result = self.backend.score(prompts, options)
        except BackendError as exc:
            logger.warning("LLM unavailable, the ECL decides alone: %s", exc)
            batch.usage.failures += 1
            batch.error = str(exc)
            return None
        batch.usage.add(result.usage)
        return result

    def _normalised(self, result: Any) -> np.ndarray:
        values = result.logprobs
        if self.config.length_normalization == "mean":
            values = values / np.maximum(result.token_counts, 1)
        return np.asarray(values, np.float64)

    @staticmethod
    def _assign(
        reading: Reading,
        candidates: Sequence[str],
        values: np.ndarray,
        token_counts: np.ndarray,
        raw: bool = True,
    ) -> None:
        """Put the prompt's option scores in candidate order (``-inf`` for dropped candidates)."""
        assert reading.prompt is not None
        position = {lab: j for j, lab in enumerate(reading.prompt.labels)}
        scores = np.full(len(candidates), -np.inf)
        counts = np.zeros(len(candidates), dtype=np.int64)
        for j, lab in enumerate(candidates):
            if lab in position:
                scores[j] = values[position[lab]]
                counts[j] = token_counts[position[lab]]
        reading.scores = scores
        reading.token_counts = counts
        if raw:
            reading.raw_scores = scores
