"""The OpenAI-compatible HTTP backend.

Three layers: response parsing on hand-written JSON; retry and error mapping against a tiny
local HTTP server that injects faults (the only fake here: it stands for the network); and the
real thing, llama.cpp's ``python -m llama_cpp.server`` on SmolLM2-135M, compared with the
in-process transformers backend.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icl_cl.backends.base import (
    Capabilities,
    Generation,
    GenerationParams,
    LLMBackend,
    OptionScores,
)
from icl_cl.backends.openai import OpenAICompatBackend
from icl_cl.backends.openai.echo import echo_is_plausible, option_span, parse_echo_choice
from icl_cl.backends.openai.grammar import choice_grammar, gbnf_literal
from icl_cl.backends.openai.scoring import FIRST_TOKEN_FLOOR, first_token_logprob
from icl_cl.backends.openai.transport import (
    looks_like_context_error as _looks_like_context_error,
)
from icl_cl.errors import (
    BackendError,
    BackendTimeoutError,
    ConfigError,
    ContextLengthError,
    ParseError,
    RateLimitError,
)
from tests.llama_server import served_smollm2

ROOT = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------------------------
# Parsing of echo responses (pure logic)
# --------------------------------------------------------------------------------------------


def test_parse_openai_style_echo() -> None:
    prompt, option = "Answer:", " cat"
    # The echoed text, then one generated token (" and") that must be left out.
    choice = {
        "text": "Answer: cat and",
        "logprobs": {
            "tokens": ["Answer", ":", " cat", " and"],
            "token_logprobs": [None, -1.5, -0.25, -3.0],
            "text_offset": [0, 6, 7, 11],
            "top_logprobs": [None, {":": -1.5}, {" cat": -0.25}, {" and": -3.0}],
        },
    }
    assert parse_echo_choice(choice, prompt, option) == (-0.25, 1)


def test_parse_echo_multi_token_option_and_straddling_token() -> None:
    prompt, option = "x =", "= 12"
    # "==" straddles the boundary: it carries option text, so it counts for the option.
    choice = {
        "logprobs": {
            "tokens": ["x", " ==", " 1", "2"],
            "token_logprobs": [None, -2.0, -0.5, -0.25],
            "text_offset": [0, 1, 4, 6],
        }
    }
    total, n = parse_echo_choice(choice, prompt, option)
    assert (total, n) == (-2.75, 3)


def test_parse_echo_without_text_offset_uses_token_lengths() -> None:
    choice = {
        "logprobs": {
            "tokens": ["Q", ":", " yes", "<eos>"],
            "token_logprobs": [None, -1.0, -0.5, -0.1],
        }
    }
    # "<eos>" starts at len("Q: yes"): generated, not part of the option.
    assert parse_echo_choice(choice, "Q:", " yes") == (-0.5, 1)


def test_parse_vllm_prompt_logprobs_style() -> None:
    # vLLM: first entry null, then {token_id: {logprob, rank, decoded_token}} with the prompt
    # token first and the top alternative after it.
    choice = {
        "text": "",
        "logprobs": None,
        "prompt_logprobs": [
            None,
            {"25": {"logprob": -2.0, "rank": 3, "decoded_token": ":"}},
            {
                "7891": {"logprob": -0.7, "rank": 2, "decoded_token": " noun"},
                "13": {"logprob": -0.5, "rank": 1, "decoded_token": " verb"},
            },
            {"13": {"logprob": -0.1, "rank": 1, "decoded_token": ".animal"}},
        ],
    }
    total, n = parse_echo_choice(choice, "Answer:", " noun.animal")
    assert n == 2
    assert total == pytest.approx(-0.8)


def test_parse_echo_errors() -> None:
    with pytest.raises(ParseError):
        parse_echo_choice({"text": "x"}, "a", "b")
    # The option is the very first token: it has no log-probability.
    with pytest.raises(ParseError):
        parse_echo_choice(
            {"logprobs": {"tokens": ["b"], "token_logprobs": [None], "text_offset": [0]}}, "", "b"
        )
    with pytest.raises(ParseError):
        parse_echo_choice(
            {"logprobs": {"tokens": ["a", "b"], "token_logprobs": [None], "text_offset": [0, 1]}},
            "a",
            "b",
        )


def test_option_span_stops_at_generated_tokens() -> None:
    assert option_span(["ab", "c", "d", "e"], [0, 2, 3, 4], prompt_len=2, full_len=4) == [1, 2]


def test_first_token_logprob() -> None:
    top = {" noun": -0.5, " n": -4.0, " verb": -1.0}
    assert first_token_logprob(top, " noun.animal") == -0.5  # longest matching prefix
    assert first_token_logprob(top, " verb.motion") == -1.0
    assert first_token_logprob(top, " adj.all") == FIRST_TOKEN_FLOOR
    assert first_token_logprob(top, " noun.animal", first_token=" n") == -4.0
    assert first_token_logprob(None, " x") == FIRST_TOKEN_FLOOR


def _echo_probe(shifted: bool) -> dict[str, Any]:
    text = "1, 2, 3, 4, 5"
    tokens = ["1", ",", " 2", ",", " 3", ",", " 4", ",", " 5"]
    offsets = [0, 1, 2, 4, 5, 7, 8, 10, 11]
    good = [None, -0.1, -0.2, -0.05, -0.1, -0.05, -0.1, -0.05, -0.1]
    tops = [None] + [{t: v} for t, v in zip(tokens[1:], good[1:], strict=True)]
    if shifted:
        # What llama-cpp-python returns without a BOS token: row i belongs to token i + 1.
        good = [None, -9.0, -8.0, -9.5, -7.0, -9.0, -8.0, -9.0, -8.5]
        tops = [None] + [{tokens[i + 1]: -0.1} for i in range(1, len(tokens) - 1)] + [{"x": -1}]
    return {
        "text": text,
        "logprobs": {
            "tokens": tokens,
            "token_logprobs": good,
            "text_offset": offsets,
            "top_logprobs": tops,
        },
    }


def test_echo_plausibility_check() -> None:
    assert echo_is_plausible(_echo_probe(shifted=False), "1, 2, 3, 4, 5")
    assert not echo_is_plausible(_echo_probe(shifted=True), "1, 2, 3, 4, 5")
    positive = _echo_probe(shifted=False)
    positive["logprobs"]["token_logprobs"][3] = 0.5
    assert not echo_is_plausible(positive, "1, 2, 3, 4, 5")
    assert not echo_is_plausible({"logprobs": None}, "1, 2, 3, 4, 5")


def test_gbnf_literal_escapes() -> None:
    assert gbnf_literal('a "b"\\\n') == '"a \\"b\\"\\\\\\n"'
    assert choice_grammar([" yes", " no"]) == 'root ::= " yes" | " no"'


@pytest.mark.parametrize(
    ("message", "is_context"),
    [
        ("This model's maximum context length is 2048 tokens, however you requested 3000", True),
        ("The decoder prompt (length 9000) is longer than the maximum model length of 4096.", True),
        ("request (5000 tokens) exceeds the available context size (4096 tokens)", True),
        ("logprobs must be at most 5", False),
        ("The model `x` does not exist", False),
    ],
)
def test_context_length_messages(message: str, is_context: bool) -> None:
    assert _looks_like_context_error(message) is is_context


def test_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        OpenAICompatBackend(model="m", scoring="magic")
    with pytest.raises(ConfigError):
        OpenAICompatBackend(model="m", server_kind="tgi")
    b = OpenAICompatBackend(model="m", base_url="http://127.0.0.1:1/v1")
    assert isinstance(b, LLMBackend)
    assert b.render_chat([{"role": "user", "content": "hi"}]).startswith("hi")
    b.close()


# --------------------------------------------------------------------------------------------
# Injected network faults: a tiny HTTP server on 127.0.0.1
# --------------------------------------------------------------------------------------------

Responder = Callable[[int, dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]


def _completion(text: str, logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }


@contextmanager
def fake_server(respond: Responder, *, delay: float = 0.0) -> Iterator[tuple[str, list]]:
    """Serve ``respond(n, body) -> (status, json, headers)`` for POST; GET /v1/models is fixed."""
    seen: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
            raw = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._send(200, {"object": "list", "data": [{"id": "m", "owned_by": "test"}]}, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            if delay:
                time.sleep(delay)
            try:
                self._send(*respond(len(seen), body))
            except (BrokenPipeError, ConnectionResetError):
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    finally:
        server.shutdown()
        server.server_close()


def _no_caps() -> Capabilities:
    return Capabilities()


def _backend(url: str, **kw: Any) -> OpenAICompatBackend:
    kw = {"max_retries": 3, "backoff": 0.01, "timeout": 5.0, "server_kind": "openai", **kw}
    return OpenAICompatBackend(model="m", base_url=url, **kw)


def test_rate_limit_is_retried_with_retry_after() -> None:
    def respond(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        if n <= 2:
            return 429, {"error": {"message": "slow down"}}, {"Retry-After": str(n - 1)}
        return 200, _completion(" ok"), {}

    with fake_server(respond) as (url, seen):
        b = _backend(url)
        # Capabilities are fixed in advance so that only generation requests reach the server.
        b._caps = _no_caps()
        started = time.perf_counter()
        [gen] = b.generate(["Say ok:"], GenerationParams(max_tokens=2))
        assert time.perf_counter() - started >= 1.0  # waited as Retry-After asked
        assert isinstance(gen, Generation)
        assert gen.text == " ok" and gen.prompt_tokens == 5 and gen.completion_tokens == 1
        assert len(seen) == 3
        assert b.usage.retries == 2 and b.usage.failures == 2 and b.usage.calls == 1
        b.close()


def test_rate_limit_error_after_max_retries() -> None:
    with fake_server(lambda n, body: (429, {"error": {"message": "quota"}}, {})) as (url, seen):
        b = _backend(url, max_retries=1)
        b._caps = _no_caps()
        with pytest.raises(RateLimitError):
            b.generate(["x"], GenerationParams(max_tokens=1))
        assert len(seen) == 2 and b.usage.retries == 1 and b.usage.failures == 2


def test_server_error_raises_after_max_retries() -> None:
    with fake_server(lambda n, body: (500, {"error": {"message": "boom"}}, {})) as (url, seen):
        b = _backend(url, max_retries=2)
        b._caps = _no_caps()
        with pytest.raises(BackendError, match="boom"):
            b.generate(["x"], GenerationParams(max_tokens=1))
        assert len(seen) == 3
        assert b.usage.failures == 3 and b.usage.retries == 2 and b.usage.calls == 0


def test_timeout_raises_backend_timeout_error() -> None:
    with fake_server(lambda n, body: (200, _completion("late"), {}), delay=1.5) as (url, seen):
        b = _backend(url, timeout=0.3, max_retries=1)
        b._caps = _no_caps()
        started = time.perf_counter()
        with pytest.raises(BackendTimeoutError):
            b.generate(["x"], GenerationParams(max_tokens=1))
        assert time.perf_counter() - started < 5
        assert len(seen) == 2 and b.usage.failures == 2


def test_context_length_error_is_not_retried() -> None:
    message = (
        "This model's maximum context length is 2048 tokens, however you requested 5000 tokens"
    )
    with fake_server(lambda n, body: (400, {"error": {"message": message}}, {})) as (url, seen):
        b = _backend(url)
        b._caps = _no_caps()
        with pytest.raises(ContextLengthError):
            b.generate(["x" * 100], GenerationParams(max_tokens=1))
        assert len(seen) == 1 and b.usage.retries == 0 and b.usage.failures == 1


def test_other_client_errors_are_not_retried() -> None:
    with fake_server(lambda n, body: (404, {"detail": "no such model"}, {})) as (url, seen):
        b = _backend(url)
        b._caps = _no_caps()
        with pytest.raises(BackendError, match="no such model") as info:
            b.generate(["x"], GenerationParams(max_tokens=1))
        assert not isinstance(info.value, (ContextLengthError, RateLimitError))
        assert len(seen) == 1


def test_unreachable_server_is_a_backend_error() -> None:
    from tests.llama_server import free_port  # a port nobody listens on once it is released

    b = _backend(f"http://127.0.0.1:{free_port()}/v1", max_retries=1)
    b._caps = _no_caps()
    with pytest.raises(BackendError, match=r"reach|connection"):
        b.generate(["x"], GenerationParams(max_tokens=1))
    assert b.usage.failures == 2


def test_generate_with_choices_never_leaves_the_choices() -> None:
    """A server that cannot constrain answers freely; the backend scores the choices instead."""
    choices = (" cat", " dog")

    def respond(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        if body.get("max_tokens") == 1 and body.get("logprobs"):
            top = {" dog": -0.2, " cat": -2.0, " banana": -0.1}
            return 200, _completion(" banana", {"tokens": [" banana"], "top_logprobs": [top]}), {}
        return 200, _completion(" banana bread"), {}

    with fake_server(respond) as (url, _seen):
        b = _backend(url, scoring="first_token")
        b._caps = _no_caps()
        gens = b.generate(["Pet:", "Animal:"], GenerationParams(max_tokens=4, choices=choices))
        assert [g.text for g in gens] == [" dog", " dog"]
        assert all(g.text in choices for g in gens)


def test_constrained_server_answer_outside_choices_is_a_parse_error() -> None:
    """vLLM is trusted to constrain; if its answer is not a choice anyway, it is refused."""
    with fake_server(lambda n, body: (200, _completion("banana"), {})) as (url, seen):
        b = _backend(url, server_kind="vllm")
        b._caps = _no_caps()
        with pytest.raises(ParseError):
            b.generate(["x"], GenerationParams(choices=("cat", "dog")))
        assert seen[0]["structured_outputs"] == {"choice": ["cat", "dog"]}


def test_echo_scoring_batches_options_on_list_servers() -> None:
    """OpenAI/vLLM accept a list of prompts: one request scores all options of a prompt."""

    def respond(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        prompts = body["prompt"]
        assert isinstance(prompts, list) and body["echo"] is True
        choices = []
        for i, text in enumerate(prompts):
            head, opt = text[: len("Q:")], text[len("Q:") :]
            lp = -0.5 if opt == " yes" else -2.0
            choices.append(
                {
                    "index": i,
                    "text": text + "!",
                    "logprobs": {
                        "tokens": [head, opt, "!"],
                        "token_logprobs": [None, lp, -1.0],
                        "text_offset": [0, 2, len(text)],
                    },
                }
            )
        # Out of order on purpose: the backend must sort by index.
        return 200, {"choices": choices[::-1], "usage": {"prompt_tokens": 4}}, {}

    with fake_server(respond) as (url, seen):
        b = _backend(url, scoring="echo")
        b._caps = _no_caps()
        out = b.score(["Q:", "Q:"], [[" yes", " no"], [" no", " yes"]])
        assert isinstance(out, OptionScores) and out.method == "echo" and out.exact
        np.testing.assert_allclose(out.logprobs, [[-0.5, -2.0], [-2.0, -0.5]])
        assert out.token_counts.tolist() == [[1, 1], [1, 1]]
        assert len(seen) == 2 and out.usage.calls == 2 and out.usage.prompt_tokens == 8


# --------------------------------------------------------------------------------------------
# The real llama.cpp server
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    yield from served_smollm2()


@pytest.fixture(scope="module")
def llama_backend(llama_url: str) -> Iterator[OpenAICompatBackend]:
    from tests.llama_server import MODEL_ALIAS

    b = OpenAICompatBackend(model=MODEL_ALIAS, base_url=llama_url, timeout=120.0, concurrency=2)
    yield b
    b.close()


def _wordnet_prompts(n: int = 50, k: int = 4) -> tuple[list[str], list[list[str]], list[int]]:
    """``n`` WordNet gloss classification prompts with ``k`` options each (gold among them)."""
    rows = [
        json.loads(line)
        for line in (ROOT / "eval/data/wordnet-sample/test.jsonl").read_text().splitlines()
    ]
    labels = sorted({lab for r in rows for lab in r["labels"]})
    picked = [rows[int(i)] for i in np.linspace(0, len(rows) - 1, n)]
    prompts, options, gold = [], [], []
    for i, row in enumerate(picked):
        g = row["labels"][0]
        others = [lab for lab in labels if lab != g]
        opts = sorted([g, *[others[(i + j) % len(others)] for j in range(k - 1)]])
        prompts.append(f"Which category fits: {row['text']}\nOptions: {', '.join(opts)}\nAnswer:")
        options.append([" " + o for o in opts])
        gold.append(opts.index(g))
    return prompts, options, gold


def test_llamacpp_capabilities_and_echo_observation(llama_backend: OpenAICompatBackend) -> None:
    caps = llama_backend.capabilities
    assert llama_backend.server_kind == "llamacpp"
    assert caps.logprobs and caps.top_logprobs > 0 and caps.constrained_choice
    # llama-cpp-python pairs echoed logits rows with the wrong tokens for a model without BOS
    # (SmolLM2): the probe must reject echo, and auto must take the grammar path.
    assert llama_backend._echo_ok is False
    assert llama_backend.scoring_method() == "grammar"


def test_llamacpp_echo_is_shifted_by_one(llama_url: str) -> None:
    """Documents what echo returns: row i of the logits is given as the value of token i."""
    from tests.llama_server import MODEL_ALIAS

    b = OpenAICompatBackend(model=MODEL_ALIAS, base_url=llama_url, scoring="echo")
    text = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12"
    body = {"prompt": text, "echo": True, "logprobs": 3, "max_tokens": 1, "temperature": 0.0}
    resp = b._completion(body, b.usage)
    lp = resp["choices"][0]["logprobs"]
    tokens, values, tops = lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]
    assert values[0] is None and all(v is None or v <= 0 for v in values)
    # The top alternative at position i is (mostly) token i + 1, not token i.
    shifted = sum(max(t, key=t.get) == tokens[i + 1] for i, t in enumerate(tops[:-1]) if t)
    aligned = sum(max(t, key=t.get) == tokens[i] for i, t in enumerate(tops) if t)
    assert shifted > aligned
    assert not echo_is_plausible(resp["choices"][0], text)
    # With the BOS token in front the server strips it and pairs rows correctly: the probe's
    # check accepts these values (offsets are then relative to the text after the BOS).
    resp = b._completion({**body, "prompt": "<|im_start|>" + text}, b.usage)
    assert echo_is_plausible(resp["choices"][0], text)
    b.close()


def test_llamacpp_grammar_scores_match_in_process_llama(
    llama_backend: OpenAICompatBackend,
) -> None:
    """Forced-generation scores equal the exact sums computed in-process on the same GGUF."""
    from llama_cpp import Llama

    from tests.llama_server import smollm2_gguf

    prompts, options, _ = _wordnet_prompts(n=2)
    out = llama_backend.score(prompts, options)
    assert out.method == "grammar" and out.exact
    llm = Llama(model_path=str(smollm2_gguf()), n_ctx=512, logits_all=True, verbose=False)
    diffs: list[float] = []

    def logprob(row: int, token: int) -> float:
        logits = np.asarray(llm.scores[row], dtype=np.float64)
        top = logits.max()
        return float(logits[token] - top - np.log(np.exp(logits - top).sum()))

    try:
        for i, prompt in enumerate(prompts):
            p_ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
            llm.reset()
            # As the server does it: the prompt in one batch, the option one token at a time.
            # (Token-by-token prompts differ by up to 0.7 nats: llama.cpp's quantised kernels
            # depend on the batch shape.)
            llm.eval(p_ids)
            for j, opt in enumerate(options[i]):
                # Options are tokenised on their own, as the in-process backends do.
                o_ids = llm.tokenize(opt.encode(), add_bos=False, special=False)
                llm.n_tokens = len(p_ids)  # rewind to the end of the prompt
                for t in o_ids[:-1]:
                    llm.eval([t])
                ref = sum(logprob(len(p_ids) - 1 + m, t) for m, t in enumerate(o_ids))
                assert out.token_counts[i, j] == len(o_ids)
                diffs.append(abs(out.logprobs[i, j] - ref))
        assert max(diffs) < 0.15, diffs
    finally:
        llm.close()


@pytest.mark.slow
def test_llamacpp_agrees_with_transformers_backend(llama_backend: OpenAICompatBackend) -> None:
    """The product requirement: same argmax option as the in-process backend on >= 90%."""
    tmod = pytest.importorskip("icl_cl.backends.transformers")
    prompts, options, gold = _wordnet_prompts(n=50)
    http = llama_backend.score(prompts, options)
    local_backend = tmod.TransformersBackend()
    try:
        local = local_backend.score(prompts, options)
    finally:
        local_backend.close()
    a, b = http.logprobs.argmax(1), local.logprobs.argmax(1)
    agreement = float((a == b).mean())
    print(
        f"\nopenai[{http.method}, exact={http.exact}] vs transformers[{local.method}]: "
        f"argmax agreement {agreement:.2%} on {len(prompts)} prompts; "
        f"accuracy {float((a == np.array(gold)).mean()):.2%} vs "
        f"{float((b == np.array(gold)).mean()):.2%}; "
        f"mean |diff| {float(np.abs(http.logprobs - local.logprobs).mean()):.3f} nats; "
        f"{http.usage.calls} calls in {http.usage.seconds:.1f} s"
    )
    assert agreement >= 0.9
    assert (http.token_counts == local.token_counts).mean() >= 0.9


def _sibling(probed: OpenAICompatBackend, **kw: Any) -> OpenAICompatBackend:
    """A backend for the same server that reuses ``probed``'s capability probe (saves seconds)."""
    b = OpenAICompatBackend(model=probed.model, base_url=probed.base_url, **kw)
    b._caps, b._echo_ok, b.server_kind = probed.capabilities, probed._echo_ok, probed.server_kind
    return b


