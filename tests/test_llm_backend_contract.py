"""One suite, every LLM backend: the :class:`~icl_cl.backends.base.LLMBackend` contract run
against each implementation that works offline, all on the packaged SmolLM2-135M-Instruct.

The implementations: the in-process transformers backend, the call cache in front of it, and
the OpenAI-compatible HTTP backend talking to a real llama.cpp server (skipped, as in
``test_backend_openai.py``, without llama-cpp-python). vLLM needs a GPU and is not here.

The contract: ``capabilities`` is a :class:`Capabilities`; ``score`` gives one finite
log-probability (at most 0) and one token count per option, rows in prompt order and columns in
option order, an option's score not depending on the options beside it, an empty batch gives
an empty result, and a malformed request raises ``ValueError``; ``generate`` gives one
:class:`Generation` per prompt in order, with token counts, within ``max_tokens``, cut before
a stop string, an answer among ``choices``, and a constraint it cannot keep refused with
:class:`BackendError`; ``count_tokens`` counts; ``render_chat`` renders text chats and refuses
images unless ``capabilities.images``; a prompt over the context raises
:class:`ContextLengthError`; ``close`` can be called twice.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from icl_cl.backends.base import (
    Capabilities,
    Generation,
    GenerationParams,
    ImagePrompt,
    LLMBackend,
    OptionScores,
    Usage,
)
from icl_cl.backends.cache import CachedBackend
from icl_cl.backends.transformers import TransformersBackend
from icl_cl.errors import BackendError, ContextLengthError, DataError
from tests.llama_server import served_smollm2

# Prompts whose answers the model is sure of (-0.3 against -17 nats), so a row or column out of
# place cannot pass for rounding.
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]
OPTIONS = [[" Paris", " banana"], [" 5", " cat"]]
# Scores move a little with the rows a prompt is padded with (in process) or with the prefix a
# server has cached: order, not bits.
TOLERANCE = 0.01
# The llama.cpp server's context window (its capabilities do not report one).
LLAMA_CONTEXT = 2048


@dataclass(frozen=True)
class Implementation:
    """How to build one backend afresh (from resources the module loads once), and its context
    window where ``capabilities.max_context`` does not say."""

    build: Callable[[pytest.FixtureRequest, Path], LLMBackend]
    context: int | None = None


@pytest.fixture(scope="module")
def smollm() -> TransformersBackend:
    """SmolLM2-135M-Instruct from its package, loaded once; the backends below share its model."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return TransformersBackend()


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    yield from served_smollm2(LLAMA_CONTEXT)


def _transformers(request: pytest.FixtureRequest, tmp: Path) -> LLMBackend:
    shared: TransformersBackend = request.getfixturevalue("smollm")
    return TransformersBackend(shared.model, lm=shared._lm, tokenizer=shared._tok)


def _cached(request: pytest.FixtureRequest, tmp: Path) -> LLMBackend:
    return CachedBackend(_transformers(request, tmp), tmp / "calls.sqlite")


def _llama_cpp(request: pytest.FixtureRequest, tmp: Path) -> LLMBackend:
    from icl_cl.backends.openai import OpenAICompatBackend
    from tests.llama_server import MODEL_ALIAS

    url = request.getfixturevalue("llama_url")
    return OpenAICompatBackend(model=MODEL_ALIAS, base_url=url, timeout=120.0, concurrency=2)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "transformers": Implementation(_transformers),
    "cached": Implementation(_cached),
    "openai-llama.cpp": Implementation(_llama_cpp, context=LLAMA_CONTEXT),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS), scope="module")
def spec(request: pytest.FixtureRequest) -> Implementation:
    return IMPLEMENTATIONS[request.param]


@pytest.fixture(scope="module")
def backend(
    spec: Implementation,
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LLMBackend]:
    built = spec.build(request, tmp_path_factory.mktemp("backend"))
    yield built
    built.close()


def _png() -> ImagePrompt:
    pytest.importorskip("PIL")
    from PIL import Image as PILImage

    from icl_cl.images import Image

    buffer = io.BytesIO()
    PILImage.new("RGB", (16, 16), (200, 30, 30)).save(buffer, format="PNG")
    return ImagePrompt("<image> What colour is this?", (Image.from_bytes(buffer.getvalue()),))


# ---- what it is ------------------------------------------------------------------------------


