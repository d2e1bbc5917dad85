"""Sequence packing: packed texts get the vectors the ordinary padded batches give them."""

from __future__ import annotations

import numpy as np
import pytest

from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder, packing
from icl_cl.embedding.packing import PackedEncoder, pack_passes, pack_rows
from icl_cl.embedding.sentence_transformers import SentenceTransformerEmbedder

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Mixed lengths, an empty text, non-Latin text, and one over the model's 256 word pieces (it is
# truncated the same way in both paths).
TEXTS = [
    "cat",
    "",
    "a command-line tool to convert between image formats and apply simple effects",
    "Ünïcödé 漢字 🙂 text",
    "the package provides tools for tagging and searching the archive " * 40,
    "verb: move fast",
    *(f"example number {i} about {'packages ' * (i % 9)}" for i in range(40)),
]


def test_pack_rows_places_every_text_once_within_the_row_budget() -> None:
    lengths = [5, 300, 40, 41, 5, 5, 5, 120, 5, 90]
    rows = pack_rows(lengths, row_tokens=128)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    capacity = max(128, max(lengths))  # a text longer than a row widens every row
    assert all(sum(lengths[i] for i in row) <= capacity for row in rows)
    fills = [sum(lengths[i] for i in row) for row in rows]
    assert fills == sorted(fills, reverse=True)
    assert pack_rows([], row_tokens=128) == []


def test_passes_keep_their_budget_and_spread_the_last_rows_evenly() -> None:
    lengths = [17, 9, 30, 12, 25, 8, 14, 21, 11, 19, 16, 22, 10, 13, 18, 27] * 6
    passes = pack_passes(lengths, row_tokens=128, pass_tokens=512)
    assert sorted(i for rows in passes for row in rows for i in row) == list(range(len(lengths)))
    fills = [[sum(lengths[i] for i in row) for row in rows] for rows in passes]
    assert all(len(f) * max(f) <= 512 for f in fills)
    # A small batch is one pass: first-fit alone gives rows of 128, 128, 128, 126 and 34 tokens,
    # all padded to 128; spread, the same 5 rows hold at most 109.
    small = lengths[:32]
    assert [sum(small[i] for i in row) for row in pack_rows(small, 128)] == [128, 128, 128, 126, 34]
    (rows,) = pack_passes(small, row_tokens=128, pass_tokens=2048)
    assert [sum(small[i] for i in row) for row in rows] == [109, 109, 109, 109, 108]
    assert pack_passes([], row_tokens=128, pass_tokens=256) == []
    assert pack_passes([300], row_tokens=128, pass_tokens=256) == [[[0]]]


def test_packed_vectors_equal_padded_ones() -> None:
    packed = SentenceTransformerEmbedder(MODEL)
    padded = SentenceTransformerEmbedder(MODEL, pack=False)
    assert packed._packed is not None and padded._packed is None
    counted: list[int] = []
    a = packed.encode(TEXTS, progress=counted.append)
    b = padded.encode(TEXTS)
    assert a.shape == b.shape == (len(TEXTS), 384)
    assert sum(counted) == len(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert ((a * b).sum(axis=1) > 0.99999).all()
    # A text's vector does not depend on what shares its row.
    alone = packed.encode([TEXTS[2]])
    assert float(alone[0] @ a[2]) > 0.99999


def test_the_config_turns_packing_off_and_other_poolings_are_not_packed() -> None:
    assert load_embedder(EmbedderConfig(pack=False))._packed is None  # type: ignore[attr-defined]
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    from icl_cl.embedding.sentence_transformers import resolve_model_path

    transformer = Transformer(resolve_model_path(MODEL))
    max_pooled = SentenceTransformer(
        modules=[transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode="max")]
    )
    assert PackedEncoder.for_model(max_pooled) is None


def test_texts_are_tokenised_in_chunks_and_keep_their_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    embedder = SentenceTransformerEmbedder(MODEL)
    whole = embedder.encode(TEXTS)
    monkeypatch.setattr(packing, "TOKENIZE_TEXTS", 7)
    chunked = embedder.encode(TEXTS)
    assert ((whole * chunked).sum(axis=1) > 0.99999).all()


@pytest.mark.parametrize("size", [1, 7, 32])
def test_micro_batches_match_the_whole_batch(size: int) -> None:
    embedder = SentenceTransformerEmbedder(MODEL)
    whole = embedder.encode(TEXTS)
    parts = np.vstack([embedder.encode(TEXTS[i : i + size]) for i in range(0, len(TEXTS), size)])
    assert ((whole * parts).sum(axis=1) > 0.99999).all()
