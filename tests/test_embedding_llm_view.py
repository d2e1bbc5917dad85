"""The LLM view: hidden-state embedders (transformers, vLLM's request building), the
concatenation of embedders, and the frozen mean centring.

Where only the code path matters, a tiny random-weight Llama built here stands in (known answers
are recomputed by hand from its hidden states); the real SmolLM2-135M-Instruct from its package
checks the product's loading path. vLLM itself needs a CUDA GPU (``gpu`` marker).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from icl_cl.config import ClassifierConfig, EmbedderConfig, LLMViewConfig
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.concat import ConcatEmbedder
from icl_cl.embedding.llm_hidden import HiddenStateEmbedder, template_ids, token_rows
from icl_cl.embedding.mean_centring import MeanCentring
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder
from icl_cl.embedding.vllm_hidden import (
    VLLMHiddenStateEmbedder,
    build_requests,
    engine_kwargs,
    parse_embeddings,
)
from icl_cl.errors import BackendError, ConfigError, DataError
from icl_cl.images import Image
from tests.conftest import ROOT
from tests.tiny_models import tiny_backend
from tests.tiny_vlm import smollm2_tokenizer

TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "the big red dog ran under the small blue rug",
    "cat",
    "the mat is blue",
    "a small cat sat on a big dog",
    "dog ran",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    """A random-weight two-layer Llama and its word-level tokenizer (no download)."""
    backend = tiny_backend(seed=1)
    return backend._lm, backend._tok


def tiny_view(tiny: tuple[Any, Any], **kwargs: Any) -> HiddenStateEmbedder:
    lm, tok = tiny
    return HiddenStateEmbedder(
        "tiny-random", lm=lm, tokenizer=tok, **{"batch_size": 3, "layer": -1, **kwargs}
    )


def by_hand(tiny: tuple[Any, Any], text: str, layer: int, pooling: str, template: str) -> Any:
    """The pooled state of one text, alone (no padding), from the model's own outputs."""
    import torch

    lm, tok = tiny
    prefix, suffix = template_ids(tok, template)
    ids = prefix + tok(text, add_special_tokens=False).input_ids + suffix
    with torch.no_grad():
        states = lm.base_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        # hidden_states[-1] is already normed; an intermediate layer goes through the final norm.
        h = states[-1][0] if layer == -1 else lm.base_model.norm(states[layer])[0]
    v = h[len(prefix) :].mean(0) if pooling == "mean" else h[-1]
    return (v / v.norm()).numpy()


def png() -> Image:
    import io

    from PIL import Image as PILImage

    buffer = io.BytesIO()
    PILImage.new("RGB", (4, 4)).save(buffer, format="PNG")
    return Image.from_bytes(buffer.getvalue())


# ---- the transformers hidden-state embedder ----------------------------------------------------


@pytest.mark.parametrize("layer", [-1, 1])
@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("template", ["none", "answer : {text} ."])
def test_pooled_states_match_each_text_alone(
    tiny: tuple[Any, Any], layer: int, pooling: str, template: str
) -> None:
    view = tiny_view(tiny, layer=layer, pooling=pooling, template=template)
    vectors = view.encode(TEXTS)
    assert vectors.dtype == np.float32 and view.dim == 32 and vectors.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    # Length-sorted batches with padding give each text the vector it has alone, in its row.
    expected = np.stack([by_hand(tiny, t, layer, pooling, template) for t in TEXTS])
    np.testing.assert_allclose(vectors, expected, atol=2e-5)


def test_a_loaded_model_is_cut_after_the_layer(tiny: tuple[Any, Any], tmp_path: Any) -> None:
    """Loaded from a folder (the product's loader), the model keeps only the layers it needs, and
    gives the vectors the whole model gives at that layer."""
    lm, tok = tiny
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    owned = HiddenStateEmbedder(str(tmp_path), layer=1, batch_size=3)
    vectors = owned.encode(TEXTS)
    assert len(owned._loaded[0].base_model.layers) == 1 and len(lm.base_model.layers) == 2
    np.testing.assert_allclose(vectors, tiny_view(tiny, layer=1).encode(TEXTS), atol=1e-5)
    whole = HiddenStateEmbedder(str(tmp_path), layer=-1, batch_size=3)
    np.testing.assert_allclose(whole.encode(TEXTS), tiny_view(tiny).encode(TEXTS), atol=1e-5)


