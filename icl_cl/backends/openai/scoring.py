"""Scoring options on an OpenAI-compatible server: four strategies, from exact to approximate
(``OptionScores.method`` names the one used).

* ``echo`` (exact): ``/v1/completions`` with ``prompt = prompt + option``, ``echo: true``,
  ``logprobs: 1`` and ``max_tokens: 1``. The echoed prompt tokens come back with their
  log-probabilities; the tokens that overlap the option's characters are summed
  (:mod:`icl_cl.backends.openai.echo`). Servers that accept a list of prompts (vLLM, SGLang,
  OpenAI) get the k options of a prompt in one request.
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
come back, else ``generate`` (see :mod:`icl_cl.backends.openai.dialect` for why llama.cpp's echo
is not used).

Image prompts go to the chat endpoint, which echoes no prompt, so they are scored
approximately: ``first_token`` from the chat response's ``logprobs.content[0].top_logprobs``,
or ``generate`` when ``scoring="generate"`` or the server returns no top log-probabilities.
Where the answer prefix cannot be continued (all servers but vLLM), options are matched without
their leading whitespace.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np

from icl_cl.backends.base import GenerationParams, ImagePrompt, Prompt, Usage, check_options
from icl_cl.backends.openai.chat import chat_body, chat_top_logprobs, continues_answer
from icl_cl.backends.openai.dialect import Dialect
from icl_cl.backends.openai.echo import parse_echo_choice
from icl_cl.backends.openai.generation import Generator, match_choice
from icl_cl.backends.openai.grammar import choice_grammar, token_grammar
from icl_cl.backends.openai.models import (
    ChatRequest,
    CompletionRequest,
    CompletionResponse,
    read,
)
from icl_cl.backends.openai.tokens import Tokens
from icl_cl.backends.openai.transport import ClientError, Transport
from icl_cl.errors import ConfigError, ParseError

logger = logging.getLogger(__name__)

FIRST_TOKEN_FLOOR = -30.0
"""Score of an option whose first token is not among the returned top log-probabilities (and of
the options not generated on the ``generate`` path): far below any real top-20 value."""

SCORING_MODES = ("auto", "echo", "grammar", "first_token", "generate")
# From most to least exact: a call that used several reports the least exact one.
_METHOD_ORDER = SCORING_MODES[1:]
EXACT_METHODS = ("echo", "grammar")

Row = tuple[list[float], list[int]]
"""One prompt's option scores and token counts."""


