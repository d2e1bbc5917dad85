"""The OpenAI-compatible backend: transport, dialect, tokenisation, scoring and generation put
together behind the :class:`~icl_cl.backends.base.LLMBackend` protocol."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

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
    has_images,
    plain_chat,
)
from icl_cl.backends.openai.chat import message_images
from icl_cl.backends.openai.dialect import Dialect
from icl_cl.backends.openai.generation import Generator
from icl_cl.backends.openai.scoring import EXACT_METHODS, Scorer
from icl_cl.backends.openai.tokens import Tokens
from icl_cl.backends.openai.transport import Transport
from icl_cl.errors import BackendError, ConfigError


class OpenAICompatBackend:
    """An LLM behind an OpenAI-compatible ``/v1/completions`` endpoint (``/v1/chat/completions``
    for prompts with images).

    Capabilities are detected lazily by one probe (see :attr:`capabilities`). All requests are
    retried on rate limits (HTTP 429, honouring ``Retry-After``), timeouts, connection errors
    and 5xx answers with exponential back-off; other 4xx answers fail at once, and a 400 about
    the context length raises :class:`~icl_cl.errors.ContextLengthError`. In ``Usage``,
    ``calls`` counts successful model requests, ``failures`` every failed attempt and
    ``retries`` every repeated one; the cost of each call is in its result and summed in
    :attr:`usage`, failed calls included.

    Args:
        model: Model name sent to the server.
        base_url: Server URL up to and including ``/v1``.
        api_key: Bearer token; ``OPENAI_API_KEY`` from the environment when None.
        timeout: Seconds to wait for one HTTP answer.
        max_retries: Retries after the first attempt; the last error is raised after them.
        backoff: First back-off in seconds, doubled on every retry.
        concurrency: Threads sending requests for several prompts at once.
        tokenizer: Local tokenizer for :meth:`render_chat` and :meth:`count_tokens` (loaded
            lazily, offline): a directory, a cached hub id or a packaged model name.
        gguf_file: GGUF file name inside ``tokenizer`` to read the tokenizer from.
        extra_body: Merged into every request body (vLLM-only parameters go here).
        scoring: ``auto``, ``echo``, ``grammar``, ``first_token`` or ``generate`` (see
            :mod:`icl_cl.backends.openai.scoring`).
        server_kind: ``auto`` (detected from ``/v1/models``), ``vllm``, ``sglang``,
            ``llamacpp`` or ``openai``. Decides list batching and constrained generation.
        top_logprobs: Alternatives asked for on the ``first_token`` path (OpenAI allows 5).
        images: Whether the server's model reads images (servers do not advertise it). When
            False, messages with images are refused with a :class:`~icl_cl.errors.DataError`.
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
        if image_tokens < 0:
            raise ConfigError("image_tokens must be >= 0")
        self.model = model
        self.scoring = scoring
        self.image_tokens = int(image_tokens)
        self._transport = Transport(
            model=model,
            base_url=base_url,
            api_key=api_key if api_key is not None else os.environ.get("OPENAI_API_KEY"),
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            concurrency=concurrency,
            extra_body=extra_body or {},
        )
        self._dialect = Dialect(
            self._transport, kind=server_kind, top_logprobs=top_logprobs, images=images
        )
        self._tokens = Tokens(
            self._transport, self._dialect, tokenizer=tokenizer, gguf_file=gguf_file
        )
        self._generator = Generator(self._transport, self._dialect, self._tokens)
        self._scorer = Scorer(
            self._transport, self._dialect, self._tokens, self._generator, scoring=scoring
        )

    # ---------------------------------------------------------------- state

    @property
    def base_url(self) -> str:
        """Server URL up to and including ``/v1``."""
        return self._transport.base_url

    @property
    def usage(self) -> Usage:
        """Cost of all calls so far; each call's own cost is in its result."""
        return self._transport.usage

    @property
    def images(self) -> bool:
        """Whether the server's model was said to read images."""
        return self._dialect.images

    @property
    def server_kind(self) -> str:
        """``vllm``, ``sglang``, ``llamacpp``, ``openai`` or ``unknown`` once probed."""
        return self._dialect.kind

    @server_kind.setter
    def server_kind(self, kind: str) -> None:
        self._dialect.kind = kind

    # The probe's findings live in the dialect. A backend for the same server may take them
    # over from another one instead of probing again (as the tests do).

    @property
    def _caps(self) -> Capabilities | None:
        return self._dialect.caps

    @_caps.setter
    def _caps(self, caps: Capabilities | None) -> None:
        self._dialect.caps = caps

    @property
    def _echo_ok(self) -> bool | None:
        return self._dialect.echo_ok

    @_echo_ok.setter
    def _echo_ok(self, ok: bool | None) -> None:
        self._dialect.echo_ok = ok

    @property
    def _server_tokenize(self) -> bool | None:
        return self._tokens.server_tokenize

    @_server_tokenize.setter
    def _server_tokenize(self, works: bool | None) -> None:
        self._tokens.server_tokenize = works

    @property
    def capabilities(self) -> Capabilities:
        """What the server supports, probed once on first use (see
        :mod:`icl_cl.backends.openai.dialect`).

        If the server cannot be reached, all-False capabilities are returned (not remembered,
        so the next use probes again); :meth:`score` and :meth:`generate` raise the error.
        """
        return self._dialect.capabilities()

    def scoring_method(self) -> str:
        """The scoring path :meth:`score` takes (resolves ``auto`` with the probe)."""
        return self._dialect.scoring_method(self.scoring)

    # ---------------------------------------------------------------- text

    def render_chat(self, messages: Sequence[Message]) -> Prompt:
        """Chat messages as prompt text, or as an :class:`ImagePrompt` when they hold images.

        Uses the local tokenizer's chat template when ``tokenizer`` is set and has one (ending
        with the assistant header), else :func:`plain_chat`. The server's own template is not
        used: ``/v1/completions`` takes the rendered text. Messages with images are sent to the
        chat endpoint as they are (the server applies its template); their prompt's text is a
        plain layout with an ``<image>`` placeholder per image, for keys and token counts.
        """
        if has_images(messages):
            self._dialect.require_images()
            return ImagePrompt(plain_chat(messages), message_images(messages), tuple(messages))
        tok = self._tokens.local()
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
            self._dialect.require_images()
            text_tokens = self._tokens.count(prompt.text.replace(IMAGE_PLACEHOLDER, ""))
            return text_tokens + self.image_tokens * len(prompt.images)
        return self._tokens.count(prompt)

    # ---------------------------------------------------------------- calls

    def score(self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]]) -> OptionScores:
        """Log-probability of each option as the continuation of its prompt.

        The path follows ``scoring`` (see :mod:`icl_cl.backends.openai.scoring`); ``method``
        and ``exact`` in the result say which one ran (the least exact one when image prompts
        took another path). Prompts are scored concurrently.
        """
        usage = Usage()
        started = time.perf_counter()
        try:
            lp, counts, method = self._scorer.score_into(prompts, options, usage)
        finally:
            self._transport.finish(usage, started)
        return OptionScores(
            logprobs=lp,
            token_counts=counts,
            exact=method in EXACT_METHODS,
            method=method,
            usage=usage,
        )

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> list[Generation]:
        """One completion per prompt (prompts run concurrently).

        With ``params.choices`` the answer is always one of the choices: vLLM constrains with
        ``structured_outputs: {"choice": [...]}``, llama.cpp with a grammar over the choices'
        token ids, and any other server scores the choices with :meth:`score` and returns the
        best one (``token_logprobs`` then holds one value, that choice's summed
        log-probability, and the token counts are in the cumulative ``usage`` only). A
        constrained answer outside the choices raises :class:`~icl_cl.errors.ParseError`, so
        text outside the choices is never returned. ``params.regex`` needs vLLM.
        """
        usage = Usage()
        started = time.perf_counter()
        try:
            self._dialect.require_images(prompts)
            self._dialect.detect()
            if params.regex is not None and self.server_kind != "vllm":
                raise BackendError(
                    f"regex-constrained generation needs a vLLM server (this is {self.server_kind})"
                )
            if params.choices is not None and not self._dialect.can_constrain(*prompts):
                return self._generate_by_scoring(prompts, list(params.choices), usage)
            return self._transport.map(
                lambda p: self._generator.one(p, params, usage, constrain=params.choices),
                list(prompts),
                one_at_a_time=self._dialect.one_at_a_time,
            )
        finally:
            self._transport.finish(usage, started)

    def _generate_by_scoring(
        self, prompts: Sequence[Prompt], choices: list[str], usage: Usage
    ) -> list[Generation]:
        """The best-scored choice per prompt (for servers that cannot constrain generation)."""
        if not choices:
            raise ConfigError("choices must not be empty")
        logprobs, _, _ = self._scorer.score_into(list(prompts), [choices] * len(prompts), usage)
        best = np.argmax(logprobs, axis=1)
        return [
            Generation(text=choices[j], token_logprobs=(float(logprobs[i, j]),))
            for i, j in enumerate(best)
        ]

    def _completion(
        self, body: Mapping[str, Any], usage: Usage, *, retries: int | None = None
    ) -> dict[str, Any]:
        """One raw ``/v1/completions`` request (the tests read servers' answers with it)."""
        return self._transport.completion(body, usage, retries=retries)

    def close(self) -> None:
        """Shut the thread pool down (the backend can still be used; a new pool starts)."""
        self._transport.close()