def test_rows_keep_the_order_of_the_texts(tiny: tuple[Any, Any]) -> None:
    view = tiny_view(tiny)
    vectors = view.encode(TEXTS)
    shuffled = [5, 0, 3, 6, 1, 4, 2]
    np.testing.assert_allclose(
        view.encode([TEXTS[i] for i in shuffled]), vectors[shuffled], atol=1e-6
    )
    # Distinct texts, distinct vectors: a mix-up of rows would show.
    assert np.all(np.abs(vectors @ vectors.T - np.eye(len(TEXTS))).max(axis=1) > 1e-4)


def test_long_texts_are_cut_to_max_tokens(tiny: tuple[Any, Any]) -> None:
    long = "the cat sat on the mat " * 10
    view = tiny_view(tiny, max_tokens=4)
    np.testing.assert_allclose(view.encode([long]), view.encode(["the cat sat on"]), atol=1e-6)
    assert not np.allclose(view.encode([long]), tiny_view(tiny).encode([long]), atol=1e-3)


def test_template_wraps_the_cut_text(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    rows = token_rows(tok, ["the cat sat on the mat"], "answer : {text} .", max_tokens=2)
    words = tok.convert_ids_to_tokens(rows.ids[0])
    assert words == ["answer", ":", "the", "cat", "."] and rows.start == 2


def test_bfloat16_model_gives_float32_vectors_close_to_float32s(tiny: tuple[Any, Any]) -> None:
    import torch

    backend = tiny_backend(seed=1)
    half = HiddenStateEmbedder(
        "tiny-random", lm=backend._lm.to(torch.bfloat16), tokenizer=tiny[1], layer=-1
    )
    vectors = half.encode(TEXTS)
    assert vectors.dtype == np.float32 and half.dtype == "bfloat16"
    assert np.sum(vectors * tiny_view(tiny).encode(TEXTS), axis=1).min() > 0.99
    assert half.name != tiny_view(tiny).name and "dtype=bfloat16" in half.name


def test_name_names_everything_that_changes_the_vectors(tiny: tuple[Any, Any]) -> None:
    base = tiny_view(tiny).name
    assert tiny_view(tiny).name == base
    assert tiny_view(tiny, batch_size=5).name == base  # batching does not change the vectors
    variants = [
        tiny_view(tiny, layer=1),
        tiny_view(tiny, pooling="last"),
        tiny_view(tiny, max_tokens=4),
        tiny_view(tiny, template="answer : {text}"),
        tiny_view(tiny, template="answer : {text} ."),
        HiddenStateEmbedder("other-model", lm=tiny[0], tokenizer=tiny[1], layer=-1),
    ]
    names = {v.name for v in variants}
    assert base not in names and len(names) == len(variants)


def test_bad_inputs_and_settings_raise(tiny: tuple[Any, Any]) -> None:
    view = tiny_view(tiny)
    with pytest.raises(DataError):
        view.encode(["a cat", png()])
    with pytest.raises(DataError):
        view.encode([""])  # no token to pool
    assert view.encode([]).shape == (0, 32)
    with pytest.raises(ConfigError):
        tiny_view(tiny, layer=3).encode(["cat"])  # the tiny model has two layers
    with pytest.raises(ConfigError):
        tiny_view(tiny, template="no slot").encode(["cat"])
    with pytest.raises(ConfigError):
        tiny_view(tiny, template="chat").encode(["cat"])  # its tokenizer has no chat template
    with pytest.raises(ConfigError):
        tiny_view(tiny, pooling="max")  # type: ignore[arg-type]


def test_real_smollm2_from_its_package() -> None:
    """The product's path: the packaged GGUF, loaded as the transformers backend loads it."""
    view = HiddenStateEmbedder("smollm2-135m-instruct", batch_size=2)
    texts = ["dog: a domesticated carnivore", "tax: a charge against income", "run", "puppy"]
    vectors = view.encode(texts)
    assert isinstance(view, Embedder)
    assert vectors.shape == (4, 576) and view.dim == 576 and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    alone = np.stack([view.encode([t])[0] for t in texts])
    np.testing.assert_allclose(vectors, alone, atol=1e-4)
    assert view.name.startswith("llm-hidden:smollm2-135m-instruct:dtype=float32:layer=16:")
    assert len(view._loaded[0].base_model.layers) == 16  # cut after the pooled layer


# ---- concatenation -----------------------------------------------------------------------------


def test_concat_blocks_are_unit_parts_weighed_equally(
    tiny: tuple[Any, Any], embedder: Embedder
) -> None:
    view = tiny_view(tiny)
    both = ConcatEmbedder([embedder, view])
    vectors = both.encode(TEXTS)
    assert both.dim == embedder.dim + 32 and vectors.shape == (len(TEXTS), both.dim)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        vectors[:, : embedder.dim] * np.sqrt(2), embedder.encode(TEXTS), atol=1e-5
    )
    np.testing.assert_allclose(
        vectors[:, embedder.dim :] * np.sqrt(2), view.encode(TEXTS), atol=1e-5
    )
    assert both.name == f"concat({embedder.name} + {view.name})"
    assert both.blocks == [embedder.dim, 32]
    assert ConcatEmbedder([view, embedder]).name != both.name
    assert not both.reads_images
    with pytest.raises(ConfigError):
        ConcatEmbedder([view])


