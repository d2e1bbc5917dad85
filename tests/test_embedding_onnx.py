"""The ONNX backend of the embedder: exported offline from the packaged all-MiniLM-L6-v2 once per
test session (into a session cache folder), reused, close to the torch model's vectors; the
length sort keeps rows in input order; a store never mixes embedders."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from icl_cl import ClassifierConfig, ConfigError, ContinualClassifier, EmbedderConfig
from icl_cl.embedding import SentenceTransformerEmbedder, load_embedder
from icl_cl.embedding import sentence_transformers as st_module
from icl_cl.embedding.onnx import (
    META_FILE,
    MODEL_FILE,
    OnnxSentenceEmbedder,
    _publish,
    ensure_export,
    int8_preset,
    onnx_variant,
)
from icl_cl.embedding.sentence_transformers import length_batches, resolve_model_path

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ROOT = Path(__file__).resolve().parents[1]
# Over 256 word pieces: checks that truncation matches sentence-transformers'.
LONG = "the package provides tools for tagging and searching the archive " * 40


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One export cache for this module: the export (about half a minute) happens once."""
    folder = tmp_path_factory.mktemp("icl_cl_cache")
    before = os.environ.get("ICL_CL_CACHE")
    os.environ["ICL_CL_CACHE"] = str(folder)
    yield folder
    if before is None:
        del os.environ["ICL_CL_CACHE"]
    else:
        os.environ["ICL_CL_CACHE"] = before


@pytest.fixture(scope="module")
def int8(onnx_cache: Path) -> OnnxSentenceEmbedder:
    embedder = load_embedder(EmbedderConfig(backend="onnx", quantize="int8", batch_size=8))
    assert isinstance(embedder, OnnxSentenceEmbedder)
    embedder.encode(["warm up: exports on first use"])
    return embedder


@pytest.fixture(scope="module")
def texts() -> list[str]:
    lines = (ROOT / "eval" / "data" / "wordnet-sample" / "test.jsonl").read_text().splitlines()
    return [json.loads(line)["text"] for line in lines[:24]] + [LONG, "a", "  spaced  out  "]


@pytest.fixture(scope="module")
def torch_vectors(embedder, texts: list[str]) -> np.ndarray:
    return embedder.encode(texts)


def test_export_comes_from_the_packaged_model_offline(int8: OnnxSentenceEmbedder) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    source = Path(resolve_model_path(MODEL))
    assert (source / "modules.json").is_file()  # the packaged copy, not a hub name
    folder, built = ensure_export(MODEL, int8.variant)
    assert not built
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["model"] == MODEL
    assert meta["variant"] == int8.variant == onnx_variant("int8")
    assert meta["dim"] == int8.dim == 384
    assert meta["max_seq_length"] == 256


def test_export_is_cached_and_reused(int8: OnnxSentenceEmbedder, onnx_cache: Path) -> None:
    folder, _ = ensure_export(MODEL, int8.variant)
    stamp = (folder / MODEL_FILE).stat().st_mtime_ns
    listing = sorted(p.name for p in (onnx_cache / "onnx").iterdir())
    # The int8 export was quantised from the fp32 one, which is cached beside it.
    assert [name.split("-")[-2] for name in listing] == sorted(["fp32", int8.variant])
    again = load_embedder(EmbedderConfig(backend="onnx", quantize="int8"))
    vectors = again.encode(["the same text", "another"])
    assert ensure_export(MODEL, int8.variant) == (folder, False)
    assert (folder / MODEL_FILE).stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (onnx_cache / "onnx").iterdir()) == listing  # no temp left
    np.testing.assert_allclose(vectors, int8.encode(["the same text", "another"]), atol=1e-6)


def test_int8_vectors_are_unit_and_close_to_torch(
    int8: OnnxSentenceEmbedder, texts: list[str], torch_vectors: np.ndarray
) -> None:
    vectors = int8.encode(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * torch_vectors).sum(axis=1)
    # Measured: min 0.989, mean 0.993 on these texts (int8 rounding, not a different model).
    assert cosine.min() > 0.97 and cosine.mean() > 0.985
    # Still the same geometry: each text's nearest torch vector is its own.
    assert (np.argmax(vectors @ torch_vectors.T, axis=1) == np.arange(len(texts))).all()


def test_fp32_export_matches_torch(
    int8: OnnxSentenceEmbedder, texts: list[str], torch_vectors: np.ndarray
) -> None:
    fp32 = load_embedder(EmbedderConfig(backend="onnx", batch_size=8))  # cached by int8's export
    assert fp32.name == f"{MODEL} [onnx]"
    cosine = (fp32.encode(texts) * torch_vectors).sum(axis=1)
    assert cosine.min() > 0.9999  # same tokenisation, truncation and pooling as torch


