"""Echoed prompt log-probabilities: which echoed tokens are an option's, their sum, and whether
a server's echo can be trusted at all.

A completion request with ``echo: true`` and ``logprobs`` returns the prompt's tokens with their
log-probabilities, in the OpenAI layout (``logprobs.tokens``, ``logprobs.token_logprobs`` and
``logprobs.text_offset``) or in vLLM's (``prompt_logprobs``). Sending ``prompt + option`` and
summing the values of the tokens that carry the option's characters scores the option exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from icl_cl.backends.openai.models import CompletionChoice, CompletionLogprobs, PromptLogprob, read
from icl_cl.errors import ParseError

PROBE_TEXT = "1, 2, 3, 4, 5, 6, 7, 8"
"""A counting sequence: any language model predicts most of it with near certainty, so aligned
echo log-probabilities average close to 0 and shifted ones do not. Short, because
llama-cpp-python sorts the whole vocabulary for every echoed token (about 0.2 s per token on a
small CPU)."""

_PROBE_MIN_MEAN_LOGPROB = -2.0


def offsets_from_tokens(tokens: Sequence[str]) -> list[int]:
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
    parsed = read(CompletionChoice, choice, "echo choice")
    tokens, values, offsets = _echoed(parsed, prompt + option)
    if offsets is None or len(offsets) != len(tokens):
        offsets = offsets_from_tokens(tokens)
    if len(values) != len(tokens):
        raise ParseError(f"{len(values)} log-probabilities for {len(tokens)} echoed tokens")
    span = option_span(tokens, offsets, len(prompt), len(prompt) + len(option))
    if not span:
        raise ParseError(f"no echoed tokens cover the option {option!r}")
    total = 0.0
    for i in span:
        v = values[i]
        if v is None or not math.isfinite(v):
            raise ParseError(
                f"echoed token {tokens[i]!r} of option {option!r} has no log-probability"
            )
        total += v
    return total, len(span)


_Echoed = tuple[list[str], list[float | None], list[int] | None]


def _echoed(choice: CompletionChoice, full: str) -> _Echoed:
    """``(token texts, log-probabilities, character offsets or None)`` of the echoed text."""
    lp = choice.logprobs
    if lp is not None and lp.token_logprobs is not None:
        return _from_logprobs(lp, len(full))
    if choice.prompt_logprobs is not None:
        return _from_prompt_logprobs(choice.prompt_logprobs, full)
    raise ParseError("completion has no echoed log-probabilities (logprobs or prompt_logprobs)")


def _from_logprobs(lp: CompletionLogprobs, full_len: int) -> _Echoed:
    """The OpenAI layout."""
    values = list(lp.token_logprobs or [])
    tokens = list(lp.tokens or [])
    offsets = list(lp.text_offset) if lp.text_offset is not None else None
    if not tokens:
        if offsets is None:
            raise ParseError("echo response has token_logprobs but neither tokens nor text_offset")
        # Token texts from consecutive offsets; the last one runs to the end of the text.
        ends = [*offsets[1:], full_len]
        tokens = ["x" * max(e - s, 0) for s, e in zip(offsets, ends, strict=True)]
    return tokens, values, offsets


def _from_prompt_logprobs(entries: list[dict[str, PromptLogprob] | None], full: str) -> _Echoed:
    """vLLM's layout."""
    tokens: list[str] = []
    values: list[float | None] = []
    for entry in entries:
        if entry is None:
            # vLLM gives the first prompt token no log-probability; its text is unknown.
            tokens.append("")
            values.append(None)
            continue
        first = next(iter(entry.values()))
        tokens.append(first.decoded_token or "")
        values.append(first.logprob)
    if tokens and tokens[0] == "" and values[0] is None:
        # Recover the first token's text: the rest of the echoed text follows it.
        rest = "".join(tokens[1:])
        tokens[0] = full[: max(len(full) - len(rest), 0)]
    return tokens, values, None


def echo_is_plausible(choice: Mapping[str, Any], prompt: str) -> bool:
    """Whether an echo probe of ``prompt`` returned aligned prompt log-probabilities.

    Checks: one finite, non-positive value per echoed prompt token (the first may be null), and
    on the predictable probe text a mean over its second half above
    ``_PROBE_MIN_MEAN_LOGPROB``. Where ``top_logprobs`` are present it also checks that token
    ``i`` is the top alternative at position ``i`` at least as often as token ``i + 1`` is (a
    server that pairs logits rows with the wrong tokens fails this).
    """
    try:
        lp = read(CompletionChoice, choice, "echo probe").logprobs
    except ParseError:
        return False
    if lp is None or lp.token_logprobs is None:
        return False
    values, tokens, offsets = lp.token_logprobs, lp.tokens or [], lp.text_offset
    if not tokens or len(tokens) != len(values):
        return False
    if offsets is None or len(offsets) != len(tokens):
        offsets = offsets_from_tokens(tokens)
    n_prompt = sum(1 for o in offsets if o < len(prompt))
    if n_prompt < 4:
        return False
    return _values_plausible(values[:n_prompt]) and _aligned(lp.top_logprobs, tokens, n_prompt)


def _values_plausible(values: Sequence[float | None]) -> bool:
    """Finite, non-positive values (only the first may be null) whose second half is likely."""
    for i, v in enumerate(values):
        if v is None:
            if i == 0:
                continue
            return False
        if not math.isfinite(v) or v > 1e-4:
            return False
    tail = [v for v in values[len(values) // 2 :] if v is not None]
    return bool(tail) and sum(tail) / len(tail) >= _PROBE_MIN_MEAN_LOGPROB


def _aligned(
    top: list[dict[str, float | None] | None] | None, tokens: Sequence[str], n_prompt: int
) -> bool:
    """Whether the top alternatives agree with the tokens at their own positions at least as
    often as with the next ones (True when the server gave no alternatives)."""
    if top is None or len(top) != len(tokens):
        return True
    aligned = shifted = 0
    for i in range(1, n_prompt - 1):
        alts = {t: v for t, v in (top[i] or {}).items() if v is not None}
        if not alts:
            continue
        best = max(alts.items(), key=lambda kv: kv[1])[0]
        aligned += best == tokens[i]
        shifted += best == tokens[i + 1]
    return shifted <= aligned