def test_concat_reports_progress_once_per_item(tiny: tuple[Any, Any]) -> None:
    done: list[int] = []
    ConcatEmbedder([tiny_view(tiny), tiny_view(tiny, pooling="last")]).encode(TEXTS, done.append)
    assert sum(done) == len(TEXTS)


# ---- centring ----------------------------------------------------------------------------------


def test_centring_known_answer_and_round_trip() -> None:
    centring = MeanCentring().fit(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    r = 1 / np.sqrt(2)
    out = centring.apply(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(out, [[r, -r], [-r, r]], atol=1e-7)
    assert out.dtype == np.float32

    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 8)).astype(np.float32)
    fitted = MeanCentring().fit(data)
    saved = json.loads(json.dumps(fitted.to_dict()))
    restored = MeanCentring.from_dict(saved)
    assert np.array_equal(restored.mean, fitted.mean)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    assert np.array_equal(restored.apply(queries), fitted.apply(queries))


def test_block_centring_centres_each_block_and_weighs_them_equally() -> None:
    rng = np.random.default_rng(2)
    # Block b shares a large common direction, block a does not: centred as one vector, b would
    # shrink to almost nothing.
    a = rng.standard_normal((40, 3))
    b = 10 + 0.1 * rng.standard_normal((40, 2))
    vectors = np.hstack([a, b])
    out = MeanCentring(blocks=[3, 2]).fit(vectors).apply(vectors)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out[:, 3:], axis=1), np.sqrt(0.5), rtol=1e-6)
    expected_b = b - b.mean(0)
    expected_b /= np.linalg.norm(expected_b, axis=1, keepdims=True) * np.sqrt(2)
    np.testing.assert_allclose(out[:, 3:], expected_b, atol=1e-6)
    restored = MeanCentring.from_dict(
        json.loads(json.dumps(MeanCentring([3, 2]).fit(vectors).to_dict()))
    )
    assert restored.blocks == [3, 2] and np.array_equal(restored.apply(vectors), out)
    with pytest.raises(ConfigError):
        MeanCentring(blocks=[3, 3]).fit(vectors)  # blocks must add up to the dimension


def test_centring_is_frozen_and_row_wise() -> None:
    rng = np.random.default_rng(1)
    first, second = rng.standard_normal((20, 4)), rng.standard_normal((7, 4))
    centring = MeanCentring().fit(first)
    with pytest.raises(ConfigError):
        centring.fit(second)  # frozen: later sessions never move it
    # Each row is transformed alone, so sessions applied one by one equal their union.
    together = centring.apply(np.vstack([first, second]))
    assert np.array_equal(together, np.vstack([centring.apply(first), centring.apply(second)]))
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-6)


def test_centring_rejects_misuse() -> None:
    with pytest.raises(ConfigError):
        MeanCentring().apply(np.ones((1, 3)))
    with pytest.raises(ConfigError):
        MeanCentring().to_dict()
    with pytest.raises(ConfigError):
        MeanCentring().fit(np.ones((0, 3)))
    with pytest.raises(ConfigError):
        MeanCentring().fit(np.ones((2, 3))).apply(np.ones((1, 4)))
    with pytest.raises(ConfigError):
        MeanCentring.from_dict({"kind": "whitening", "mean": [0.0]})


# ---- config and factory ------------------------------------------------------------------------


