"""Image prompts in the LLM backends.

transformers: a tiny random LLaVA-class model saved with ``save_pretrained`` and loaded back by
path (tests/tiny_vlm.py); its exact option scoring is checked against one full forward pass per
option, done here with the processor and the model directly. vLLM: request building and the
backend's wiring against a stand-in engine that expands image placeholders as vLLM does (vLLM
needs CUDA). OpenAI-compatible: chat message construction and response parsing as pure
functions, and one injected network fault on the chat route.
"""

from __future__ import annotations

import base64
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from icl_cl.backends.base import (  # noqa: E402
    Capabilities,
    GenerationParams,
    ImagePrompt,
    LLMBackend,
    prompt_key,
)
from icl_cl.backends.cache import CachedBackend  # noqa: E402
from icl_cl.backends.openai import OpenAICompatBackend  # noqa: E402
from icl_cl.backends.openai.chat import (  # noqa: E402
    chat_body,
    chat_generation,
    chat_messages,
    chat_top_logprobs,
)
from icl_cl.backends.transformers import TransformersBackend  # noqa: E402
from icl_cl.backends.vllm import VLLMBackend  # noqa: E402
from icl_cl.backends.vllm_requests import (  # noqa: E402
    build_score_requests,
    encode_prompt,
    engine_prompt,
    resolve_span,
)
from icl_cl.errors import BackendError, DataError  # noqa: E402
from icl_cl.images import Image, load_image  # noqa: E402
from tests.test_backend_openai import fake_server  # noqa: E402
from tests.test_backend_vllm import (  # noqa: E402
    CompletionOutput,
    Logprob,
    RequestOutput,
)
from tests.tiny_models import tiny_backend  # noqa: E402
from tests.tiny_vlm import IMAGE_TOKEN, IMAGE_TOKENS, build_tiny_vlm, smollm2_tokenizer  # noqa: E402

SYSTEM = "You label pictures of everyday things. Answer with one label from the list."


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vlm_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = getattr(request.config, "cache", None)
    # The same cache entry as the vLLM tests' tokenizer: converted from GGUF once.
    tok_cache = Path(cache.mkdir("icl-cl-smollm2-tokenizer")) if cache is not None else None
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), smollm2_tokenizer(tok_cache))


@pytest.fixture(scope="module")
def vlm(vlm_dir: Path) -> TransformersBackend:
    return TransformersBackend(str(vlm_dir), batch_size=3)


@pytest.fixture(scope="module")
def processor(vlm_dir: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(vlm_dir)


def _image(seed: int | None, color: tuple[int, int, int] = (200, 30, 30)) -> Image:
    if seed is None:
        return load_image(PIL.new("RGB", (40, 30), color))
    pixels = np.random.default_rng(seed).integers(0, 256, (36, 36, 3), dtype=np.uint8)
    return load_image(PIL.fromarray(pixels))


RED, NOISE, OTHER = _image(None), _image(1), _image(2)


def _messages(*images: Image, question: str = "What is in this picture?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": question}]
    for n, image in enumerate(images):
        parts += [{"type": "text", "text": f" Picture {n + 1}:"}, {"type": "image", "image": image}]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": parts}]


def brute_force(processor: Any, backend: TransformersBackend, prompts, options) -> np.ndarray:
    """One full forward pass per (prompt, option), inputs built by the processor directly."""
    out = np.zeros((len(prompts), len(options[0])))
    with torch.inference_mode():
        for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
            if isinstance(prompt, ImagePrompt):
                pils = [[image.pil() for image in prompt.images]]
                inputs = processor(text=[prompt.text], images=pils, return_tensors="pt")
            else:
                inputs = processor.tokenizer([prompt], return_tensors="pt")
            p_ids = inputs["input_ids"][0].tolist()
            extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            for j, option in enumerate(opts):
                o_ids = processor.tokenizer(option, add_special_tokens=False).input_ids
                ids = torch.tensor([p_ids + o_ids])
                logits = backend._lm(input_ids=ids, **extra).logits[0].float()
                logp = torch.log_softmax(logits, -1)
                out[i, j] = sum(float(logp[len(p_ids) - 1 + t, o]) for t, o in enumerate(o_ids))
    return out