def test_it_is_an_llm_backend(backend: LLMBackend) -> None:
    assert isinstance(backend, LLMBackend)
    assert isinstance(backend.name, str) and backend.name
    assert isinstance(backend.model, str) and backend.model
    caps = backend.capabilities
    assert isinstance(caps, Capabilities)
    flags = ("logprobs", "prompt_logprobs", "constrained_choice", "constrained_regex", "images")
    assert all(isinstance(getattr(caps, flag), bool) for flag in flags)
    assert isinstance(caps.top_logprobs, int) and caps.top_logprobs >= 0
    assert caps.max_context is None or (isinstance(caps.max_context, int) and caps.max_context > 0)


# ---- score -----------------------------------------------------------------------------------


def test_score_gives_one_finite_log_probability_per_option(backend: LLMBackend) -> None:
    out = backend.score(PROMPTS, OPTIONS)
    assert isinstance(out, OptionScores) and isinstance(out.usage, Usage)
    assert out.logprobs.shape == out.token_counts.shape == (2, 2)
    assert np.issubdtype(out.logprobs.dtype, np.floating)
    assert np.issubdtype(out.token_counts.dtype, np.integer)
    assert np.all(np.isfinite(out.logprobs)) and np.all(out.logprobs <= 1e-6)
    assert np.all(out.token_counts >= 1)
    assert isinstance(out.exact, bool) and isinstance(out.method, str) and out.method
    if backend.capabilities.prompt_logprobs:
        assert out.exact
    assert out.cached is None or out.cached.shape == (2,)
    # The answer the model is sure of wins in each row: the scores are the rows' own.
    assert np.all(out.logprobs[:, 0] > out.logprobs[:, 1])


def test_scores_follow_the_order_of_prompts_and_options(backend: LLMBackend) -> None:
    out = backend.score(PROMPTS, OPTIONS).logprobs
    turned = backend.score(PROMPTS[::-1], [o[::-1] for o in OPTIONS[::-1]])
    np.testing.assert_allclose(turned.logprobs[::-1, ::-1], out, atol=TOLERANCE)
    alone = backend.score(PROMPTS[1:], OPTIONS[1:]).logprobs
    np.testing.assert_allclose(alone[0], out[1], atol=TOLERANCE)


def test_an_option_scores_the_same_beside_any_other_options(backend: LLMBackend) -> None:
    """The number of options may change from call to call (never within one), and an option's
    score is its own: not normalised over the options beside it."""
    prompt = PROMPTS[:1]
    one = backend.score(prompt, [[" Paris"]])
    three = backend.score(prompt, [[" London", " Paris", " a city"]])
    assert one.logprobs.shape == (1, 1) and three.logprobs.shape == (1, 3)
    np.testing.assert_allclose(three.logprobs[0, 1], one.logprobs[0, 0], atol=TOLERANCE)
    if three.exact:  # the approximate paths may count one token per option
        assert three.token_counts[0, 2] > three.token_counts[0, 1] == one.token_counts[0, 0]


def test_an_empty_batch_gives_an_empty_result(backend: LLMBackend) -> None:
    out = backend.score([], [])
    assert out.logprobs.shape[0] == 0 and out.token_counts.shape[0] == 0
    assert backend.generate([], GenerationParams(max_tokens=2)) == []


@pytest.mark.parametrize(
    ("prompts", "options"),
    [
        (PROMPTS, [[" a"]]),  # fewer option lists than prompts
        (PROMPTS, [[" a"], [" a", " b"]]),  # different numbers of options in one call
        (PROMPTS[:1], [[]]),  # no options
        (PROMPTS[:1], [[" a", ""]]),  # an empty option
    ],
    ids=["lists", "ragged", "none", "empty"],
)
def test_a_malformed_score_request_is_refused(
    backend: LLMBackend, prompts: list[str], options: list[list[str]]
) -> None:
    with pytest.raises(ValueError):
        backend.score(prompts, options)


# ---- generate --------------------------------------------------------------------------------