def test_factory_builds_the_view_alone_or_after_the_sentence_embedder() -> None:
    alone = load_embedder(EmbedderConfig(llm_view=LLMViewConfig(combine="alone", layer=-2)))
    assert isinstance(alone, HiddenStateEmbedder) and alone.layer == -2
    both = load_embedder(EmbedderConfig(llm_view=LLMViewConfig()))
    assert isinstance(both, ConcatEmbedder)
    sentence, view = both.parts
    assert isinstance(sentence, SentenceTransformerEmbedder) and isinstance(
        view, HiddenStateEmbedder
    )
    assert sentence.name == EmbedderConfig().model
    vllm = load_embedder(EmbedderConfig(llm_view=LLMViewConfig(backend="vllm", combine="alone")))
    assert isinstance(vllm, VLLMHiddenStateEmbedder)  # the engine starts on first use only
    assert isinstance(load_embedder(EmbedderConfig()), SentenceTransformerEmbedder)


def test_shipped_config_asks_for_the_view() -> None:
    config = ClassifierConfig.from_yaml(ROOT / "eval/configs/classifier/smollm2-view.yaml")
    view = config.embedder.llm_view
    assert view is not None and view.model == "smollm2-135m-instruct"
    assert view == LLMViewConfig(**view.model_dump())


# ---- vLLM: request building everywhere, the engine on a GPU ------------------------------------


def test_vllm_engine_kwargs_cut_the_model_after_the_layer() -> None:
    assert engine_kwargs("mean", -1, 30) == {
        "runner": "pooling",
        "convert": "embed",
        "pooler_config": {"pooling_type": "MEAN"},
    }
    assert engine_kwargs("last", 20, 30)["hf_overrides"] == {"num_hidden_layers": 20}
    assert engine_kwargs("last", -11, 30)["hf_overrides"] == {"num_hidden_layers": 20}
    assert engine_kwargs("last", -11, 30)["pooler_config"] == {"pooling_type": "LAST"}
    with pytest.raises(ConfigError):
        engine_kwargs("mean", 31, 30)
    with pytest.raises(ConfigError):
        engine_kwargs("max", -1, 30)  # type: ignore[arg-type]


def test_vllm_requests_are_the_transformers_embedders_token_ids() -> None:
    tok = smollm2_tokenizer()
    texts = ["dog: a domesticated carnivore " * 20, "puppy"]
    requests = build_requests(tok, texts, "none", 16, "mean")
    assert requests == [{"prompt_token_ids": ids} for ids in token_rows(tok, texts, "none", 16).ids]
    assert len(requests[0]["prompt_token_ids"]) == 16
    chat = build_requests(tok, texts, "chat", 16, "last")
    message = [{"role": "user", "content": "puppy"}]
    whole = tok.apply_chat_template(message, add_generation_prompt=True, tokenize=True)
    assert chat[1]["prompt_token_ids"] == whole["input_ids"]
    with pytest.raises(ConfigError):
        build_requests(tok, texts, "chat", 16, "mean")  # vLLM would average the prefix too
    with pytest.raises(DataError):
        build_requests(tok, [""], "none", 16, "last")


def test_vllm_outputs_become_unit_rows_in_order() -> None:
    class Output:
        def __init__(self, embedding: list[float]) -> None:
            self.outputs = type("Pooled", (), {"embedding": embedding})()

    rows = parse_embeddings([Output([3.0, 4.0]), Output([0.0, 2.0])], 2)
    np.testing.assert_allclose(rows, [[0.6, 0.8], [0.0, 1.0]])
    assert rows.dtype == np.float32
    with pytest.raises(BackendError):
        parse_embeddings([Output([1.0, 0.0])], 2)


@pytest.mark.gpu
def test_real_vllm_pooling_matches_the_transformers_view() -> None:
    """Needs vLLM, a CUDA GPU and ICL_CL_VLLM_MODEL (a small local Llama-family model)."""
    pytest.importorskip("vllm")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = os.environ.get("ICL_CL_VLLM_MODEL")
    if not model:
        pytest.skip("set ICL_CL_VLLM_MODEL to a small local model")
    texts = ["dog: a domesticated carnivore", "tax: a charge against income", "puppy"]
    from transformers import AutoConfig

    middle = int(AutoConfig.from_pretrained(model).num_hidden_layers) // 2
    for layer, pooling in ((-1, "mean"), (middle, "mean"), (-1, "last")):
        gpu = VLLMHiddenStateEmbedder(
            model, layer=layer, pooling=pooling, dtype="float32", gpu_memory_utilization=0.3
        )
        cpu = HiddenStateEmbedder(model, layer=layer, pooling=pooling)
        try:
            cosines = np.sum(gpu.encode(texts) * cpu.encode(texts), axis=1)
        finally:
            gpu.close()
        assert cosines.min() > 0.99, (layer, pooling, cosines)