# ---- transformers -----------------------------------------------------------------------------


def test_vision_language_model_loads_by_path_and_reads_images(vlm: TransformersBackend) -> None:
    assert isinstance(vlm, LLMBackend)
    caps = vlm.capabilities
    assert caps.images and caps.prompt_logprobs and caps.max_context == 512
    assert not tiny_backend().capabilities.images


def test_render_chat_places_images_in_order(vlm: TransformersBackend) -> None:
    prompt = vlm.render_chat(_messages(RED, NOISE))
    assert isinstance(prompt, ImagePrompt)
    assert prompt.images == (RED, NOISE) and prompt.messages == tuple(_messages(RED, NOISE))
    assert prompt.text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nWhat is in this picture?"
        f" Picture 1:{IMAGE_TOKEN} Picture 2:{IMAGE_TOKEN}<|im_end|>\n<|im_start|>assistant\n"
    )
    swapped = vlm.render_chat(_messages(NOISE, RED))
    assert swapped.text == prompt.text and swapped.images == (NOISE, RED)
    assert prompt.key != swapped.key
    # The answer prefix goes on the text and is kept apart for chat servers.
    answer = prompt + "Answer:"
    assert answer.text.endswith("assistant\nAnswer:") and answer.suffix == "Answer:"
    # Text-only chats on a vision-language model use the same (processor) template.
    text = vlm.render_chat([{"role": "user", "content": "hello"}])
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"


def test_count_tokens_includes_image_tokens(vlm: TransformersBackend, processor: Any) -> None:
    prompt = vlm.render_chat(_messages(RED, NOISE))
    placeholders = prompt.text.count(IMAGE_TOKEN)
    assert placeholders == 2
    # The text alone counts each placeholder as one token; the processor makes it IMAGE_TOKENS.
    expected = vlm.count_tokens(prompt.text) + placeholders * (IMAGE_TOKENS - 1)
    assert vlm.count_tokens(prompt) == expected
    ids = processor(text=[prompt.text], images=[[RED.pil(), NOISE.pil()]])["input_ids"][0]
    assert vlm.count_tokens(prompt) == len(ids)
    assert list(ids).count(processor.image_token_id) == 2 * IMAGE_TOKENS


OPTIONS = ["cat", "dog", " a red car", " a red bus", "the small cat"]


def test_image_scoring_is_exact(vlm: TransformersBackend, processor: Any) -> None:
    prompts = [
        vlm.render_chat(_messages(RED)) + "Answer:",
        vlm.render_chat(_messages(NOISE)) + "Answer:",
        "The picture shows",  # a text prompt in the same batch
        vlm.render_chat(_messages(OTHER, RED, question="Which differs?")),
    ]
    options = [OPTIONS] * len(prompts)
    got = vlm.score(prompts, options)
    np.testing.assert_allclose(
        got.logprobs, brute_force(processor, vlm, prompts, options), atol=1e-4
    )
    assert got.exact and got.method == "kv_cache"
    counts = [len(processor.tokenizer(o, add_special_tokens=False).input_ids) for o in OPTIONS]
    assert got.token_counts.tolist() == [counts] * len(prompts)

    # One image prompt: one prefill with its pixels, then all options from its cache.
    one = vlm.score(prompts[:1], options[:1])
    assert one.usage.calls == 2
    np.testing.assert_allclose(one.logprobs, got.logprobs[:1], atol=1e-4)
    one_by_one = TransformersBackend(vlm.model, lm=vlm._lm, processor=processor, batch_size=1)
    np.testing.assert_allclose(one_by_one.score(prompts, options).logprobs, got.logprobs, atol=1e-4)