def test_generate_gives_one_completion_per_prompt_in_order(backend: LLMBackend) -> None:
    params = GenerationParams(max_tokens=3, logprobs=1)
    gens = backend.generate(PROMPTS, params)
    assert len(gens) == 2 and all(isinstance(g, Generation) for g in gens)
    assert "Paris" in gens[0].text and "5" in gens[1].text
    for prompt, gen in zip(PROMPTS, gens, strict=True):
        assert isinstance(gen.text, str)
        assert 1 <= gen.completion_tokens <= params.max_tokens
        # A server may count a BOS token that count_tokens leaves out.
        assert abs(gen.prompt_tokens - backend.count_tokens(prompt)) <= 1
        if backend.capabilities.logprobs:
            assert len(gen.token_logprobs) == gen.completion_tokens
            assert all(math.isfinite(v) and v <= 1e-6 for v in gen.token_logprobs)
    turned = backend.generate(PROMPTS[::-1], params)
    assert [g.text for g in turned] == [g.text for g in gens[::-1]]


def test_generation_stops_at_max_tokens_and_before_a_stop_string(backend: LLMBackend) -> None:
    [short] = backend.generate(PROMPTS[1:], GenerationParams(max_tokens=1))
    assert short.completion_tokens == 1
    [stopped] = backend.generate(PROMPTS[1:], GenerationParams(max_tokens=20, stop=(",",)))
    assert "5" in stopped.text and "," not in stopped.text
    assert stopped.completion_tokens < 20  # it stopped, not ran to max_tokens and was cut


def test_an_answer_stays_among_the_choices(backend: LLMBackend) -> None:
    choices = (" 5", " Paris")
    gens = backend.generate(PROMPTS, GenerationParams(max_tokens=4, choices=choices))
    assert [g.text for g in gens] == [" Paris", " 5"]


def test_a_regex_is_kept_or_refused(backend: LLMBackend) -> None:
    params = GenerationParams(max_tokens=4, regex="[0-9]+")
    if backend.capabilities.constrained_regex:
        [gen] = backend.generate(PROMPTS[1:], params)
        assert re.fullmatch("[0-9]+", gen.text)
    else:
        with pytest.raises(BackendError):
            backend.generate(PROMPTS[1:], params)


# ---- tokens, chat, context -------------------------------------------------------------------


def test_count_tokens_counts(backend: LLMBackend) -> None:
    one = backend.count_tokens(PROMPTS[0])
    assert isinstance(one, int) and 3 <= one <= 10
    assert backend.count_tokens(PROMPTS[0] * 3) > 2 * one


def test_render_chat_renders_text_and_refuses_unreadable_images(backend: LLMBackend) -> None:
    text = backend.render_chat(
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Which city is the capital of France?"},
        ]
    )
    assert isinstance(text, str) and "Which city is the capital of France?" in text
    prompt = _png()
    image_chat = [{"role": "user", "content": [{"type": "image", "image": prompt.images[0]}]}]
    if backend.capabilities.images:
        assert isinstance(backend.render_chat(image_chat), ImagePrompt)
        return
    with pytest.raises(DataError):
        backend.render_chat(image_chat)
    with pytest.raises(DataError):
        backend.score([prompt], [[" red", " blue"]])


def test_a_prompt_over_the_context_is_refused(backend: LLMBackend, spec: Implementation) -> None:
    context = backend.capabilities.max_context or spec.context
    assert context is not None, "every backend here has a known context window"
    long = "word " * (context + 16)
    assert backend.count_tokens(long) > context
    with pytest.raises(ContextLengthError):
        backend.score([long], [[" a", " b"]])
    with pytest.raises(ContextLengthError):
        backend.generate([long], GenerationParams(max_tokens=1))


# ---- close -----------------------------------------------------------------------------------


def test_close_can_be_called_twice(
    spec: Implementation, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    fresh = spec.build(request, tmp_path)
    assert fresh.close() is None
    assert fresh.close() is None


def test_a_cache_answers_repeats_from_its_file_and_closes_its_backend(
    smollm: TransformersBackend, tmp_path: Path
) -> None:
    inner = TransformersBackend(smollm.model, lm=smollm._lm, tokenizer=smollm._tok)
    cache = CachedBackend(inner, tmp_path / "calls.sqlite")
    first = cache.score(PROMPTS, OPTIONS)
    again = cache.score(PROMPTS, OPTIONS)
    assert first.cached is not None and not first.cached.any() and first.usage.calls > 0
    assert again.cached is not None and again.cached.all()
    assert again.usage.calls == 0 and again.usage.cached_calls == 2
    np.testing.assert_array_equal(again.logprobs, first.logprobs)
    cache.close()
    assert inner._lm is None  # the backend behind it let its model go
