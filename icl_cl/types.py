"""Plain value types shared across the library."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from icl_cl.images import Image


@dataclass(frozen=True)
class Label:
    """A class label. ``label`` is its identifier; ``name`` and ``description`` are what a reader sees.

    Args:
        label: Stable identifier, e.g. ``"works-with::audio"``.
        name: Human-readable name; defaults to the identifier.
        description: Optional longer description.
        group: Optional group (facet), e.g. ``"works-with"``.
    """

    label: str
    name: str = ""
    description: str = ""
    group: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.label)

    @property
    def text(self) -> str:
        """Text used to embed the label itself: its name, plus its description when it has one."""
        return f"{self.name}: {self.description}" if self.description else self.name


@dataclass(frozen=True)
class Example:
    """A labelled item to learn from. ``labels`` may hold one label or many.

    The input is ``text``, or ``image`` (a path, URL, bytes, PIL image or
    :class:`~icl_cl.images.Image`, checked and loaded here) with ``text`` as an optional caption.
    """

    id: str
    text: str
    labels: tuple[str, ...] = ()
    image: Image | None = None

    def __init__(
        self, id: str, text: str = "", labels: Iterable[str] = (), image: object = None
    ) -> None:
        object.__setattr__(self, "id", id)
        object.__setattr__(self, "text", text)
        object.__setattr__(self, "labels", tuple(labels))
        if image is not None:
            from icl_cl.images import load_image

            image = load_image(image, item=str(id))
        object.__setattr__(self, "image", image)

    @property
    def item(self) -> str | Image:
        """What is embedded and read: the image when there is one, the text otherwise."""
        return self.image if self.image is not None else self.text


@dataclass(frozen=True)
class Candidate:
    """One candidate label for an input, with the scores that ranked it."""

    label: str
    score: float
    ecl_score: float
    llm_score: float | None = None
    probability: float | None = None


class FallbackReason(str, Enum):
    """Why the ECL decided alone although an LLM is configured."""

    LLM_WEIGHT_ZERO = "LLM weight 0"
    """Fusion gave the LLM no weight: on held-out stored examples it did not beat the ECL."""
    BACKEND_ERROR = "backend error"
    """The LLM backend failed (after its retries)."""
    CONTEXT_TOO_SMALL = "context too small"
    """The prompt did not fit the model's context, even with demonstrations and candidates cut."""


@dataclass(frozen=True)
class Fallback:
    """Why the ECL decided alone: a reason and the detail of this case (``str()`` gives
    ``reason: detail``). A prediction row holds it as ``{"reason", "detail"}``."""

    reason: FallbackReason
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.detail}" if self.detail else self.reason.value


@dataclass(frozen=True)
class Cost:
    """LLM work spent on one prediction (every step: inferring queries, reading candidates).

    Attributes:
        calls: Model calls made (0 for answers served from a call cache).
        prompt_tokens: Prompt tokens read, with any in-context calibration stand-ins.
        completion_tokens: Tokens generated.
        seconds: This input's share of the wall time of the LLM calls it was batched in.
    """

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.calls + other.calls,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.seconds + other.seconds,
        )


@dataclass(frozen=True)
class LabelSetEvidence:
    """The rule that chose a multi-label prediction's labels, and what it held them to.

    Attributes:
        rule: ``cardinality``, ``threshold`` or ``label_thresholds``.
        threshold: The ``threshold`` rule's probability threshold.
        thresholds: The ``label_thresholds`` rule's threshold for each chosen label.
    """

    rule: str
    threshold: float | None = None
    thresholds: Mapping[str, float] | None = None