def test_different_images_give_different_scores(vlm: TransformersBackend) -> None:
    red = vlm.render_chat(_messages(RED)) + "Answer:"
    noise = vlm.render_chat(_messages(NOISE)) + "Answer:"
    assert red.text == noise.text
    scores = vlm.score([red, noise], [OPTIONS] * 2).logprobs
    assert np.abs(scores[0] - scores[1]).max() > 1e-2


def test_generate_reads_the_image(vlm: TransformersBackend, processor: Any) -> None:
    prompts = [vlm.render_chat(_messages(RED)), vlm.render_chat(_messages(NOISE))]
    gens = vlm.generate(prompts, GenerationParams(max_tokens=1))
    with torch.inference_mode():
        for prompt, gen in zip(prompts, gens, strict=True):
            images = [[prompt.images[0].pil()]]
            inputs = processor(text=[prompt.text], images=images, return_tensors="pt")
            logits = vlm._lm(**inputs).logits[0, -1].float()
            best = int(logits.argmax())
            assert gen.text == processor.tokenizer.decode([best], skip_special_tokens=True)
            expected = float(torch.log_softmax(logits, -1)[best])
            assert gen.token_logprobs == pytest.approx((expected,), abs=1e-4)
            assert gen.prompt_tokens == vlm.count_tokens(prompt) and gen.completion_tokens == 1
    longer = vlm.generate(prompts[:1], GenerationParams(max_tokens=3))[0]
    assert longer.completion_tokens == 3 and len(longer.token_logprobs) == 3

    choices = ("cat", "dog", " a red car")
    chosen = vlm.generate(prompts, GenerationParams(choices=choices))
    best = vlm.score(prompts, [list(choices)] * 2).logprobs.argmax(1)
    assert [g.text for g in chosen] == [choices[j] for j in best]


def test_text_only_backend_refuses_images() -> None:
    text_only = tiny_backend()
    with pytest.raises(DataError, match="text-only and cannot read images"):
        text_only.render_chat(_messages(RED))
    prompt = ImagePrompt("the cat sat on the mat", (RED,))
    with pytest.raises(DataError, match="text-only"):
        text_only.score([prompt], [["noun"]])
    with pytest.raises(DataError, match="text-only"):
        text_only.generate([prompt], GenerationParams(max_tokens=1))
    with pytest.raises(DataError, match="text-only"):
        text_only.count_tokens(prompt)


def test_image_parts_must_be_images(vlm: TransformersBackend) -> None:
    bad = [{"role": "user", "content": [{"type": "image", "image": "cat.png"}]}]
    with pytest.raises(DataError, match="load_image"):
        vlm.render_chat(bad)


def test_cache_keys_tell_images_apart(vlm: TransformersBackend, tmp_path: Path) -> None:
    red = vlm.render_chat(_messages(RED)) + "Answer:"
    noise = vlm.render_chat(_messages(NOISE)) + "Answer:"
    assert red.text == noise.text and prompt_key(red) != prompt_key(noise)
    cached = CachedBackend(vlm, tmp_path / "calls.sqlite")
    first = cached.score([red], [OPTIONS])
    other = cached.score([noise], [OPTIONS])
    assert other.cached.tolist() == [False]  # same text, other image: a new call
    assert not np.allclose(first.logprobs, other.logprobs)
    again = cached.score([red, noise], [OPTIONS] * 2)
    assert again.cached.tolist() == [True, True] and again.usage.calls == 0
    np.testing.assert_array_equal(again.logprobs, np.vstack([first.logprobs, other.logprobs]))
    params = GenerationParams(max_tokens=2)
    gen = cached.generate([red], params)
    cached.generate([noise], params)
    assert cached.usage.cached_calls == 2  # only the repeated score calls so far
    assert cached.generate([red], params) == gen
    assert cached.usage.cached_calls == 3


# ---- vLLM -------------------------------------------------------------------------------------


def _fake_logprob(token_id: int, position: int) -> float:
    return -((token_id * 7 + position * 3) % 11 + 1) / 10


