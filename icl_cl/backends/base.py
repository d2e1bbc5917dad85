"""The LLM backend contract: exact option scoring, (constrained) generation, capabilities."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np

from icl_cl.errors import DataError

if TYPE_CHECKING:
    from icl_cl.images import Image

Message = dict[str, Any]
"""A chat message: ``{"role": "system" | "user" | "assistant", "content": ...}``. The content is
a string, or (for images) a list of parts ``{"type": "text", "text": str}`` and
``{"type": "image", "image": Image}`` in reading order."""


@dataclass(frozen=True)
class ImagePrompt:
    """A prompt with images in it, as a backend that reads images renders it.

    Attributes:
        text: The prompt in the model's format, with the model's image placeholder where each
            image goes (in-process engines tokenise this; their processor expands each
            placeholder into the image's tokens). Chat-only backends may leave their own layout.
        images: The images, in placeholder order.
        messages: The chat messages it was rendered from (chat-completion servers send these).
        suffix: Text the answer continues from, after the assistant turn opens (the template's
            answer prefix): part of ``text`` already; kept apart for chat servers.
    """

    text: str
    images: tuple[Image, ...]
    messages: tuple[Message, ...] = ()
    suffix: str = ""

    @property
    def key(self) -> str:
        """A string that identifies the prompt, images included (call caches key on it)."""
        return "\n".join([self.text, *(image.key for image in self.images)])

    def __add__(self, suffix: str) -> ImagePrompt:
        return ImagePrompt(self.text + suffix, self.images, self.messages, self.suffix + suffix)


Prompt = Union[str, ImagePrompt]  # noqa: UP007 - a runtime alias, evaluated on Python 3.10
"""What ``score`` and ``generate`` take: prompt text, or a prompt with images."""


def prompt_key(prompt: Prompt) -> str:
    """The string a cache keys ``prompt`` by."""
    return prompt if isinstance(prompt, str) else prompt.key


def part_image(part: Mapping[str, Any], message: int) -> Image:
    """The image of an image content part of message number ``message``.

    Raises:
        DataError: The part holds no :class:`~icl_cl.images.Image`.
    """
    from icl_cl.images import Image

    image = part.get("image")
    if not isinstance(image, Image):
        raise DataError(
            f"message {message}: an image part needs an icl_cl.images.Image "
            f"(see icl_cl.images.load_image), not {type(image).__name__}",
            field="image",
        )
    return image


def unknown_part(part: Mapping[str, Any], message: int) -> DataError:
    """The error for a content part that is neither text nor an image."""
    kind = part.get("type")
    return DataError(f"message {message}: unknown content part type {kind!r}", field="content")


def has_images(messages: Sequence[Message]) -> bool:
    """Whether any message carries an image part."""
    return any(
        isinstance(m["content"], list) and any(p.get("type") == "image" for p in m["content"])
        for m in messages
    )


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

    def render_chat(self, messages: Sequence[Message]) -> Prompt:
        """Turn chat messages into the model's prompt, ending where the assistant answers (the
        model's chat template when it has one, a plain layout otherwise). Messages with image
        parts give an :class:`ImagePrompt`; a backend without ``capabilities.images`` refuses
        them with a :class:`~icl_cl.errors.DataError`."""
        ...

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens of ``prompt`` for this model, image tokens included (used to fit prompts into
        the context window)."""
        ...

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        """Exact log-probability of each option as the continuation of its prompt.

        ``options[i]`` are the options for ``prompts[i]``; every prompt has the same number.
        """
        ...

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """Generate one completion per prompt."""
        ...

    def close(self) -> None:
        """Release resources (server connections, GPU memory)."""
        ...


def check_options(prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> int:
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


IMAGE_PLACEHOLDER = "<image>"
"""Where an image goes in a prompt's text when the model names no placeholder of its own."""


def content_text(content: str | Sequence[Mapping[str, Any]], image: str = IMAGE_PLACEHOLDER) -> str:
    """A message's content as text: text parts in order, ``image`` for each image part."""
    if isinstance(content, str):
        return content
    return "".join(image if p.get("type") == "image" else str(p.get("text", "")) for p in content)


def plain_chat(messages: Sequence[Message], image: str = IMAGE_PLACEHOLDER) -> str:
    """A template-free chat layout for base models and servers without a template (an image part
    becomes ``image``)."""
    parts = []
    for m in messages:
        role = m["role"]
        text = content_text(m["content"], image)
        if role == "system":
            parts.append(text.strip() + "\n")
        elif role == "user":
            parts.append(text.strip() + "\n")
        else:
            parts.append(text)
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

    def render_chat(self, messages: Sequence[Message]) -> Prompt:
        return self.inner.render_chat(messages)

    def count_tokens(self, prompt: Prompt) -> int:
        return self.inner.count_tokens(prompt)

    def close(self) -> None:
        self.inner.close()
