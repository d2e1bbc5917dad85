"""Request and response bodies of the OpenAI-compatible API, as far as this backend uses them.

Requests are built as models and sent as their JSON (fields left as None are not sent).
Responses are read leniently: servers add fields of their own (ignored), leave optional ones
out or null, and differ in layout (vLLM's ``prompt_logprobs``). A response that does not fit
raises :class:`~icl_cl.errors.ParseError` saying what was expected.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from icl_cl.errors import ParseError

# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def body(self) -> dict[str, Any]:
        """The JSON body: every field that is set (not None)."""
        return self.model_dump(exclude_none=True)


class CompletionRequest(_Request):
    """``POST /v1/completions`` (the model name and ``extra_body`` are added on sending).

    Attributes:
        prompt: One prompt, or several (vLLM, SGLang and OpenAI answer each in one choice).
        max_tokens: Tokens to generate; at least 1 (llama-cpp-python reads 0 as "unlimited").
        temperature: Sampling temperature (0: greedy).
        echo: Return the prompt's tokens with their log-probabilities.
        logprobs: Top alternatives returned per token.
        stop: Stop strings.
        grammar: A GBNF grammar the output must match (llama.cpp).
        structured_outputs: ``{"choice": [...]}`` or ``{"regex": ...}`` (vLLM).
    """

    prompt: str | list[str]
    max_tokens: int
    temperature: float = 0.0
    echo: bool | None = None
    logprobs: int | None = None
    stop: list[str] | None = None
    grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None


class ChatRequest(_Request):
    """``POST /v1/chat/completions`` (the model name and ``extra_body`` are added on sending).

    Attributes:
        messages: OpenAI chat messages (images as ``image_url`` parts).
        max_tokens: Tokens to generate.
        temperature: Sampling temperature (0: greedy).
        logprobs: Return the generated tokens' log-probabilities.
        top_logprobs: Alternatives returned per generated token.
        stop: Stop strings.
        structured_outputs: ``{"choice": [...]}`` or ``{"regex": ...}`` (vLLM).
        continue_final_message: Continue the last (assistant) message instead of opening a new
            one (vLLM).
        add_generation_prompt: Open the assistant's turn (vLLM; False when continuing).
    """

    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float = 0.0
    logprobs: bool | None = None
    top_logprobs: int | None = None
    stop: list[str] | None = None
    structured_outputs: dict[str, Any] | None = None
    continue_final_message: bool | None = None
    add_generation_prompt: bool | None = None


# --------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------


class _Response(BaseModel):
    # Token texts may come back as numbers from some servers; read them as text.
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class TokenUsage(_Response):
    """A response's ``usage``."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class CompletionLogprobs(_Response):
    """A completion choice's ``logprobs`` (the OpenAI layout; with ``echo`` the prompt's tokens
    come first, ``text_offset`` counting characters from the start of the echoed text)."""

    tokens: list[str] | None = None
    token_logprobs: list[float | None] | None = None
    top_logprobs: list[dict[str, float | None] | None] | None = None
    text_offset: list[int] | None = None


class PromptLogprob(_Response):
    """One alternative at one prompt position in vLLM's ``prompt_logprobs``."""

    logprob: float | None = None
    decoded_token: str | None = None


class CompletionChoice(_Response):
    """One choice of a completion."""

    index: int = 0
    text: str | None = None
    logprobs: CompletionLogprobs | None = None
    # vLLM: None first, then per prompt token its id -> alternatives, the token itself first.
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = None


class CompletionResponse(_Response):
    """A completion: at least one choice."""

    choices: list[CompletionChoice] = Field(min_length=1)
    usage: TokenUsage | None = None


class TopLogprob(_Response):
    """An alternative token of a chat completion."""

    token: str = ""
    logprob: float | None = None


class ChatTokenLogprob(_Response):
    """A generated token of a chat completion, with its alternatives."""

    token: str = ""
    logprob: float | None = None
    top_logprobs: list[TopLogprob] | None = None


class ChatLogprobs(_Response):
    """A chat choice's ``logprobs``."""

    content: list[ChatTokenLogprob] | None = None


class ChatMessage(_Response):
    """The message of a chat choice."""

    content: str | None = None


class ChatChoice(_Response):
    """One choice of a chat completion."""

    message: ChatMessage | None = None
    logprobs: ChatLogprobs | None = None


class ChatResponse(_Response):
    """A chat completion: at least one choice."""

    choices: list[ChatChoice] = Field(min_length=1)
    usage: TokenUsage | None = None


class ModelCard(_Response):
    """One entry of ``GET /v1/models`` (``max_model_len`` is vLLM's)."""

    id: str | None = None
    owned_by: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    """``GET /v1/models``."""

    data: list[ModelCard] = Field(default_factory=list)


class TokenIds(_Response):
    """A tokenize route's answer (llama-cpp-python's ``/extras/tokenize``, vLLM's ``/tokenize``)."""

    tokens: list[int]


class TokenCount(_Response):
    """A token-count answer (llama-cpp-python's ``/extras/tokenize/count``, vLLM's
    ``/tokenize``, which may give only the tokens)."""

    count: int | None = None
    tokens: list[int] | None = None

    @property
    def n(self) -> int:
        """The count, from the tokens when no count was given."""
        if self.count is not None:
            return self.count
        if self.tokens is None:
            raise ParseError("tokenize answer without count or tokens")
        return len(self.tokens)


R = TypeVar("R", bound=_Response)


def read(model: type[R], data: Any, what: str) -> R:
    """``data`` as a ``model``.

    Raises:
        ParseError: ``data`` does not fit; the message says what was expected and where.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "the body"
        raise ParseError(f"unexpected {what} ({where}: {first['msg']}): {str(data)[:200]}") from e