class ExpandingStandInLLM:
    """Answers ``generate`` like vLLM for a multimodal model: each image placeholder token of a
    request is expanded into ``IMAGE_TOKENS`` tokens, one per image in ``multi_modal_data``;
    the expanded ids come back with (made-up) prompt logprobs."""

    def __init__(self, tokenizer: Any, image_token: int, multimodal: bool = True) -> None:
        self._tokenizer = tokenizer
        self._image_token = image_token
        model_config = types.SimpleNamespace(max_model_len=4096, is_multimodal_model=multimodal)
        self.llm_engine = types.SimpleNamespace(model_config=model_config)
        self.requests: list[tuple[list[Any], Any]] = []

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    def generate(self, prompts: list[Any], sampling_params: Any, *, use_tqdm: bool = True) -> Any:
        self.requests.append((prompts, sampling_params))
        outputs = []
        for r, prompt in enumerate(prompts):
            ids: list[int] = []
            for t in prompt["prompt_token_ids"]:
                ids += [t] * IMAGE_TOKENS if t == self._image_token else [t]
            images = prompt.get("multi_modal_data", {}).get("image", [])
            assert len(images) * IMAGE_TOKENS == ids.count(self._image_token)
            prompt_logprobs = None
            if getattr(sampling_params, "prompt_logprobs", None) is not None:
                prompt_logprobs = [None] + [
                    {ids[j]: Logprob(_fake_logprob(ids[j], j), rank=1)} for j in range(1, len(ids))
                ]
            out_ids = self._tokenizer.encode(" a cat", add_special_tokens=False)
            completion = CompletionOutput(
                0, " a cat", out_ids, None, [{t: Logprob(-0.5)} for t in out_ids]
            )
            outputs.append(RequestOutput(str(r), None, ids, prompt_logprobs, [completion]))
        return outputs


def _same_pixels(a: Any, b: Any) -> bool:
    return a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes()


def test_vllm_score_requests_carry_the_images(processor: Any) -> None:
    tok = processor.tokenizer
    text = "<|im_start|>user\nFirst <image> then <image><|im_end|>\n<|im_start|>assistant\n"
    prompts = [ImagePrompt(text, (NOISE, RED)), "The picture shows"]
    requests, spans = build_score_requests(tok, prompts, [["cat", " a red car"]] * 2)
    for r, (request, (start, end)) in enumerate(zip(requests, spans, strict=True)):
        i, j = divmod(r, 2)
        option = tok.encode(["cat", " a red car"][j], add_special_tokens=False)
        body = prompts[i].text if isinstance(prompts[i], ImagePrompt) else prompts[i]
        assert request["prompt_token_ids"] == encode_prompt(tok, body) + option
        n = len(request["prompt_token_ids"])
        assert (start, end) == (n - len(option), n)
        if i == 0:
            # One placeholder token per image, the images in placeholder order, as PIL RGB.
            assert request["prompt_token_ids"].count(processor.image_token_id) == 2
            noise, red = request["multi_modal_data"]["image"]
            assert _same_pixels(noise, NOISE.pil()) and _same_pixels(red, RED.pil())
        else:
            assert set(request) == {"prompt_token_ids"}
    generation = engine_prompt(tok, prompts[0])
    assert generation["prompt_token_ids"] == encode_prompt(tok, text)
    assert len(generation["multi_modal_data"]["image"]) == 2


def test_vllm_resolve_span_after_placeholder_expansion() -> None:
    image = {"prompt_token_ids": [1, 9, 2, 5, 6], "multi_modal_data": {"image": ["img"]}}
    expanded = [1, 9, 9, 9, 9, 2, 5, 6]
    assert resolve_span(image, (3, 5), expanded) == (expanded, (6, 8))
    with pytest.raises(BackendError, match="option tokens"):
        resolve_span(image, (3, 5), [1, 9, 9, 2, 5, 7])
    with pytest.raises(BackendError, match="no prompt token ids"):
        resolve_span(image, (3, 5), None)
    text = {"prompt_token_ids": [1, 2, 3]}
    assert resolve_span(text, (2, 3), [1, 2, 3]) == ([1, 2, 3], (2, 3))
    with pytest.raises(BackendError, match="changed the token ids"):
        resolve_span(text, (2, 3), [1, 2, 4])


