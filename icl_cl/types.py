"""Plain value types shared across the library."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
        llm: LLM cost of this prediction (calls, prompt and completion tokens, seconds), or
            ``None`` when no LLM is configured or it was not asked for.
        evidence: Extra audit data (demonstrations, fusion weights, cardinality estimate).
        set: Conformal label set at the requested confidence (``None`` when not asked for).
        abstained: The top probability was below the abstention threshold.
    """

    labels: tuple[str, ...]
    scores: dict[str, float]
    candidates: tuple[Candidate, ...]
    scorer: str
    fallback: str | None = None
    llm: dict[str, Any] | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    set: tuple[str, ...] | None = None
    abstained: bool = False
