"""LLM backend for any OpenAI-compatible HTTP server (vLLM, llama.cpp, SGLang, OpenAI).

Only the standard library speaks HTTP here (``urllib.request``); requests for several prompts run
concurrently on a small thread pool.

Scoring paths (``OptionScores.method`` names the one used):

* ``echo`` (exact): ``/v1/completions`` with ``prompt = prompt + option``, ``echo: true``,
  ``logprobs: 1`` and ``max_tokens: 1``. The echoed prompt tokens come back with their
  log-probabilities (``logprobs.token_logprobs`` with ``text_offset``, or vLLM's
  ``prompt_logprobs``); the tokens that overlap the option's characters are summed. Servers that
  accept a list of prompts (vLLM, SGLang, OpenAI) get the k options of a prompt in one request.
* ``grammar`` (exact): llama.cpp (llama-cpp-python's server). The option is tokenised alone by
  the server (``POST /extras/tokenize``) and generation after the prompt is forced to exactly
  those tokens by a GBNF grammar of token ids (``root ::= <[id1]> <[id2]> ...``); the
  log-probabilities reported for the generated tokens are the model's raw ones (the grammar acts
  inside the sampler), so their sum is ``sum_t log P(o_t | p, o_<t)`` with the same
  tokenisation as the in-process backends. One request per option; the prompt prefix is reused
  by the server between the options of a prompt.
* ``first_token`` (approximate, ``exact=False``): one request per prompt with ``max_tokens: 1``
  and ``logprobs: 20`` (5 on OpenAI); an option scores the log-probability of its first token
  among the alternatives, or :data:`FIRST_TOKEN_FLOOR` (-30.0) when it is not among them.
  Options that share a first token (`` noun.animal``, `` noun.plant``) tie.
* ``generate`` (approximate, ``exact=False``): greedy generation, constrained to the options
  where the server can; the option generated scores 0, the others :data:`FIRST_TOKEN_FLOOR`.

``scoring="auto"`` takes ``echo`` when the capability probe finds plausible echoed prompt
log-probabilities, else ``grammar`` on llama.cpp, else ``first_token`` when top log-probabilities
come back, else ``generate``.

Image prompts (``images=True``; servers do not advertise whether they read images) go to
``/v1/chat/completions`` as the prompt's chat messages, each image an ``image_url`` part holding
a ``data:`` URL. The chat endpoint echoes no prompt, so they are scored approximately
(``exact=False``): ``first_token`` from the chat response's ``logprobs.content[0].top_logprobs``,
or ``generate`` when ``scoring="generate"`` or the server returns no top log-probabilities. The
prompt's answer prefix (``ImagePrompt.suffix``) is continued as the assistant's message on vLLM
(``continue_final_message``); other servers cannot continue a message, so it is left out and
options are matched without their leading whitespace.

What llama.cpp returned (llama-cpp-python 0.3.36, SmolLM2-135M-Instruct Q4_1, a model that adds
no BOS token), and why ``auto`` never takes ``echo`` there:

* ``echo: true`` with ``logprobs`` returns one finite, non-positive value per prompt token, but
  shifted by one position: the value given for token ``t_i`` is the logits row *at* ``t_i``
  (the distribution of ``t_(i+1)``) evaluated at ``t_i``. The server pairs rows with tokens as
  if a leading BOS had been stripped. On "1, 2, 3, ..., 8" the echoed values were -3 to -17
  (mean about -12), while the top alternative at each position was the *next* token with
  log-probability near 0. When the prompt does start with the BOS token (``<|im_start|>``
  for SmolLM2) the values are aligned and plausible (-0.02 to -0.7 on the same tail), which
  confirms the cause; prepending a BOS would change the context, so it is not done. The probe
  (:func:`echo_is_plausible`) tells the two cases apart; models whose llama.cpp tokenizer adds
  a BOS get aligned values and pass it.
* ``max_tokens: 0`` means "unlimited" there, so every request here asks for at least one token.
* When the most likely next token is end-of-text, a ``max_tokens: 1`` request returns no token
  and no top log-probabilities at all; the ``first_token`` path adds a grammar over the options
  there so that a token is always generated.
* A grammar of *string* literals lets the sampler spell an option with any tokens: `` noun``
  came back as ``" ", "no", "un"`` with a far lower probability. Hence the token-id grammar.
* A list of more than one prompt is refused (HTTP 500), and requests are served one at a time,
  so requests to llama.cpp are sent one by one.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import logging
import math
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from icl_cl.backends.base import (
    IMAGE_PLACEHOLDER,
    Capabilities,
    Generation,
    GenerationParams,
    ImagePrompt,
    Message,
    OptionScores,
    Prompt,
    Usage,
    check_options,
    has_images,
    plain_chat,
)
from icl_cl.backends.registry import register_backend
from icl_cl.errors import (
    BackendError,
    BackendTimeoutError,
    ConfigError,
    ContextLengthError,
    DataError,
    ParseError,
    RateLimitError,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_TOKEN_FLOOR = -30.0
"""Score of an option whose first token is not among the returned top log-probabilities (and of
the options not generated on the ``generate`` path): far below any real top-20 value."""

SCORING_MODES = ("auto", "echo", "grammar", "first_token", "generate")
# From most to least exact: a call that used several reports the least exact one.
_METHOD_ORDER = SCORING_MODES[1:]
SERVER_KINDS = ("auto", "vllm", "sglang", "llamacpp", "openai")

# A counting sequence: any language model predicts most of it with near certainty, so aligned
# echo log-probabilities average close to 0 and shifted ones do not.
# Short, because llama-cpp-python sorts the whole vocabulary for every echoed token (about
# 0.2 s per token on a small CPU).
_PROBE_TEXT = "1, 2, 3, 4, 5, 6, 7, 8"
_PROBE_MIN_MEAN_LOGPROB = -2.0

# Phrases of context-length refusals: OpenAI and llama-cpp-python ("maximum context length"),
# vLLM ("longer than the maximum model length", "max_model_len"), llama-server ("exceeds the
# available context size").
_CONTEXT_PATTERNS = (
    "context length",
    "context_length",
    "context window",
    "context size",
    "maximum context",
    "maximum model length",
    "max_model_len",
    "too many tokens",
    "prompt is too long",
    "input is too long",
)
_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class _ClientError(BackendError):
    """A 4xx answer other than 429 or a context-length error: the request itself is refused."""


class _RetryableError(BackendError):
    """Internal marker: a failed attempt that a retry may fix (wraps the public error)."""

    def __init__(self, error: BackendError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------
# Pure helpers: response parsing (tested on hand-written JSON)
# --------------------------------------------------------------------------------------------


def _offsets_from_tokens(tokens: Sequence[str]) -> list[int]:
    """Character offsets of ``tokens`` laid end to end (for responses without ``text_offset``)."""
    offsets, pos = [], 0
    for tok in tokens:
        offsets.append(pos)
        pos += len(tok)
    return offsets


def option_span(
    tokens: Sequence[str], offsets: Sequence[int], prompt_len: int, full_len: int
) -> list[int]:
    """Indices of the echoed tokens that carry the option's characters.

    A token belongs to the option when its characters overlap ``[prompt_len, full_len)``. A token
    that straddles the prompt/option boundary (the tokenizer merged across it) counts as an
    option token, since it carries option text. Tokens starting at or after ``full_len`` are
    generated, not echoed, and are left out.
    """
    span = []
    for i, (tok, start) in enumerate(zip(tokens, offsets, strict=False)):
        end = start + max(len(tok), 1)
        if start >= full_len:
            break
        if end > prompt_len:
            span.append(i)
    return span


def parse_echo_choice(choice: Mapping[str, Any], prompt: str, option: str) -> tuple[float, int]:
    """Sum the echoed log-probabilities of ``option`` in one completion choice.

    Accepts the OpenAI layout (``logprobs.tokens``, ``logprobs.token_logprobs`` and
    ``logprobs.text_offset``, offsets from the start of the echoed text) and vLLM's
    ``prompt_logprobs`` layout (a list, first entry ``null``, then one dict per prompt token
    mapping token id to ``{"logprob", "rank", "decoded_token"}``; the prompt token itself is the
    first entry of each dict, as vLLM puts it).

    Args:
        choice: One element of ``response["choices"]``.
        prompt: The prompt text the option follows.
        option: The option text; ``prompt + option`` was sent.

    Returns:
        ``(summed log-probability, number of option tokens)``.

    Raises:
        ParseError: No log-probabilities, no option tokens, or a missing/invalid value.
    """
    tokens: list[str]
    values: list[float | None]
    offsets: list[int] | None = None
    lp = choice.get("logprobs")
    if isinstance(lp, Mapping) and lp.get("token_logprobs") is not None:
        values = list(lp["token_logprobs"])
        tokens = [str(t) for t in lp.get("tokens") or []]
        if lp.get("text_offset") is not None:
            offsets = [int(o) for o in lp["text_offset"]]
        if not tokens and offsets is None:
            raise ParseError("echo response has token_logprobs but neither tokens nor text_offset")
        if not tokens:
            # Token texts from consecutive offsets; the last one runs to the end of the text.
            assert offsets is not None
            ends = [*offsets[1:], len(prompt) + len(option)]
            tokens = ["x" * max(e - s, 0) for s, e in zip(offsets, ends, strict=True)]
    elif choice.get("prompt_logprobs") is not None:
        tokens, values = [], []
        for entry in choice["prompt_logprobs"]:
            if entry is None:
                # vLLM gives the first prompt token no log-probability; its text is unknown.
                tokens.append("")
                values.append(None)
                continue
            first = next(iter(entry.values()))
            tokens.append(str(first.get("decoded_token") or ""))
            values.append(first.get("logprob"))
        if tokens and tokens[0] == "" and values[0] is None:
            # Recover the first token's text: the rest of the echoed text follows it.
            rest = "".join(tokens[1:])
            full = prompt + option
            tokens[0] = full[: max(len(full) - len(rest), 0)]
    else:
        raise ParseError("completion has no echoed log-probabilities (logprobs or prompt_logprobs)")
    if offsets is None or len(offsets) != len(tokens):
        offsets = _offsets_from_tokens(tokens)
    if len(values) != len(tokens):
        raise ParseError(f"{len(values)} log-probabilities for {len(tokens)} echoed tokens")
    span = option_span(tokens, offsets, len(prompt), len(prompt) + len(option))
    if not span:
        raise ParseError(f"no echoed tokens cover the option {option!r}")
    total = 0.0
    for i in span:
        v = values[i]
        if v is None or not math.isfinite(float(v)):
            raise ParseError(
                f"echoed token {tokens[i]!r} of option {option!r} has no log-probability"
            )
        total += float(v)
    return total, len(span)


def first_token_logprob(
    top: Mapping[str, float] | None, option: str, first_token: str | None = None
) -> float:
    """Log-probability of the first token of ``option`` among top alternatives.

    Args:
        top: Token text to log-probability, for the first generated position.
        option: The option text.
        first_token: The option's first token text when a tokenizer knows it; otherwise the
            longest alternative that is a prefix of ``option`` stands for its first token.

    Returns:
        The log-probability, or :data:`FIRST_TOKEN_FLOOR` when the token is not in ``top``.
    """
    if not top:
        return FIRST_TOKEN_FLOOR
    if first_token is not None:
        value = top.get(first_token)
        return float(value) if value is not None else FIRST_TOKEN_FLOOR
    best_len, best = 0, FIRST_TOKEN_FLOOR
    for tok, value in top.items():
        if tok and option.startswith(tok) and len(tok) > best_len and value is not None:
            best_len, best = len(tok), float(value)
    return best


def echo_is_plausible(choice: Mapping[str, Any], prompt: str) -> bool:
    """Whether an echo probe of ``prompt`` returned aligned prompt log-probabilities.

    Checks: one finite, non-positive value per echoed prompt token (the first may be null), and
    on the predictable probe text a mean over its second half above
    ``_PROBE_MIN_MEAN_LOGPROB``. Where ``top_logprobs`` are present it also checks that token
    ``i`` is the top alternative at position ``i`` at least as often as token ``i + 1`` is (a
    server that pairs logits rows with the wrong tokens fails this).
    """
    lp = choice.get("logprobs")
    if not isinstance(lp, Mapping) or lp.get("token_logprobs") is None:
        return False
    values = lp["token_logprobs"]
    tokens = [str(t) for t in lp.get("tokens") or []]
    offsets = lp.get("text_offset")
    if not tokens or len(tokens) != len(values):
        return False
    if offsets is None or len(offsets) != len(tokens):
        offsets = _offsets_from_tokens(tokens)
    n_prompt = sum(1 for o in offsets if o < len(prompt))
    if n_prompt < 4:
        return False
    prompt_vals = values[:n_prompt]
    for i, v in enumerate(prompt_vals):
        if v is None:
            if i == 0:
                continue
            return False
        if not math.isfinite(float(v)) or float(v) > 1e-4:
            return False
    tail = [float(v) for v in prompt_vals[n_prompt // 2 :] if v is not None]
    if not tail or sum(tail) / len(tail) < _PROBE_MIN_MEAN_LOGPROB:
        return False
    top = lp.get("top_logprobs")
    if isinstance(top, list) and len(top) == len(tokens):
        aligned = shifted = 0
        for i in range(1, n_prompt - 1):
            alts = top[i]
            if not alts:
                continue
            best = max(alts.items(), key=lambda kv: kv[1])[0]
            aligned += best == tokens[i]
            shifted += best == tokens[i + 1]
        if shifted > aligned:
            return False
    return True


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (llama.cpp grammars)."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def choice_grammar(choices: Sequence[str]) -> str:
    """A GBNF grammar whose language is exactly ``choices``."""
    return "root ::= " + " | ".join(gbnf_literal(c) for c in choices)


def token_grammar(sequences: Sequence[Sequence[int]]) -> str:
    """A GBNF grammar whose language is exactly the given token-id sequences.

    llama.cpp reads ``<[id]>`` as one token, so the forced tokenisation is the one given, not
    whatever splits the sampler would prefer (a string literal lets it spell ``" noun"`` as
    ``" ", "no", "un"``).
    """
    alts = [" ".join(f"<[{int(t)}]>" for t in seq) for seq in sequences if len(seq)]
    if not alts:
        raise ValueError("no token sequences")
    return "root ::= " + " | ".join(alts)


# --------------------------------------------------------------------------------------------
# Pure helpers: chat requests with images, and their answers
# --------------------------------------------------------------------------------------------


def _checked_image(image: Any, n: int) -> Any:
    from icl_cl.images import Image

    if not isinstance(image, Image):
        raise DataError(
            f"message {n}: an image part needs an icl_cl.images.Image "
            f"(see icl_cl.images.load_image), not {type(image).__name__}",
            field="image",
        )
    return image


def _message_images(messages: Sequence[Message]) -> tuple[Any, ...]:
    """The images of ``messages`` in reading order, each checked to be an ``Image``."""
    return tuple(
        _checked_image(part.get("image"), n)
        for n, m in enumerate(messages)
        if not isinstance(m["content"], str)
        for part in m["content"]
        if part.get("type") == "image"
    )


def chat_messages(prompt: ImagePrompt) -> list[dict[str, Any]]:
    """The OpenAI chat messages of an image prompt.

    String contents stay strings; in a list content, a text part stays a text part and an image
    part becomes ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,..."}}``,
    in the same order. A prompt without messages is one user message: its text split at each
    :data:`~icl_cl.backends.base.IMAGE_PLACEHOLDER`, with its images there (or all first when
    the placeholders and images do not pair up). The answer prefix is not included (see
    :func:`chat_body`).

    Raises:
        DataError: An image part without an :class:`~icl_cl.images.Image`, or an unknown part.
    """
    messages: Sequence[Message] = prompt.messages
    if not messages:
        pieces = prompt.text.split(IMAGE_PLACEHOLDER)
        parts: list[dict[str, Any]] = []
        if len(pieces) == len(prompt.images) + 1:
            for i, piece in enumerate(pieces):
                if piece:
                    parts.append({"type": "text", "text": piece})
                if i < len(prompt.images):
                    parts.append({"type": "image", "image": prompt.images[i]})
        else:
            parts = [{"type": "image", "image": image} for image in prompt.images]
            parts.append({"type": "text", "text": prompt.text})
        messages = [{"role": "user", "content": parts}]
    out: list[dict[str, Any]] = []
    for n, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        converted: list[dict[str, Any]] = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                converted.append({"type": "text", "text": str(part["text"])})
            elif kind == "image":
                url = _checked_image(part.get("image"), n).data_url()
                converted.append({"type": "image_url", "image_url": {"url": url}})
            else:
                raise DataError(f"message {n}: unknown content part type {kind!r}", field="content")
        out.append({"role": message["role"], "content": converted})
    return out


def continues_answer(prompt: ImagePrompt, server_kind: str) -> bool:
    """Whether the chat request continues the prompt's answer prefix (vLLM's
    ``continue_final_message``; other servers open a new assistant message)."""
    return bool(prompt.suffix) and server_kind == "vllm"


def chat_body(prompt: ImagePrompt, server_kind: str) -> dict[str, Any]:
    """The ``messages`` of a ``/v1/chat/completions`` request for ``prompt``.

    On vLLM the answer prefix becomes a final assistant message that the model continues
    (``continue_final_message: true``, ``add_generation_prompt: false``); other servers get no
    answer prefix.
    """
    body: dict[str, Any] = {"messages": chat_messages(prompt)}
    if continues_answer(prompt, server_kind):
        body["messages"].append({"role": "assistant", "content": prompt.suffix})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


def chat_top_logprobs(choice: Mapping[str, Any]) -> dict[str, float] | None:
    """Token text to log-probability for the first generated token of a chat completion choice
    (``logprobs.content[0]``: its ``top_logprobs`` and the token itself); None when absent."""
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, Mapping) else None
    if not content or not isinstance(content[0], Mapping):
        return None
    first = content[0]
    top: dict[str, float] = {}
    for alt in first.get("top_logprobs") or []:
        if isinstance(alt, Mapping) and alt.get("logprob") is not None:
            top[str(alt.get("token", ""))] = float(alt["logprob"])
    if not top:
        return None  # the sampled token alone says nothing about the options
    if first.get("logprob") is not None:
        top.setdefault(str(first.get("token", "")), float(first["logprob"]))
    return top


def chat_generation(response: Mapping[str, Any]) -> Generation:
    """A :class:`Generation` from a chat completion: the message text, the generated tokens'
    log-probabilities (``logprobs.content``) and the token usage."""
    choices = response.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise ParseError(f"chat completion without choices: {str(response)[:200]}")
    choice = choices[0]
    message = choice.get("message") or {}
    lp = choice.get("logprobs")
    content = (lp.get("content") if isinstance(lp, Mapping) else None) or []
    values = tuple(
        float(t["logprob"])
        for t in content
        if isinstance(t, Mapping) and t.get("logprob") is not None
    )
    tokens = response.get("usage") or {}
    return Generation(
        text=str(message.get("content") or ""),
        token_logprobs=values,
        prompt_tokens=int(tokens.get("prompt_tokens") or 0),
        completion_tokens=int(tokens.get("completion_tokens") or 0),
    )


def _error_message(raw: bytes) -> str:
    """The human message inside an error body (OpenAI, FastAPI or plain text layouts)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:2000]
    if isinstance(data, Mapping):
        err = data.get("error", data)
        if isinstance(err, Mapping):
            for key in ("message", "detail", "msg"):
                if err.get(key):
                    return str(err[key])
        elif isinstance(err, str):
            return err
        if data.get("detail"):
            return str(data["detail"])
    return text[:2000]


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (the delta-seconds form; HTTP dates are ignored)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        return None