def test_vllm_backend_scores_and_generates_images(
    stand_in_vllm: types.ModuleType, processor: Any
) -> None:
    tok = processor.tokenizer
    llm = ExpandingStandInLLM(tok, processor.image_token_id)
    backend = VLLMBackend(model="stand-in", llm=llm, processor=processor)
    assert backend.capabilities.images
    prompts = [
        backend.render_chat(_messages(RED)) + "Answer:",
        backend.render_chat(_messages(NOISE, RED)),
        "The picture shows",
    ]
    assert isinstance(prompts[0], ImagePrompt) and prompts[1].images == (NOISE, RED)
    options = [["cat", " a red car"]] * 3
    scores = backend.score(prompts, options)
    assert scores.exact and scores.method == "prompt_logprobs"
    for i, prompt in enumerate(prompts):
        # Reference: the Hugging Face processor's expansion of the prompt, then the option.
        if isinstance(prompt, ImagePrompt):
            images = [[image.pil() for image in prompt.images]]
            p_ids = processor(text=[prompt.text], images=images)["input_ids"][0]
        else:
            p_ids = tok.encode(prompt)
        for j, option in enumerate(options[i]):
            ids = list(p_ids) + tok.encode(option, add_special_tokens=False)
            naive = sum(_fake_logprob(ids[t], t) for t in range(len(p_ids), len(ids)))
            assert scores.logprobs[i, j] == pytest.approx(naive)
        if isinstance(prompt, ImagePrompt):
            assert backend.count_tokens(prompt) == len(p_ids)

    [gen] = backend.generate(prompts[1:2], GenerationParams(max_tokens=4))
    ((request,), _) = llm.requests[-1]
    assert request["prompt_token_ids"] == encode_prompt(tok, prompts[1].text)
    noise, red = request["multi_modal_data"]["image"]
    assert _same_pixels(noise, NOISE.pil()) and _same_pixels(red, RED.pil())
    assert gen.text == " a cat" and gen.prompt_tokens == backend.count_tokens(prompts[1])


def test_vllm_text_only_model_refuses_images(
    stand_in_vllm: types.ModuleType, processor: Any
) -> None:
    llm = ExpandingStandInLLM(processor.tokenizer, processor.image_token_id, multimodal=False)
    backend = VLLMBackend(model="stand-in", llm=llm, processor=processor)
    assert not backend.capabilities.images
    with pytest.raises(DataError, match="text-only"):
        backend.render_chat(_messages(RED))
    with pytest.raises(DataError, match="text-only"):
        backend.score([ImagePrompt("x <image>", (RED,))], [["cat"]])
    assert llm.requests == []


# ---- OpenAI-compatible ------------------------------------------------------------------------


def _data(url: str) -> bytes:
    head, _, payload = url.partition(",")
    assert head.startswith("data:image/") and head.endswith(";base64")
    return base64.b64decode(payload)


def test_openai_chat_messages_carry_images_as_data_urls() -> None:
    messages = _messages(RED, NOISE)
    prompt = ImagePrompt("ignored", (RED, NOISE), tuple(messages)) + "Answer:"
    got = chat_messages(prompt)
    assert got[0] == {"role": "system", "content": SYSTEM}
    parts = got[1]["content"]
    assert [p["type"] for p in parts] == ["text", "text", "image_url", "text", "image_url"]
    assert parts[0] == {"type": "text", "text": "What is in this picture?"}
    assert _data(parts[2]["image_url"]["url"]) == RED.data
    assert _data(parts[4]["image_url"]["url"]) == NOISE.data
    assert parts[2]["image_url"]["url"].startswith("data:image/png;base64,")

    # vLLM continues the answer prefix as the assistant's message; other servers cannot.
    vllm_body = chat_body(prompt, "vllm")
    assert vllm_body["messages"][-1] == {"role": "assistant", "content": "Answer:"}
    assert vllm_body["continue_final_message"] is True
    assert vllm_body["add_generation_prompt"] is False
    assert chat_body(prompt, "openai") == {"messages": got}

    # A prompt without messages: its text, split where the images go.
    bare = chat_messages(ImagePrompt("Look <image> and <image>.", (RED, NOISE)))
    texts = [p.get("text", "img") for p in bare[0]["content"]]
    assert texts == ["Look ", "img", " and ", "img", "."]

    with pytest.raises(DataError, match="load_image"):
        chat_messages(ImagePrompt("x", (), ({"role": "user", "content": [{"type": "image"}]},)))