def test_llamacpp_first_token_and_generate_paths(llama_backend: OpenAICompatBackend) -> None:
    prompts, options, _ = _wordnet_prompts(n=2)
    b = _sibling(llama_backend, scoring="first_token")
    out = b.score(prompts, options)
    assert out.method == "first_token" and not out.exact
    assert np.all(out.logprobs <= 0) and np.all(out.token_counts == 1)
    # Options sharing a first token (" noun...") tie on this path.
    for i, opts in enumerate(options):
        firsts = [o.split(".")[0] for o in opts]
        for j in range(len(opts)):
            for m in range(len(opts)):
                if firsts[j] == firsts[m]:
                    assert out.logprobs[i, j] == out.logprobs[i, m]
    b.close()
    g = _sibling(llama_backend, scoring="generate")
    out = g.score(prompts, options)
    assert out.method == "generate"
    assert all(sorted(row)[-2] == FIRST_TOKEN_FLOOR for row in out.logprobs.tolist())
    g.close()


def test_llamacpp_generate(llama_backend: OpenAICompatBackend) -> None:
    prompts, options, _ = _wordnet_prompts(n=2)
    free = llama_backend.generate(
        ["1, 2, 3, 4, 5,", "The capital of France is"], GenerationParams(max_tokens=5, logprobs=1)
    )
    assert len(free) == 2
    assert all(g.completion_tokens >= 1 and g.prompt_tokens >= 5 for g in free)
    assert all(len(g.token_logprobs) == g.completion_tokens for g in free)
    assert all(math.isfinite(v) and v <= 0 for g in free for v in g.token_logprobs)
    for prompt, opts in zip(prompts, options, strict=True):
        [g] = llama_backend.generate([prompt], GenerationParams(max_tokens=2, choices=tuple(opts)))
        assert g.text in opts
    stopped = llama_backend.generate(["1, 2, 3, 4,"], GenerationParams(max_tokens=20, stop=(",",)))
    assert "," not in stopped[0].text