@dataclass(frozen=True)
class Evidence:
    """Audit data of one prediction; a field is ``None`` (or empty) where it does not apply.

    Attributes:
        demonstrations: Ids of the stored examples the LLM was shown.
        fusion_weights: Weight of each score source (``ecl``, ``llm``) in the decision scores;
            ``None`` when the ECL decided without an LLM being asked.
        fusion_heldout_items: Held-out stored examples the fusion weights were fitted on.
        expected_cardinality: Multi-label: the label count expected from the nearest stored
            examples (what the ``cardinality`` rule takes).
        decision: Multi-label: the label-set rule and its thresholds.
        p_outside_candidates: Single-label: the probability that the label is none of the
            candidates.
        irr_queries: Infer-Retrieve-Rank: the label-like queries the LLM wrote.
        irr_infer_tokens: Infer-Retrieve-Rank: prompt tokens of the infer step.
        shortened: What was cut from the prompt to fit the context (demonstrations, candidates).
        stale_fit: The fitted heads predate the store's last session(s) (``icl-cl fit``
            refreshes them).
    """

    demonstrations: tuple[str, ...] = ()
    fusion_weights: Mapping[str, float] | None = None
    fusion_heldout_items: int | None = None
    expected_cardinality: float | None = None
    decision: LabelSetEvidence | None = None
    p_outside_candidates: float | None = None
    irr_queries: tuple[str, ...] | None = None
    irr_infer_tokens: int | None = None
    shortened: str | None = None
    stale_fit: bool = False


@dataclass(frozen=True)
class Upstream:
    """What the steps before the decision say about one input: the LLM work spent on it, why
    the LLM was not used, and their evidence (demonstrations, queries, shortened prompt)."""

    cost: Cost = field(default_factory=Cost)
    fallback: Fallback | None = None
    evidence: Evidence = field(default_factory=Evidence)


@dataclass(frozen=True)
class Prediction:
    """The decision for one input and everything needed to audit it.

    Attributes:
        labels: The decision: one label for single-label stores, a set for multi-label stores;
            empty when the classifier abstained ("none of the known labels").
        scores: Calibrated probability per candidate label. Single-label, they sum to at most 1
            (the rest is the held-out chance that the label is outside the candidates);
            multi-label, each is the probability that the label applies.
        candidates: Candidates in rank order, with their component scores.
        scorer: The ECL scorer that produced the candidates.
        fallback: Why the LLM was not used although one is configured (``None`` otherwise).
        cost: LLM work of this prediction, or ``None`` when no LLM is configured or it was not
            asked for.
        evidence: Audit data (demonstrations, fusion weights, decision rule, ...).
        set: Conformal label set at the requested confidence (``None`` when not asked for).
        abstained: The top probability was below the abstention threshold.
    """

    labels: tuple[str, ...]
    scores: dict[str, float]
    candidates: tuple[Candidate, ...]
    scorer: str
    fallback: Fallback | None = None
    cost: Cost | None = None
    evidence: Evidence = field(default_factory=Evidence)
    set: tuple[str, ...] | None = None
    abstained: bool = False


@dataclass(frozen=True)
class LearnReport:
    """What one session of learning stored, and how long it took (``fit_seconds``: the fit of
    the heads that ended it)."""

    session: int
    n_examples: int
    new_labels: tuple[str, ...]
    seconds: float
    embed_seconds: float
    fit_seconds: float = 0.0


Progress = Callable[[str, int, int], None]
"""Called as ``progress(stage, done, total)`` while a long step runs; ``stage`` names it
(``embedding``, ``fitting: 200 LLM reads of held-out items``, ``reading candidates (LLM)``)."""


def counter(progress: Progress | None, stage: str, total: int) -> Callable[[int], None] | None:
    """A callback taking increments (``done(n)``) that tells ``progress`` how far ``stage`` got."""
    if progress is None:
        return None
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        progress(stage, done, total)

    return add


Ranked = list[list[tuple[str, float]]]
"""Per input, its candidate labels with their scores, best first."""
EclRanker = Callable[[np.ndarray, int], Ranked]
"""``(query vectors, k) -> Ranked``: the ECL's top-``k`` labels (possibly with some stored
examples held out of memory)."""