def _chat_response(text: str, top: dict[str, float] | None) -> dict[str, Any]:
    content = None
    if top is not None:
        first = max(top, key=top.__getitem__)
        alts = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top.items()]
        content = [{"token": first, "logprob": top[first], "top_logprobs": alts}]
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": content} if content is not None else None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 300, "completion_tokens": 1, "total_tokens": 301},
    }


def test_openai_chat_response_parsing() -> None:
    response = _chat_response("cat", {"cat": -0.25, "dog": -1.5, "a": -3.0})
    assert chat_top_logprobs(response["choices"][0]) == {"cat": -0.25, "dog": -1.5, "a": -3.0}
    assert chat_top_logprobs(_chat_response("cat", None)["choices"][0]) is None
    assert chat_generation(response).text == "cat"
    assert chat_generation(response).token_logprobs == (-0.25,)
    assert chat_generation(response).prompt_tokens == 300


def test_openai_refuses_images_unless_told_the_server_reads_them() -> None:
    url = "http://127.0.0.1:9/v1"
    text_only = OpenAICompatBackend(model="m", base_url=url, max_retries=0)
    with pytest.raises(DataError, match="images=True"):
        text_only.render_chat(_messages(RED))
    with pytest.raises(DataError, match="images=True"):
        text_only.score([ImagePrompt("x", (RED,))], [["cat"]])
    assert not text_only.capabilities.images

    seeing = OpenAICompatBackend(model="m", base_url=url, images=True, image_tokens=100)
    prompt = seeing.render_chat(_messages(RED, NOISE))
    assert isinstance(prompt, ImagePrompt) and prompt.images == (RED, NOISE)
    assert prompt.text.count("<image>") == 2
    seeing._server_tokenize = False  # no server here: count text by the 4-characters rule
    text_tokens = seeing.count_tokens(prompt.text.replace("<image>", ""))
    assert seeing.count_tokens(prompt) == text_tokens + 2 * 100
    text_only.close()
    seeing.close()


def test_openai_image_scoring_retries_a_failed_chat_request() -> None:
    """The only fake: a local server that fails once (the network), then answers."""

    def respond(n: int, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        if n == 1:
            return 503, {"error": {"message": "overloaded"}}, {}
        return 200, _chat_response("cat", {"cat": -0.25, "dog": -1.5}), {}

    with fake_server(respond) as (url, seen):
        backend = OpenAICompatBackend(
            model="m", base_url=url, images=True, server_kind="openai", backoff=0.01
        )
        backend._caps = Capabilities(images=True)  # no probe: only the chat requests count
        prompt = backend.render_chat(_messages(RED)) + "Answer:"
        scores = backend.score([prompt], [["cat", " dog", "bird"]])
        backend.close()
    assert len(seen) == 2 and seen[0] == seen[1]
    body = seen[1]
    assert body["logprobs"] is True and body["max_tokens"] == 1 and "prompt" not in body
    assert _data(body["messages"][1]["content"][2]["image_url"]["url"]) == RED.data
    assert body["messages"][-1]["role"] == "user"  # OpenAI cannot continue the answer prefix
    # First-token scores; " dog" matches "dog" since the reply starts afresh.
    assert scores.logprobs.tolist() == [[-0.25, -1.5, -30.0]]
    assert not scores.exact and scores.method == "first_token"
    assert scores.usage.retries == 1 and scores.usage.failures == 1 and scores.usage.calls == 1