class _ChunkRecorder(SentenceTransformerEmbedder):
    """The real torch embedder, unpacked (padded batches), noting what each call into the model
    received."""

    chunks: list[list[str]]

    def _encode_chunk(self, inputs: list[str]) -> np.ndarray:
        self.chunks.append(list(inputs))
        return super()._encode_chunk(inputs)


def test_length_sort_spans_the_call_and_keeps_input_order(
    monkeypatch: pytest.MonkeyPatch, embedder, int8: OnnxSentenceEmbedder
) -> None:
    items = ["mid length text", "a", LONG, "short", "a fairly long text about packages", "b c"]
    monkeypatch.setattr(st_module, "BATCH_CHARS", 40)
    plain = _ChunkRecorder(MODEL, pack=False)
    plain.chunks = []
    done: list[int] = []
    vectors = plain.encode(items, progress=done.append)
    # Longest first; 40 padded characters a batch: the long texts alone, short ones in pairs.
    longest_first = [[LONG], ["a fairly long text about packages"], ["mid length text", "short"]]
    assert plain.chunks == [*longest_first, ["b c", "a"]]
    assert sum(done) == len(items)
    # Row i is item i's vector, as if embedded alone.
    alone = embedder.encode(items)
    assert ((vectors * alone).sum(axis=1) > 0.9999).all()
    # Int8 activations are quantised with one scale per batch, so a text's int8 vector moves a
    # little with its batch (cosine 0.98 to 0.998 here); each row is still its own item's.
    rows = int8.encode(items)
    single = np.stack([int8.encode([item])[0] for item in items])
    assert (np.argmax(rows @ single.T, axis=1) == np.arange(len(items))).all()
    assert ((rows * single).sum(axis=1) > 0.97).all()


def test_length_batches_bound_rows_and_padded_characters() -> None:
    lengths = [5, 300, 40, 41, 5, 5, 5, 120, 5]
    batches = length_batches(lengths, max_rows=3, max_chars=100)
    assert sorted(int(i) for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * longest <= 100
    # Longest first, and a text over the budget is a batch of its own.
    assert [list(b) for b in batches[:3]] == [[1], [7], [3, 2]]


def test_names_distinguish_backend_and_quantisation(int8: OnnxSentenceEmbedder) -> None:
    torch_name = load_embedder(EmbedderConfig()).name
    assert torch_name == MODEL  # stores built today keep their embedder name
    assert int8.name == f"{MODEL} [onnx {int8.variant}]"
    assert int8.variant == ("quint8" if int8_preset() == "avx2" else "qint8")
    assert len({torch_name, int8.name, f"{MODEL} [onnx]"}) == 3


def test_store_refuses_another_embedder(
    tmp_path: Path, embedder, int8: OnnxSentenceEmbedder, wordnet
) -> None:
    quantised = ClassifierConfig(embedder=EmbedderConfig(backend="onnx", quantize="int8"))
    train, test, _ = wordnet
    with ContinualClassifier.open(tmp_path / "q", quantised) as clf:
        clf.learn(train[:60])
    with pytest.raises(ConfigError, match=r"built with embedder .*\[onnx q?u?int8\]'"):
        ContinualClassifier.open(tmp_path / "q", ClassifierConfig())
    with pytest.raises(ConfigError, match="built with embedder"):
        ContinualClassifier.open(tmp_path / "q", embedder=embedder)
    with ContinualClassifier.open(tmp_path / "q") as clf:  # the stored config names int8
        assert clf.embedder.name == int8.name
        learned = {label for ex in train[:60] for label in ex.labels}
        assert set(clf.predict([ex.text for ex in test[:5]], use_llm=False)[0].labels) <= learned

    ContinualClassifier.open(tmp_path / "t", embedder=embedder).close()
    with pytest.raises(ConfigError, match=rf"built with embedder '{MODEL}', not '.*\[onnx"):
        ContinualClassifier.open(tmp_path / "t", quantised)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="needs backend 'onnx'"):
        ClassifierConfig.from_dict({"embedder": {"quantize": "int8"}})
    with pytest.raises(ConfigError, match="runs on the CPU"):
        ClassifierConfig.from_dict({"embedder": {"backend": "onnx", "device": "cuda"}})
    with pytest.raises(ConfigError, match="backend"):
        ClassifierConfig.from_dict({"embedder": {"backend": "openvino"}})


def test_publish_is_all_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "export"

    def fail(tmp: Path) -> None:
        (tmp / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("export failed")

    with pytest.raises(RuntimeError):
        _publish(target, fail)
    assert list(tmp_path.iterdir()) == []

    def lose_the_race(tmp: Path) -> None:
        # Another process publishes the same export while this one is still writing its own.
        _publish(target, lambda other: (other / META_FILE).write_text("theirs"))
        (tmp / META_FILE).write_text("ours")

    _publish(target, lose_the_race)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert (target / META_FILE).read_text() == "theirs"