def _looks_like_context_error(message: str) -> bool:
    low = message.lower()
    return any(p in low for p in _CONTEXT_PATTERNS)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


@register_backend("openai")
class OpenAICompatBackend:
    """An LLM behind an OpenAI-compatible ``/v1/completions`` endpoint (``/v1/chat/completions``
    for prompts with images).

    Capabilities are detected lazily by one probe (see :attr:`capabilities`). All requests are
    retried on rate limits (HTTP 429, honouring ``Retry-After``), timeouts, connection errors
    and 5xx answers with exponential back-off; other 4xx answers fail at once, and a 400 about
    the context length raises :class:`ContextLengthError`. In ``Usage``, ``calls`` counts
    successful model requests, ``failures`` every failed attempt and ``retries`` every repeated
    one; the cost of each call is in its result and summed in :attr:`usage`, failed calls
    included.

    Args:
        model: Model name sent to the server.
        base_url: Server URL up to and including ``/v1``.
        api_key: Bearer token; ``OPENAI_API_KEY`` from the environment when None.
        timeout: Seconds to wait for one HTTP answer.
        max_retries: Retries after the first attempt; the last error is raised after them.
        backoff: First back-off in seconds, doubled on every retry.
        concurrency: Threads sending requests for several prompts at once.
        tokenizer: Local Hugging Face tokenizer directory for :meth:`render_chat` and
            :meth:`count_tokens` (loaded lazily, offline).
        gguf_file: GGUF file name inside ``tokenizer`` to read the tokenizer from.
        extra_body: Merged into every request body (vLLM-only parameters go here).
        scoring: ``auto``, ``echo``, ``grammar``, ``first_token`` or ``generate`` (see the
            module docstring).
        server_kind: ``auto`` (detected from ``/v1/models``), ``vllm``, ``sglang``,
            ``llamacpp`` or ``openai``. Decides list batching and constrained generation.
        top_logprobs: Alternatives asked for on the ``first_token`` path (OpenAI allows 5).
        images: Whether the server's model reads images (servers do not advertise it). When
            False, messages with images are refused with a :class:`DataError`.
        image_tokens: What one image counts in :meth:`count_tokens` (a server says only after
            the request; LLaVA-1.5 takes 576 tokens, tiling models up to a few thousand).
    """

    name = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 4,
        tokenizer: str | None = None,
        gguf_file: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
        scoring: str = "auto",
        server_kind: str = "auto",
        top_logprobs: int = 20,
        images: bool = False,
        image_tokens: int = 1024,
    ) -> None:
        if scoring not in SCORING_MODES:
            raise ConfigError(f"scoring must be one of {', '.join(SCORING_MODES)}, not {scoring!r}")
        if server_kind not in SERVER_KINDS:
            raise ConfigError(
                f"server_kind must be one of {', '.join(SERVER_KINDS)}, not {server_kind!r}"
            )
        if max_retries < 0 or concurrency < 1 or timeout <= 0:
            raise ConfigError("max_retries >= 0, concurrency >= 1 and timeout > 0 are required")
        if image_tokens < 0:
            raise ConfigError("image_tokens must be >= 0")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.concurrency = int(concurrency)
        self.tokenizer_path = tokenizer
        self.gguf_file = gguf_file
        self.extra_body = dict(extra_body or {})
        self.scoring = scoring
        self.server_kind = server_kind
        self.top_logprobs = int(top_logprobs)
        self.images = bool(images)
        self.image_tokens = int(image_tokens)
        self.usage = Usage()
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._caps: Capabilities | None = None
        self._echo_ok: bool | None = None
        self._tokenizer: Any = None
        self._server_tokenize: bool | None = None
        self._token_cache: dict[str, list[int]] = {}
        self._bos_ids: list[int] | None = None
        self._warned_echo = False
        # Whether the chat endpoint returns top log-probabilities (None: not asked yet).
        self._chat_logprobs: bool | None = None
        host = urllib.parse.urlsplit(self.base_url).hostname or ""
        # Env proxies must not capture loopback traffic (local servers, tests).
        handlers: list[urllib.request.BaseHandler] = (
            [urllib.request.ProxyHandler({})] if host in _LOOPBACK else []
        )
        self._opener = urllib.request.build_opener(*handlers)

    # ---------------------------------------------------------------- HTTP

    @property
    def _root_url(self) -> str:
        """Server root (``base_url`` without a trailing ``/v1``): non-OpenAI routes live there."""
        return self.base_url[: -len("/v1")] if self.base_url.endswith("/v1") else self.base_url

    def _attempt(self, method: str, url: str, body: Mapping[str, Any] | None) -> dict[str, Any]:
        """One HTTP exchange; raises the public error, wrapped in ``_RetryableError`` if retryable."""
        data = json.dumps(body).encode("utf-8") if body is not None else None
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            try:
                message = _error_message(e.read())
            except Exception:  # the body may be gone with the connection
                message = str(e.reason)
            finally:
                e.close()
            status = e.code
            text = f"HTTP {status} from {url}: {message}"
            if status == 429:
                raise _RetryableError(
                    RateLimitError(text), _retry_after(e.headers.get("Retry-After"))
                ) from e
            if status in (400, 413, 422, 500) and _looks_like_context_error(message):
                raise ContextLengthError(text) from e
            if status == 408:
                raise _RetryableError(BackendTimeoutError(text)) from e
            if status >= 500:
                raise _RetryableError(BackendError(text)) from e
            raise _ClientError(text) from e
        except TimeoutError as e:
            raise _RetryableError(
                BackendTimeoutError(f"no answer from {url} within {self.timeout:g} s")
            ) from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise _RetryableError(
                    BackendTimeoutError(f"no answer from {url} within {self.timeout:g} s")
                ) from e
            raise _RetryableError(BackendError(f"cannot reach {url}: {e.reason}")) from e
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise _RetryableError(BackendError(f"connection to {url} failed: {e!r}")) from e
        try:
            parsed = json.loads(raw)
        except ValueError as e:
            raise _RetryableError(BackendError(f"invalid JSON from {url}: {raw[:200]!r}")) from e
        if not isinstance(parsed, dict):
            raise BackendError(f"unexpected answer from {url}: {raw[:200]!r}")
        return parsed

    def _request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        usage: Usage,
        *,
        root: bool = False,
        count_call: bool = True,
        retries: int | None = None,
    ) -> dict[str, Any]:
        """An HTTP call with retries; adds calls, tokens, retries and failures to ``usage``.

        Args:
            retries: Overrides ``max_retries`` for this call.
        """
        url = (self._root_url if root else self.base_url) + path
        max_retries = self.max_retries if retries is None else retries
        last: BackendError | None = None
        for attempt in range(max_retries + 1):
            if attempt:
                with self._lock:
                    usage.retries += 1
            try:
                result = self._attempt(method, url, body)
            except _RetryableError as e:
                last = e.error
                last.__cause__ = e.__cause__  # keep the network error in the traceback
                with self._lock:
                    usage.failures += 1
                if attempt == max_retries:
                    break
                delay = self.backoff * (2**attempt)
                if e.retry_after is not None:
                    delay = max(delay, min(e.retry_after, 60.0))
                logger.warning("%s; retry %d/%d in %.2f s", last, attempt + 1, max_retries, delay)
                time.sleep(delay)
                continue
            except BackendError:
                with self._lock:
                    usage.failures += 1
                raise
            tokens = result.get("usage") or {}
            with self._lock:
                if count_call:
                    usage.calls += 1
                usage.prompt_tokens += int(tokens.get("prompt_tokens") or 0)
                usage.completion_tokens += int(tokens.get("completion_tokens") or 0)
            return result
        assert last is not None
        raise last

    def _completion(
        self, body: Mapping[str, Any], usage: Usage, *, retries: int | None = None
    ) -> dict[str, Any]:
        return self._choices("/completions", "completion", body, usage, retries)

    def _chat(
        self, body: Mapping[str, Any], usage: Usage, *, retries: int | None = None
    ) -> dict[str, Any]:
        return self._choices("/chat/completions", "chat completion", body, usage, retries)

    def _choices(
        self, path: str, what: str, body: Mapping[str, Any], usage: Usage, retries: int | None
    ) -> dict[str, Any]:
        """POST ``body`` (with the model and extra fields) to ``path``; the answer must have
        choices."""
        payload = {"model": self.model, **self.extra_body, **body}
        result = self._request("POST", path, payload, usage, retries=retries)
        if not isinstance(result.get("choices"), list) or not result["choices"]:
            raise ParseError(f"{what} without choices: {str(result)[:200]}")
        return result

    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``fn`` over ``items`` on the thread pool (in order); inline for a single item.

        Inline on llama-cpp-python too: it serves one request at a time and reuses only the
        previous request's prompt prefix, which interleaved prompts would throw away.
        """
        if len(items) <= 1 or self.concurrency == 1 or self.server_kind == "llamacpp":
            return [fn(x) for x in items]
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = concurrent.futures.ThreadPoolExecutor(
                        max_workers=self.concurrency, thread_name_prefix="icl-cl-openai"
                    )
        return list(self._pool.map(fn, items))

    def _finish(self, usage: Usage, started: float) -> None:
        usage.seconds = time.perf_counter() - started
        with self._lock:
            self.usage.add(usage)

    # ---------------------------------------------------------------- capabilities

    @property
    def capabilities(self) -> Capabilities:
        """What the server supports, probed once on first use.

        ``GET /v1/models`` gives the server kind (``owned_by``) and ``max_context`` (vLLM's
        ``max_model_len``). One ``/v1/completions`` request with ``echo: true, logprobs: 5,
        max_tokens: 1`` on a counting sequence tells whether echoed prompt log-probabilities
        are plausible (:func:`echo_is_plausible`) and whether top alternatives come back.

        If the server cannot be reached, all-False capabilities are returned (not remembered,
        so the next use probes again); :meth:`score` and :meth:`generate` raise the error.
        """
        try:
            # One attempt only: this property is also read by isinstance(..., LLMBackend).
            return self._detect(retries=0)
        except BackendError as e:
            logger.warning("cannot probe %s (%s); assuming no capabilities", self.base_url, e)
            return Capabilities(images=self.images)

    def _detect(self, retries: int | None = None) -> Capabilities:
        """The probed capabilities; raises the probe's error when the server fails."""
        if self._caps is None:
            with self._probe_lock:
                if self._caps is None:
                    self._caps = self._probe(retries)
        return self._caps

    def _probe(self, retries: int | None) -> Capabilities:
        usage = Usage()
        started = time.perf_counter()
        try:
            max_context = self._probe_models(usage, retries)
            if self.server_kind == "openai":
                self.top_logprobs = min(self.top_logprobs, 5)  # OpenAI's limit
            logprobs, top_n, echo_ok = self._probe_logprobs(usage, retries)
        finally:
            self._finish(usage, started)
        self._echo_ok = echo_ok
        llamacpp = self.server_kind == "llamacpp"
        caps = Capabilities(
            logprobs=logprobs,
            # llama.cpp scores exactly by grammar-forced generation (see the module docstring).
            prompt_logprobs=echo_ok or (llamacpp and logprobs),
            top_logprobs=top_n,
            constrained_choice=self.server_kind in ("vllm", "llamacpp"),
            constrained_regex=self.server_kind == "vllm",
            images=self.images,
            prefix_caching=self.server_kind in ("vllm", "sglang", "llamacpp"),
            max_context=max_context,
        )
        logger.info("server %s: kind %s, %s", self.base_url, self.server_kind, caps)
        return caps

    def _probe_models(self, usage: Usage, retries: int | None) -> int | None:
        """Read ``/v1/models``: sets ``server_kind`` when ``auto``; returns ``max_model_len``."""
        try:
            models = self._request("GET", "/models", None, usage, count_call=False, retries=retries)
        except _ClientError as e:
            logger.info("no /models on %s (%s)", self.base_url, e)
            models = {}
        owners: set[str] = set()
        max_context: int | None = None
        for entry in models.get("data") or []:
            if not isinstance(entry, Mapping):
                continue
            owners.add(str(entry.get("owned_by", "")).lower())
            if entry.get("max_model_len") and (
                max_context is None or entry.get("id") == self.model
            ):
                max_context = int(entry["max_model_len"])
        if self.server_kind == "auto":
            if "vllm" in owners:
                self.server_kind = "vllm"
            elif "sglang" in owners:
                self.server_kind = "sglang"
            elif owners & {"me", "llamacpp", "llama.cpp"}:
                # "me" is what llama-cpp-python's server reports, "llamacpp" llama-server's.
                self.server_kind = "llamacpp"
            elif owners & {"openai", "system", "openai-internal"}:
                self.server_kind = "openai"
            else:
                self.server_kind = "unknown"
        return max_context

    def _probe_logprobs(self, usage: Usage, retries: int | None) -> tuple[bool, int, bool]:
        """``(logprobs, top_logprobs, echo plausible)`` from one or two tiny completions."""
        echo_body = {
            "prompt": _PROBE_TEXT,
            "echo": True,
            "logprobs": 5,
            "max_tokens": 1,
            "temperature": 0.0,
        }
        try:
            choice = self._completion(echo_body, usage, retries=retries)["choices"][0]
        except _ClientError as e:
            # OpenAI, for one, refuses echo with logprobs; try plain logprobs.
            logger.info("echo probe refused (%s); no prompt log-probabilities", e)
            plain = {"prompt": _PROBE_TEXT, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}
            try:
                choice = self._completion(plain, usage, retries=retries)["choices"][0]
            except _ClientError as e2:
                logger.info("logprobs probe refused (%s)", e2)
                return False, 0, False
            lp = choice.get("logprobs")
            ok = isinstance(lp, Mapping) and lp.get("token_logprobs") is not None
            return ok, self.top_logprobs if ok else 0, False
        lp = choice.get("logprobs")
        if not isinstance(lp, Mapping) or lp.get("token_logprobs") is None:
            return False, 0, False
        top = lp.get("top_logprobs") or []
        top_n = self.top_logprobs if top and isinstance(top[-1], Mapping) and top[-1] else 0
        echo_ok = echo_is_plausible(choice, _PROBE_TEXT)
        if not echo_ok:
            logger.warning(
                "server %s (%s): echoed prompt log-probabilities look wrong; not using echo",
                self.base_url,
                self.server_kind,
            )
        return True, top_n, echo_ok

    def scoring_method(self) -> str:
        """The scoring path :meth:`score` takes (resolves ``auto`` with the probe)."""
        if self.scoring != "auto":
            return self.scoring
        caps = self._detect()
        if self._echo_ok:
            return "echo"
        if self.server_kind == "llamacpp" and caps.logprobs:
            return "grammar"
        if caps.top_logprobs:
            return "first_token"
        return "generate"

    # ---------------------------------------------------------------- text utilities

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None and self.tokenizer_path is not None:
            from transformers import AutoTokenizer  # heavy; only when asked for

            kwargs: dict[str, Any] = {}
            if self.gguf_file:
                kwargs["gguf_file"] = self.gguf_file
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path, **kwargs)
            except (OSError, ValueError) as e:
                raise ConfigError(f"cannot load tokenizer {self.tokenizer_path!r}: {e}") from e
        return self._tokenizer

    def render_chat(self, messages: Sequence[Message]) -> Prompt:
        """Chat messages as prompt text, or as an :class:`ImagePrompt` when they hold images.

        Uses the local tokenizer's chat template when ``tokenizer`` is set and has one (ending
        with the assistant header), else :func:`plain_chat`. The server's own template is not
        used: ``/v1/completions`` takes the rendered text. Messages with images are sent to the
        chat endpoint as they are (the server applies its template); their prompt's text is a
        plain layout with an ``<image>`` placeholder per image, for keys and token counts.
        """
        if has_images(messages):
            self._require_images()
            return ImagePrompt(plain_chat(messages), _message_images(messages), tuple(messages))
        tok = self._load_tokenizer()
        if tok is not None and getattr(tok, "chat_template", None):
            return str(
                tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
            )
        return plain_chat(messages)

    def count_tokens(self, prompt: Prompt) -> int:
        """Tokens in ``prompt``, from the best source available.

        In order: the local ``tokenizer`` (no special tokens); the server's tokenizer
        (llama-cpp-python's ``POST /extras/tokenize/count``, vLLM's ``POST /tokenize``), which
        may count a BOS token; otherwise an estimate of one token per 4 characters, rounded up.
        A server without a tokenize route is asked once. An image counts ``image_tokens``.
        """
        if isinstance(prompt, ImagePrompt):
            self._require_images()
            text_tokens = self.count_tokens(prompt.text.replace(IMAGE_PLACEHOLDER, ""))
            return text_tokens + self.image_tokens * len(prompt.images)
        text = prompt
        tok = self._load_tokenizer()
        if tok is not None:
            return len(tok(text, add_special_tokens=False)["input_ids"])
        if self._server_tokenize is not False:
            try:
                count = self._server_count(text)
            except (_ClientError, KeyError, TypeError, ValueError) as e:
                # The route is missing or answers oddly: do not ask again.
                logger.warning("server cannot count tokens (%s); estimating 4 chars/token", e)
                self._server_tokenize = False
            except BackendError as e:
                logger.warning("token count failed (%s); estimating 4 chars/token", e)
            else:
                if count is not None:
                    self._server_tokenize = True
                    return count
                self._server_tokenize = False
        return (len(text) + 3) // 4

    def _require_images(self, prompts: Sequence[Prompt] = ()) -> None:
        if prompts and not any(isinstance(p, ImagePrompt) for p in prompts):
            return
        if not self.images:
            raise DataError(
                f"the openai backend was not told that {self.model!r} at {self.base_url} reads "
                "images, so it treats it as text-only; pass images=True if the server takes them",
                field="image",
            )

    def _server_count(self, text: str) -> int | None:
        """Token count from the server's tokenize route; None when the kind has none."""
        self._detect()  # the server kind decides the route
        usage = Usage()
        if self.server_kind == "llamacpp":
            body: dict[str, Any] = {"input": text, "model": self.model}
            res = self._request(
                "POST", "/extras/tokenize/count", body, usage, root=True, count_call=False
            )
            return int(res["count"])
        if self.server_kind in ("vllm", "sglang"):
            body = {"model": self.model, "prompt": text, "add_special_tokens": False}
            res = self._request("POST", "/tokenize", body, usage, root=True, count_call=False)
            return int(res["count"]) if "count" in res else len(res["tokens"])
        return None

    # ---------------------------------------------------------------- scoring

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        """Log-probability of each option as the continuation of its prompt.

        The path follows ``scoring`` (see the module docstring); ``method`` and ``exact`` in the
        result say which one ran (the least exact one when image prompts took another path).
        Prompts are scored concurrently.
        """
        usage = Usage()
        started = time.perf_counter()
        try:
            lp, counts, method = self._score_into(prompts, options, usage)
        finally:
            self._finish(usage, started)
        exact = method in ("echo", "grammar")
        return OptionScores(
            logprobs=lp, token_counts=counts, exact=exact, method=method, usage=usage
        )

    def _score_into(
        self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]], usage: Usage
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Scores, token counts and the method used; the cost goes into ``usage``."""
        k = check_options(prompts, options)
        n = len(prompts)
        lp = np.zeros((n, k), dtype=np.float64)
        counts = np.zeros((n, k), dtype=np.int64)
        if not n:
            return lp, counts, self.scoring if self.scoring != "auto" else "echo"
        self._require_images(prompts)
        if any(isinstance(p, ImagePrompt) for p in prompts):
            return self._score_with_images(prompts, options, usage, lp, counts)
        self._detect()  # the server kind decides batching and request details
        method = self.scoring_method()
        if method == "echo" and self._echo_ok is False and not self._warned_echo:
            self._warned_echo = True
            logger.warning("scoring='echo' although this server's echo looked wrong (see docs)")
        fn = {
            "echo": self._score_echo,
            "grammar": self._score_grammar,
            "first_token": self._score_first_token,
            "generate": self._score_generate,
        }[method]
        rows = self._map(lambda i: fn(prompts[i], list(options[i]), usage), range(n))
        for i, (row_lp, row_n) in enumerate(rows):
            lp[i] = row_lp
            counts[i] = row_n
        return lp, counts, method

    def _score_with_images(
        self,
        prompts: Sequence[Prompt],
        options: Sequence[Sequence[str]],
        usage: Usage,
        lp: np.ndarray,
        counts: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """A batch with image prompts: text prompts as usual, image prompts through the chat
        endpoint; the method reported is the least exact one used."""
        self._detect()
        text_rows = [i for i, p in enumerate(prompts) if not isinstance(p, ImagePrompt)]
        methods = set()
        if text_rows:
            sub_lp, sub_counts, method = self._score_into(
                [prompts[i] for i in text_rows], [options[i] for i in text_rows], usage
            )
            lp[text_rows], counts[text_rows] = sub_lp, sub_counts
            methods.add(method)
        image_rows = [i for i, p in enumerate(prompts) if isinstance(p, ImagePrompt)]

        def one(i: int) -> tuple[list[float], list[int], str]:
            prompt = prompts[i]
            assert isinstance(prompt, ImagePrompt)
            return self._score_image(prompt, list(options[i]), usage)

        for i, (row_lp, row_n, method) in zip(image_rows, self._map(one, image_rows), strict=True):
            lp[i], counts[i] = row_lp, row_n
            methods.add(method)
        return lp, counts, max(methods, key=_METHOD_ORDER.index)

    def _score_image(
        self, prompt: ImagePrompt, opts: list[str], usage: Usage
    ) -> tuple[list[float], list[int], str]:
        """``first_token`` from the chat endpoint's top log-probabilities, else ``generate``."""
        if self.scoring != "generate" and self._chat_logprobs is not False:
            body = {
                **chat_body(prompt, self.server_kind),
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": True,
                "top_logprobs": self.top_logprobs,
            }
            try:
                top = chat_top_logprobs(self._chat(body, usage)["choices"][0])
            except _ClientError as e:
                if self.scoring != "auto":
                    raise
                logger.warning("chat log-probabilities refused (%s); scoring by generation", e)
                top = None
            if top is not None:
                self._chat_logprobs = True
                # Without the answer prefix the reply starts afresh: no leading space.
                keys = (
                    opts
                    if continues_answer(prompt, self.server_kind)
                    else [o.lstrip() or o for o in opts]
                )
                firsts = self._first_tokens(keys)
                values = [first_token_logprob(top, o, f) for o, f in zip(keys, firsts, strict=True)]
                return values, [1] * len(opts), "first_token"
            if self.scoring != "auto":
                raise ParseError("chat completion has no top_logprobs for the first token")
            self._chat_logprobs = False
        values, n = self._score_generate(prompt, opts, usage)
        return values, n, "generate"

    def _score_echo(
        self, prompt: str, opts: list[str], usage: Usage
    ) -> tuple[list[float], list[int]]:
        if self.server_kind in ("vllm", "sglang", "openai"):
            # One request for all k options: these servers accept a list of prompts.
            resp = self._completion(self._echo_body([prompt + o for o in opts]), usage)
            choices = sorted(resp["choices"], key=lambda c: int(c.get("index", 0)))
            if len(choices) != len(opts):
                raise ParseError(f"{len(choices)} choices for {len(opts)} prompts")
        else:
            choices = [
                self._completion(self._echo_body(prompt + o), usage)["choices"][0] for o in opts
            ]
        parsed = [parse_echo_choice(c, prompt, o) for c, o in zip(choices, opts, strict=True)]
        return [p[0] for p in parsed], [p[1] for p in parsed]

    @staticmethod
    def _echo_body(prompt: str | list[str]) -> dict[str, Any]:
        # max_tokens 1, not 0: llama-cpp-python reads 0 as "unlimited".
        return {"prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.0}

    def _score_grammar(
        self, prompt: str, opts: list[str], usage: Usage
    ) -> tuple[list[float], list[int]]:
        # Options one after another: llama.cpp then reuses the evaluated prompt prefix.
        values, counts = [], []
        for o in opts:
            ids = self._option_ids(o, usage)
            resp = self._completion(
                {
                    "prompt": prompt,
                    "grammar": token_grammar([ids]),
                    "logprobs": 1,
                    "max_tokens": len(ids),
                    "temperature": 0.0,
                },
                usage,
            )
            lp = resp["choices"][0].get("logprobs") or {}
            vals = lp.get("token_logprobs") or []
            if len(vals) != len(ids):
                raise ParseError(
                    f"forced generation of option {o!r} returned {len(vals)} log-probabilities "
                    f"for {len(ids)} tokens; does the server honour token-id grammars?"
                )
            if any(v is None or not math.isfinite(float(v)) for v in vals):
                raise ParseError(f"missing log-probability in forced option {o!r}")
            values.append(float(sum(vals)))
            counts.append(len(ids))
        return values, counts

    def _option_ids(self, option: str, usage: Usage) -> list[int]:
        """Token ids of ``option`` on its own, from llama-cpp-python's ``/extras/tokenize``.

        Options are tokenised alone, as the in-process backends do; a BOS token the server adds
        (the tokenisation of the empty string) is removed.
        """
        cached = self._token_cache.get(option)
        if cached is not None:
            return cached
        if self._bos_ids is None:
            self._bos_ids = self._server_tokenize_ids("", usage)
        ids = self._server_tokenize_ids(option, usage)
        if self._bos_ids and ids[: len(self._bos_ids)] == self._bos_ids:
            ids = ids[len(self._bos_ids) :]
        if not ids:
            raise BackendError(f"option {option!r} encodes to no tokens")
        with self._lock:
            if len(self._token_cache) > 100_000:
                self._token_cache.clear()
            self._token_cache[option] = ids
        return ids

    def _server_tokenize_ids(self, text: str, usage: Usage) -> list[int]:
        body = {"input": text, "model": self.model}
        res = self._request("POST", "/extras/tokenize", body, usage, root=True, count_call=False)
        try:
            return [int(t) for t in res["tokens"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ParseError(f"unexpected tokenize answer: {str(res)[:200]}") from e

    def _first_tokens(self, opts: list[str]) -> list[str | None]:
        tok = self._load_tokenizer()
        if tok is None:
            return [None] * len(opts)
        out: list[str | None] = []
        for o in opts:
            ids = tok(o, add_special_tokens=False)["input_ids"]
            out.append(tok.decode(ids[:1]) if ids else None)
        return out

    def _score_first_token(
        self, prompt: str, opts: list[str], usage: Usage
    ) -> tuple[list[float], list[int]]:
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": 1,
            "logprobs": self.top_logprobs,
            "temperature": 0.0,
        }
        if self.server_kind == "llamacpp":
            # llama.cpp drops the top log-probabilities when the first token is end-of-text;
            # a grammar keeps it from stopping (the values it reports are unconstrained).
            body["grammar"] = choice_grammar(opts)
        resp = self._completion(body, usage)
        lp = resp["choices"][0].get("logprobs") or {}
        tops = lp.get("top_logprobs") or [None]
        top = tops[0] if isinstance(tops[0], Mapping) else None
        if top is None:
            raise ParseError("completion has no top_logprobs for the first token")
        firsts = self._first_tokens(opts)
        values = [first_token_logprob(top, o, f) for o, f in zip(opts, firsts, strict=True)]
        return values, [1] * len(opts)

    def _score_generate(
        self, prompt: Prompt, opts: list[str], usage: Usage
    ) -> tuple[list[float], list[int]]:
        text = self._generate_one(
            prompt,
            GenerationParams(max_tokens=max(len(o) for o in opts) + 4, choices=None),
            usage,
            constrain=tuple(opts) if self._can_constrain(prompt) else None,
        ).text
        hit = _match_choice(text, opts, prefix=True)
        if hit is None:
            logger.info("generated %r matches no option; all options get the floor", text)
        values = [0.0 if o == hit else FIRST_TOKEN_FLOOR for o in opts]
        return values, [1] * len(opts)

    # ---------------------------------------------------------------- generation

    def _can_constrain(self, *prompts: Prompt) -> bool:
        """Whether the server constrains generation to choices (for ``prompts``: the chat
        endpoint takes vLLM's ``structured_outputs``; llama.cpp's token grammars are for
        completions only)."""
        self._detect()
        if any(isinstance(p, ImagePrompt) for p in prompts):
            return self.server_kind == "vllm"
        return self.server_kind in ("vllm", "llamacpp")

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One completion per prompt (prompts run concurrently).

        With ``params.choices`` the answer is always one of the choices: vLLM constrains with
        ``structured_outputs: {"choice": [...]}``, llama.cpp with a grammar over the choices'
        token ids, and any other server scores the choices with :meth:`score` and returns the
        best one (``token_logprobs`` then holds one value, that choice's summed
        log-probability, and the token counts are in the cumulative ``usage`` only). A
        constrained answer outside the choices raises :class:`ParseError`, so text outside the
        choices is never returned. ``params.regex`` needs vLLM.
        """
        usage = Usage()
        started = time.perf_counter()
        try:
            self._require_images(prompts)
            self._detect()
            if params.regex is not None and self.server_kind != "vllm":
                raise BackendError(
                    f"regex-constrained generation needs a vLLM server (this is {self.server_kind})"
                )
            if params.choices is not None and not self._can_constrain(*prompts):
                return self._generate_by_scoring(prompts, params, usage)
            return self._map(
                lambda p: self._generate_one(p, params, usage, constrain=params.choices),
                list(prompts),
            )
        finally:
            self._finish(usage, started)

    def _generate_by_scoring(
        self, prompts: Sequence[Prompt], params: GenerationParams, usage: Usage
    ) -> list[Generation]:
        assert params.choices is not None
        choices = list(params.choices)
        if not choices:
            raise ConfigError("choices must not be empty")
        logprobs, _, _ = self._score_into(list(prompts), [choices] * len(prompts), usage)
        out = []
        for i in range(len(prompts)):
            j = int(np.argmax(logprobs[i]))
            out.append(
                Generation(
                    text=choices[j],
                    token_logprobs=(float(logprobs[i, j]),),
                    prompt_tokens=0,
                    completion_tokens=0,
                )
            )
        return out

    def _generate_one(
        self,
        prompt: Prompt,
        params: GenerationParams,
        usage: Usage,
        *,
        constrain: Sequence[str] | None,
    ) -> Generation:
        if isinstance(prompt, ImagePrompt):
            return self._generate_chat(prompt, params, usage, constrain=constrain)
        body: dict[str, Any] = {
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.logprobs:
            body["logprobs"] = params.logprobs
        if constrain is not None:
            if self.server_kind == "vllm":
                body["structured_outputs"] = {
                    **dict(self.extra_body.get("structured_outputs") or {}),
                    "choice": list(constrain),
                }
            else:
                # llama.cpp: the choices' own tokenisations as a token-id grammar.
                ids = [self._option_ids(c, usage) for c in constrain]
                body["grammar"] = token_grammar(ids)
                body["max_tokens"] = max(len(x) for x in ids)
        elif params.regex is not None:
            body["structured_outputs"] = {
                **dict(self.extra_body.get("structured_outputs") or {}),
                "regex": params.regex,
            }
        resp = self._completion(body, usage)
        choice = resp["choices"][0]
        text = str(choice.get("text") or "")
        if constrain is not None:
            hit = _match_choice(text, list(constrain))
            if hit is None:
                raise ParseError(
                    f"constrained generation returned {text!r}, not one of the choices"
                )
            text = hit
        lp = choice.get("logprobs") or {}
        token_lps = tuple(float(v) for v in (lp.get("token_logprobs") or []) if v is not None)
        tokens = resp.get("usage") or {}
        return Generation(
            text=text,
            token_logprobs=token_lps,
            prompt_tokens=int(tokens.get("prompt_tokens") or 0),
            completion_tokens=int(tokens.get("completion_tokens") or 0),
        )

    def _generate_chat(
        self,
        prompt: ImagePrompt,
        params: GenerationParams,
        usage: Usage,
        *,
        constrain: Sequence[str] | None,
    ) -> Generation:
        """One chat completion for an image prompt (constraints through vLLM only)."""
        body: dict[str, Any] = {
            **chat_body(prompt, self.server_kind),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if params.logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = params.logprobs
        wanted = {"choice": list(constrain)} if constrain is not None else {}
        if params.regex is not None and constrain is None:
            wanted = {"regex": params.regex}
        if wanted:
            body["structured_outputs"] = {
                **dict(self.extra_body.get("structured_outputs") or {}),
                **wanted,
            }
        gen = chat_generation(self._chat(body, usage))
        if constrain is not None:
            hit = _match_choice(gen.text, list(constrain))
            if hit is None:
                raise ParseError(
                    f"constrained generation returned {gen.text!r}, not one of the choices"
                )
            gen = Generation(hit, gen.token_logprobs, gen.prompt_tokens, gen.completion_tokens)
        return gen

    def close(self) -> None:
        """Shut the thread pool down (the backend can still be used; a new pool starts)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)


def _match_choice(text: str, choices: Sequence[str], *, prefix: bool = False) -> str | None:
    """The choice ``text`` is (after stripping whitespace), or, with ``prefix``, starts with."""
    if text in choices:
        return text
    stripped = text.strip()
    for c in choices:
        if stripped == c.strip():
            return c
    if prefix:
        best = None
        for c in choices:
            cs = c.strip()
            if cs and stripped.startswith(cs) and (best is None or len(cs) > len(best.strip())):
                best = c
        return best
    return None
