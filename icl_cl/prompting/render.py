"""Render one classification prompt: template + candidates + demonstrations, fitted to a budget."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from icl_cl.backends.base import LLMBackend, Message, Prompt
from icl_cl.config import LabelPresentation
from icl_cl.errors import ContextLengthError
from icl_cl.images import Image
from icl_cl.prompting.templates import PromptTemplate
from icl_cl.types import Example, Label


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt ready for ``backend.score``.

    Attributes:
        text: The model's prompt (chat template applied), ending with the answer prefix.
        options: The strings scored as continuations, one per candidate.
        labels: Candidate label ids, aligned with ``options``.
        demonstrations: Ids of the examples shown.
        tokens: Prompt length in tokens.
        shortened: What the context policy removed to fit, or ``None``.
    """

    text: Prompt
    options: list[str]
    labels: list[str]
    demonstrations: list[str]
    tokens: int
    shortened: str | None = None


# What a template prints where an image goes; the rendered message is split at these marks into
# text and image parts, which the backend turns into its own image placeholders.
_SLOT = "\x00image{}\x00"
_SLOT_PATTERN = re.compile("\x00image(\\d+)\x00")


@dataclass
class ImageSlots:
    """Collects the images a template shows, in the order they are handed out."""

    images: list[Image] = field(default_factory=list)

    def __call__(self, image: Image) -> str:
        self.images.append(image)
        return _SLOT.format(len(self.images) - 1)

    def content(self, text: str) -> str | list[dict[str, object]]:
        """The user message content: ``text``, or its text and image parts in reading order."""
        if not _SLOT_PATTERN.search(text):  # the template showed no image
            return text
        parts: list[dict[str, object]] = []
        at = 0
        for mark in _SLOT_PATTERN.finditer(text):
            if text[at : mark.start()]:
                parts.append({"type": "text", "text": text[at : mark.start()]})
            parts.append({"type": "image", "image": self.images[int(mark.group(1))]})
            at = mark.end()
        if text[at:]:
            parts.append({"type": "text", "text": text[at:]})
        return parts


def render_instruction(
    backend: LLMBackend,
    template: PromptTemplate,
    slots: ImageSlots | None = None,
    **context: object,
) -> Prompt:
    """A generation prompt: the template's system and user messages in the model's chat
    format, ending with the answer prefix the model continues from. Images the context placed
    through ``slots`` become image parts of the user message."""
    messages: list[Message] = (
        [{"role": "system", "content": template.system}] if template.system else []
    )
    user = template.render(**context)
    messages.append({"role": "user", "content": slots.content(user) if slots else user})
    return backend.render_chat(messages) + template.answer_prefix


def demonstration_context(
    demonstrations: Sequence[Example],
    label_names: Mapping[str, str],
    slots: Callable[[Image], str] | None = None,
) -> list[dict[str, object]]:
    """Demonstrations as templates see them: text, image (where ``slots`` places images), and
    label names (not identifiers)."""
    return [
        {
            "text": d.text,
            "image": slots(d.image) if slots is not None and d.image is not None else None,
            "labels": [label_names.get(lab, lab) for lab in d.labels],
        }
        for d in demonstrations
    ]


def option_names(candidates: Sequence[Label]) -> list[str]:
    """Names to score: the label's name, or its id where two candidates share a name."""
    names = [c.name for c in candidates]
    return [c.name if names.count(c.name) == 1 else c.label for c in candidates]


def _detail(label: Label, presentation: LabelPresentation, summaries: Mapping[str, str]) -> str:
    if presentation == "names":
        return ""
    if presentation == "summaries" and summaries.get(label.label):
        return summaries[label.label]
    return " ".join(label.description.split())


def _render(
    backend: LLMBackend,
    template: PromptTemplate,
    text: str | Image,
    cands: Sequence[Label],
    demos: Sequence[Example],
    presentation: LabelPresentation,
    label_names: Mapping[str, str],
    summaries: Mapping[str, str],
) -> tuple[Prompt, list[str]]:
    """The prompt for these candidates and demonstrations, and the options to score after it."""
    names = option_names(cands)
    slots = ImageSlots()
    prompt = render_instruction(
        backend,
        template,
        slots,
        text=text if isinstance(text, str) else "",
        image=slots(text) if isinstance(text, Image) else None,
        candidates=[
            {"label": c.label, "name": n, "detail": _detail(c, presentation, summaries)}
            for c, n in zip(cands, names, strict=True)
        ],
        demonstrations=demonstration_context(demos, label_names, slots),
    )
    return prompt, [template.format_option(n) for n in names]


def render_prompt(
    backend: LLMBackend,
    template: PromptTemplate,
    text: str | Image,
    candidates: Sequence[Label],
    demonstrations: Sequence[Example],
    *,
    presentation: LabelPresentation,
    label_names: Mapping[str, str],
    summaries: Mapping[str, str],
    max_tokens: int,
    min_candidates: int = 2,
) -> RenderedPrompt:
    """Render, then shorten by a stated policy until the prompt fits ``max_tokens``.

    Policy: drop demonstrations (the least similar first), then candidates (the lowest ranked
    first, keeping at least ``min_candidates``). The input text itself is never cut here; inputs
    longer than the configured limit were refused on entry. An image input (and image
    demonstrations) go in as image parts; their tokens count against the budget.
    """
    demos = list(demonstrations)
    cands = list(candidates)
    dropped_demos = dropped_cands = 0

    while True:
        prompt, options = _render(
            backend, template, text, cands, demos, presentation, label_names, summaries
        )
        longest_option = max(backend.count_tokens(o) for o in options)
        tokens = backend.count_tokens(prompt)
        if tokens + longest_option <= max_tokens:
            shortened = None
            if dropped_demos or dropped_cands:
                shortened = (
                    f"dropped {dropped_demos} demonstrations and {dropped_cands} candidates "
                    f"to fit {max_tokens} tokens"
                )
            return RenderedPrompt(
                prompt, options, [c.label for c in cands], [d.id for d in demos], tokens, shortened
            )
        if demos:
            demos.pop()
            dropped_demos += 1
        elif len(cands) > min_candidates:
            cands.pop()
            dropped_cands += 1
        else:
            raise ContextLengthError(
                f"the prompt needs {tokens + longest_option} tokens with no demonstrations and "
                f"{len(cands)} candidates; the budget is {max_tokens}"
            )