def first_token_logprob(
    top: Mapping[str, float | None] | None, option: str, first_token: str | None = None
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


class Scorer:
    """Scores options after prompts by the strategy ``scoring`` names (or ``auto``).

    Args:
        transport: The connection to the server.
        dialect: What the server supports.
        tokens: Token ids and first tokens of options.
        generator: Generation, for the ``generate`` strategy.
        scoring: One of :data:`SCORING_MODES`.

    Raises:
        ConfigError: An unknown ``scoring``.
    """

    def __init__(
        self,
        transport: Transport,
        dialect: Dialect,
        tokens: Tokens,
        generator: Generator,
        *,
        scoring: str,
    ) -> None:
        if scoring not in SCORING_MODES:
            raise ConfigError(f"scoring must be one of {', '.join(SCORING_MODES)}, not {scoring!r}")
        self.transport = transport
        self.dialect = dialect
        self.tokens = tokens
        self.generator = generator
        self.scoring = scoring
        self._warned_echo = False

    def score_into(
        self, prompts: Sequence[Prompt], options: Sequence[Sequence[str]], usage: Usage
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Scores, token counts and the method used; the cost goes into ``usage``."""
        k = check_options(prompts, options)
        n = len(prompts)
        lp = np.zeros((n, k), dtype=np.float64)
        counts = np.zeros((n, k), dtype=np.int64)
        if not n:
            return lp, counts, self.scoring if self.scoring != "auto" else "echo"
        self.dialect.require_images(prompts)
        if any(isinstance(p, ImagePrompt) for p in prompts):
            return self._score_with_images(prompts, options, usage, lp, counts)
        self.dialect.detect()  # the server kind decides batching and request details
        method = self.dialect.scoring_method(self.scoring)
        if method == "echo" and self.dialect.echo_ok is False and not self._warned_echo:
            self._warned_echo = True
            logger.warning("scoring='echo' although this server's echo looked wrong (see docs)")
        strategy = {
            "echo": self._echo,
            "grammar": self._grammar,
            "first_token": self._first_token,
            "generate": self._generate,
        }[method]
        rows = self.transport.map(
            lambda i: strategy(prompts[i], list(options[i]), usage),
            range(n),
            one_at_a_time=self.dialect.one_at_a_time,
        )
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
        self.dialect.detect()
        text_rows = [i for i, p in enumerate(prompts) if not isinstance(p, ImagePrompt)]
        methods = set()
        if text_rows:
            sub_lp, sub_counts, method = self.score_into(
                [prompts[i] for i in text_rows], [options[i] for i in text_rows], usage
            )
            lp[text_rows], counts[text_rows] = sub_lp, sub_counts
            methods.add(method)
        image_rows = [i for i, p in enumerate(prompts) if isinstance(p, ImagePrompt)]

        def one(i: int) -> tuple[list[float], list[int], str]:
            prompt = prompts[i]
            assert isinstance(prompt, ImagePrompt)
            return self._score_image(prompt, list(options[i]), usage)

        scored = self.transport.map(one, image_rows, one_at_a_time=self.dialect.one_at_a_time)
        for i, (row_lp, row_n, method) in zip(image_rows, scored, strict=True):
            lp[i], counts[i] = row_lp, row_n
            methods.add(method)
        return lp, counts, max(methods, key=_METHOD_ORDER.index)

    def _score_image(
        self, prompt: ImagePrompt, opts: list[str], usage: Usage
    ) -> tuple[list[float], list[int], str]:
        """``first_token`` from the chat endpoint's top log-probabilities, else ``generate``."""
        if self.scoring != "generate" and self.dialect.chat_logprobs is not False:
            top = self._chat_top_logprobs(prompt, usage)
            if top is not None:
                self.dialect.chat_logprobs = True
                # Without the answer prefix the reply starts afresh: no leading space.
                keys = (
                    opts
                    if continues_answer(prompt, self.dialect.kind)
                    else [o.lstrip() or o for o in opts]
                )
                firsts = self.tokens.first_tokens(keys)
                values = [first_token_logprob(top, o, f) for o, f in zip(keys, firsts, strict=True)]
                return values, [1] * len(opts), "first_token"
            if self.scoring != "auto":
                raise ParseError("chat completion has no top_logprobs for the first token")
            self.dialect.chat_logprobs = False
        values, n = self._generate(prompt, opts, usage)
        return values, n, "generate"

    def _chat_top_logprobs(self, prompt: ImagePrompt, usage: Usage) -> dict[str, float] | None:
        """The first answer token's alternatives from one chat completion (None when the server
        gives none, or, under ``auto``, refuses to)."""
        request = ChatRequest(
            **chat_body(prompt, self.dialect.kind),
            max_tokens=1,
            temperature=0.0,
            logprobs=True,
            top_logprobs=self.dialect.top_logprobs,
        )
        try:
            return chat_top_logprobs(self.transport.chat(request.body(), usage)["choices"][0])
        except ClientError as e:
            if self.scoring != "auto":
                raise
            logger.warning("chat log-probabilities refused (%s); scoring by generation", e)
            return None

    def _echo(self, prompt: Prompt, opts: list[str], usage: Usage) -> Row:
        assert isinstance(prompt, str)
        if self.dialect.takes_prompt_lists:
            # One request for all k options: these servers accept a list of prompts.
            resp = self.transport.completion(_echo_body([prompt + o for o in opts]), usage)
            choices = sorted(resp["choices"], key=lambda c: int(c.get("index", 0)))
            if len(choices) != len(opts):
                raise ParseError(f"{len(choices)} choices for {len(opts)} prompts")
        else:
            choices = [
                self.transport.completion(_echo_body(prompt + o), usage)["choices"][0] for o in opts
            ]
        parsed = [parse_echo_choice(c, prompt, o) for c, o in zip(choices, opts, strict=True)]
        return [p[0] for p in parsed], [p[1] for p in parsed]

    def _grammar(self, prompt: Prompt, opts: list[str], usage: Usage) -> Row:
        assert isinstance(prompt, str)
        # Options one after another: llama.cpp then reuses the evaluated prompt prefix.
        values, counts = [], []
        for o in opts:
            value, count = self._forced(prompt, o, usage)
            values.append(value)
            counts.append(count)
        return values, counts

    def _forced(self, prompt: str, option: str, usage: Usage) -> tuple[float, int]:
        """Summed log-probability and token count of ``option`` generated under a grammar that
        allows only its tokens."""
        ids = self.tokens.option_ids(option, usage)
        request = CompletionRequest(
            prompt=prompt, grammar=token_grammar([ids]), logprobs=1, max_tokens=len(ids)
        )
        raw = self.transport.completion(request.body(), usage)
        lp = read(CompletionResponse, raw, "completion").choices[0].logprobs
        vals = (lp.token_logprobs if lp is not None else None) or []
        if len(vals) != len(ids):
            raise ParseError(
                f"forced generation of option {option!r} returned {len(vals)} log-probabilities "
                f"for {len(ids)} tokens; does the server honour token-id grammars?"
            )
        if any(v is None or not math.isfinite(v) for v in vals):
            raise ParseError(f"missing log-probability in forced option {option!r}")
        return float(sum(v for v in vals if v is not None)), len(ids)

    def _first_token(self, prompt: Prompt, opts: list[str], usage: Usage) -> Row:
        assert isinstance(prompt, str)
        request = CompletionRequest(prompt=prompt, max_tokens=1, logprobs=self.dialect.top_logprobs)
        if self.dialect.kind == "llamacpp":
            # llama.cpp drops the top log-probabilities when the first token is end-of-text;
            # a grammar keeps it from stopping (the values it reports are unconstrained).
            request.grammar = choice_grammar(opts)
        raw = self.transport.completion(request.body(), usage)
        lp = read(CompletionResponse, raw, "completion").choices[0].logprobs
        top = ((lp.top_logprobs if lp is not None else None) or [None])[0]
        if top is None:
            raise ParseError("completion has no top_logprobs for the first token")
        firsts = self.tokens.first_tokens(opts)
        values = [first_token_logprob(top, o, f) for o, f in zip(opts, firsts, strict=True)]
        return values, [1] * len(opts)

    def _generate(self, prompt: Prompt, opts: list[str], usage: Usage) -> Row:
        text = self.generator.one(
            prompt,
            GenerationParams(max_tokens=max(len(o) for o in opts) + 4, choices=None),
            usage,
            constrain=tuple(opts) if self.dialect.can_constrain(prompt) else None,
        ).text
        hit = match_choice(text, opts, prefix=True)
        if hit is None:
            logger.info("generated %r matches no option; all options get the floor", text)
        values = [0.0 if o == hit else FIRST_TOKEN_FLOOR for o in opts]
        return values, [1] * len(opts)


def _echo_body(prompt: str | list[str]) -> dict[str, object]:
    # max_tokens 1, not 0: llama-cpp-python reads 0 as "unlimited".
    return CompletionRequest(prompt=prompt, echo=True, logprobs=1, max_tokens=1).body()
