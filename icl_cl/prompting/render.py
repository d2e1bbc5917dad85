"""Render one classification prompt: template + candidates + demonstrations, fitted to a budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from icl_cl.backends.base import LLMBackend
from icl_cl.errors import ContextLengthError
from icl_cl.prompting.templates import PromptTemplate
from icl_cl.types import Example, Label

LabelPresentation = Literal["names", "descriptions", "summaries"]


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

    text: str
    options: list[str]
    labels: list[str]
    demonstrations: list[str]
    tokens: int
    shortened: str | None = None


def render_instruction(backend: LLMBackend, template: PromptTemplate, **context: object) -> str:
    """A generation prompt: the template's system and user messages in the model's chat
    format, ending with the answer prefix the model continues from."""
    messages = [{"role": "system", "content": template.system}] if template.system else []
    messages.append({"role": "user", "content": template.render(**context)})
    return backend.render_chat(messages) + template.answer_prefix


def demonstration_context(
    demonstrations: Sequence[Example], label_names: Mapping[str, str]
) -> list[dict[str, object]]:
    """Demonstrations as templates see them: text, and label names (not identifiers)."""
    return [
        {"text": d.text, "labels": [label_names.get(lab, lab) for lab in d.labels]}
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


def render_prompt(
    backend: LLMBackend,
    template: PromptTemplate,
    text: str,
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
    longer than the configured limit were refused on entry.
    """
    demos = list(demonstrations)
    cands = list(candidates)
    dropped_demos = dropped_cands = 0
    while True:
        names = option_names(cands)
        prompt = render_instruction(
            backend,
            template,
            text=text,
            candidates=[
                {"label": c.label, "name": n, "detail": _detail(c, presentation, summaries)}
                for c, n in zip(cands, names, strict=True)
            ],
            demonstrations=demonstration_context(demos, label_names),
        )
        options = [template.format_option(n) for n in names]
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