def test_llamacpp_tokens_and_context_errors(llama_backend: OpenAICompatBackend) -> None:
    n = llama_backend.count_tokens("Which category fits: a cat")
    assert 3 <= n <= 10 and llama_backend._server_tokenize is True
    with pytest.raises(ContextLengthError):
        llama_backend.generate(["word " * 3000], GenerationParams(max_tokens=1))
    assert llama_backend.usage.calls > 0 and llama_backend.usage.prompt_tokens > 0


def test_local_tokenizer_for_chat_and_counts() -> None:
    """With ``tokenizer`` (here the GGUF's own), chat uses the model's template, offline."""
    pytest.importorskip("transformers")
    from icl_cl.backends.packaged import packaged_gguf

    try:
        directory, file = packaged_gguf()
    except ConfigError as e:
        pytest.skip(str(e))
    b = OpenAICompatBackend(
        model="m", base_url="http://127.0.0.1:9/v1", tokenizer=str(directory), gguf_file=file
    )
    text = b.render_chat([{"role": "user", "content": "Which category fits: a cat"}])
    assert "<|im_start|>user\nWhich category fits: a cat<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert b.count_tokens("Which category fits: a cat") == 6  # as llama.cpp counts it
    b.close()


def test_registered_as_openai() -> None:
    from icl_cl.backends.registry import create_backend

    b = create_backend("openai", model="m", base_url="http://127.0.0.1:9/v1", max_retries=0)
    assert isinstance(b, OpenAICompatBackend) and b.name == "openai"
    # An unreachable server: conservative capabilities, and score() raises the typed error.
    assert b.capabilities.prompt_logprobs is False
    with pytest.raises(BackendError):
        b.score(["p"], [[" a", " b"]])
    b.close()
