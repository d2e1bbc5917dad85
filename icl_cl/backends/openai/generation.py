"""Generation on an OpenAI-compatible server: completions for text prompts, chat completions
for image prompts, each optionally constrained to a list of choices or a regex.

Constraints: vLLM takes ``structured_outputs: {"choice": [...]}`` (or ``{"regex": ...}``);
llama.cpp a GBNF grammar over the choices' own token ids (completions only). An answer outside
the choices raises :class:`~icl_cl.errors.ParseError`, so text outside them is never returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from icl_cl.backends.base import Generation, GenerationParams, ImagePrompt, Prompt, Usage
from icl_cl.backends.openai.chat import chat_body, chat_generation
from icl_cl.backends.openai.dialect import Dialect
from icl_cl.backends.openai.grammar import token_grammar
from icl_cl.backends.openai.models import ChatRequest, CompletionRequest, CompletionResponse, read
from icl_cl.backends.openai.tokens import Tokens
from icl_cl.backends.openai.transport import Transport
from icl_cl.errors import ParseError


def match_choice(text: str, choices: Sequence[str], *, prefix: bool = False) -> str | None:
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


def _the_choice(text: str, choices: Sequence[str]) -> str:
    """The choice a constrained answer is; a :class:`ParseError` when it is none of them."""
    hit = match_choice(text, list(choices))
    if hit is None:
        raise ParseError(f"constrained generation returned {text!r}, not one of the choices")
    return hit


class Generator:
    """One completion per call, built for the server's dialect.

    Args:
        transport: The connection to the server.
        dialect: What the server is (decides how a constraint is sent).
        tokens: Token ids of choices (llama.cpp's grammars).
    """

    def __init__(self, transport: Transport, dialect: Dialect, tokens: Tokens) -> None:
        self.transport = transport
        self.dialect = dialect
        self.tokens = tokens

    def one(
        self,
        prompt: Prompt,
        params: GenerationParams,
        usage: Usage,
        *,
        constrain: Sequence[str] | None,
    ) -> Generation:
        """Generate for ``prompt``; with ``constrain``, the answer is one of those strings (the
        server must be able to constrain: see :meth:`Dialect.can_constrain`)."""
        if isinstance(prompt, ImagePrompt):
            return self._chat(prompt, params, usage, constrain=constrain)
        request = self._completion_request(prompt, params, usage, constrain)
        raw = self.transport.completion(request.body(), usage)
        response = read(CompletionResponse, raw, "completion")
        choice = response.choices[0]
        text = choice.text or ""
        if constrain is not None:
            text = _the_choice(text, constrain)
        values = (choice.logprobs.token_logprobs if choice.logprobs is not None else None) or []
        tokens = response.usage
        return Generation(
            text=text,
            token_logprobs=tuple(v for v in values if v is not None),
            prompt_tokens=(tokens.prompt_tokens if tokens is not None else None) or 0,
            completion_tokens=(tokens.completion_tokens if tokens is not None else None) or 0,
        )

    def _completion_request(
        self,
        prompt: str,
        params: GenerationParams,
        usage: Usage,
        constrain: Sequence[str] | None,
    ) -> CompletionRequest:
        request = CompletionRequest(
            prompt=prompt,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            stop=list(params.stop) if params.stop else None,
            logprobs=params.logprobs or None,
        )
        if constrain is not None and self.dialect.kind != "vllm":
            # llama.cpp: the choices' own tokenisations as a token-id grammar.
            ids = [self.tokens.option_ids(c, usage) for c in constrain]
            request.grammar = token_grammar(ids)
            request.max_tokens = max(len(x) for x in ids)
        elif constrain is not None:
            request.structured_outputs = self._structured({"choice": list(constrain)})
        elif params.regex is not None:
            request.structured_outputs = self._structured({"regex": params.regex})
        return request

    def _structured(self, wanted: dict[str, Any]) -> dict[str, Any]:
        """vLLM's ``structured_outputs``: ``wanted`` over any given in ``extra_body``."""
        return {**dict(self.transport.extra_body.get("structured_outputs") or {}), **wanted}

    def _chat(
        self,
        prompt: ImagePrompt,
        params: GenerationParams,
        usage: Usage,
        *,
        constrain: Sequence[str] | None,
    ) -> Generation:
        """One chat completion for an image prompt (constraints through vLLM only)."""
        wanted: dict[str, Any] = {"choice": list(constrain)} if constrain is not None else {}
        if params.regex is not None and constrain is None:
            wanted = {"regex": params.regex}
        request = ChatRequest(
            **chat_body(prompt, self.dialect.kind),
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            stop=list(params.stop) if params.stop else None,
            logprobs=True if params.logprobs else None,
            top_logprobs=params.logprobs or None,
            structured_outputs=self._structured(wanted) if wanted else None,
        )
        gen = chat_generation(self.transport.chat(request.body(), usage))
        if constrain is not None:
            hit = _the_choice(gen.text, constrain)
            gen = Generation(hit, gen.token_logprobs, gen.prompt_tokens, gen.completion_tokens)
        return gen
