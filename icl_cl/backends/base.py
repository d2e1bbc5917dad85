"""The LLM backend contract: exact option scoring, (constrained) generation, capabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

Message = dict[str, str]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": str}``."""


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the pipeline picks its scoring path from this.

    Attributes:
        logprobs: Returns log-probabilities of generated tokens.
        prompt_logprobs: Can score given continuations exactly (``score`` is exact).
        top_logprobs: Alternatives returned per generated token (0: none).
        constrained_choice: Generation can be constrained to a list of strings.
        constrained_regex: Generation can be constrained by a regular expression.
        images: Accepts images in prompts.
        prefix_caching: Reuses computation for shared prompt prefixes.
        max_context: Context window in tokens, when known.
    """

    logprobs: bool = False
    prompt_logprobs: bool = False
    top_logprobs: int = 0
    constrained_choice: bool = False
    constrained_regex: bool = False
    images: bool = False
    prefix_caching: bool = False
    max_context: int | None = None


@dataclass
class Usage:
    """Cost accounting, summed over calls. ``calls`` counts model calls actually made (cache hits
    are counted in ``cached_calls`` instead)."""

    calls: int = 0
    cached_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    forward_seconds: float = 0.0
    retries: int = 0
    failures: int = 0

    def add(self, other: Usage) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(frozen=True)
class OptionScores:
    """Log-probabilities of options as continuations of their prompts.

    Attributes:
        logprobs: ``(n_prompts, n_options)`` summed log-probability ``sum_t log P(o_t | p, o_<t)``.
        token_counts: ``(n_prompts, n_options)`` tokens per option, so that length normalisation
            is an explicit choice of the caller.
        exact: False when the backend had to approximate (e.g. first-token top-logprobs).
        method: How the scores were obtained (``kv_cache``, ``prompt_logprobs``, ``echo``,
            ``first_token``).
        usage: Cost of the call.
        cached: Per prompt, whether the answer came from the call cache (``None``: no cache).
    """

    logprobs: np.ndarray
    token_counts: np.ndarray
    exact: bool
    method: str
    usage: Usage = field(default_factory=Usage)
    cached: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters. ``choices`` or ``regex`` constrain the output where supported."""

    max_tokens: int = 64
    temperature: float = 0.0
    stop: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    regex: str | None = None
    logprobs: int = 0


@dataclass(frozen=True)
class Generation:
    """One generated completion with its token log-probabilities (when available)."""

    text: str
    token_logprobs: tuple[float, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0


@runtime_checkable
class LLMBackend(Protocol):
    """A language model that can score options and generate text."""

    name: str
    """Registry name of the backend kind (``transformers``, ``vllm``, ``openai``)."""

    model: str
    """Model identifier, part of every cache key."""

    @property
    def capabilities(self) -> Capabilities: ...

    def render_chat(self, messages: Sequence[Message]) -> str:
        """Turn chat messages into the model's prompt text, ending where the assistant answers
        (the model's chat template when it has one, a plain layout otherwise)."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` for this model (used to fit prompts into the context window)."""
        ...

    def score(self, prompts: Sequence[str], options: Sequence[Sequence[str]]) -> OptionScores:
        """Exact log-probability of each option as the continuation of its prompt.

        ``options[i]`` are the options for ``prompts[i]``; every prompt has the same number.
        """
        ...

    def generate(self, prompts: Sequence[str], params: GenerationParams) -> list[Generation]:
        """Generate one completion per prompt."""
        ...

    def close(self) -> None:
        """Release resources (server connections, GPU memory)."""
        ...


def check_options(prompts: Sequence[str], options: Sequence[Sequence[str]]) -> int:
    """Validate the shape of a ``score`` request; returns the number of options per prompt."""
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    if not prompts:
        return 0
    k = len(options[0])
    if k == 0 or any(len(o) != k for o in options):
        raise ValueError("every prompt needs the same, non-zero number of options")
    if any(not opt for opts in options for opt in opts):
        raise ValueError("options must be non-empty strings")
    return k


def plain_chat(messages: Sequence[Message]) -> str:
    """A template-free chat layout for base models and servers without a template."""
    parts = []
    for m in messages:
        role = m["role"]
        if role == "system":
            parts.append(m["content"].strip() + "\n")
        elif role == "user":
            parts.append(m["content"].strip() + "\n")
        else:
            parts.append(m["content"])
    return "\n".join(parts)


class BackendWrapper:
    """A backend in front of another (a cache, a counter): the calls it does not change are
    passed to ``inner``."""

    def __init__(self, inner: LLMBackend) -> None:
        self.inner = inner
        self.name = inner.name
        self.model = inner.model

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def render_chat(self, messages: Sequence[Message]) -> str:
        return self.inner.render_chat(messages)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def close(self) -> None:
        self.inner.close()
