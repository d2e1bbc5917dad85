"""The LLM view's mean centring is fitted on the store's first session, kept in the store, and
applied unchanged to everything after (so learning stays exactly incremental)."""

from __future__ import annotations

import numpy as np

from icl_cl.config import EmbedderConfig, LLMViewConfig
from icl_cl.embedding.centred_embedder import CENTRING_KEY, CentredEmbedder, centred_for_store
from icl_cl.memory.store import Store


def test_centring_is_fitted_once_on_the_first_vectors_and_kept(tmp_path, embedder, wordnet):
    train, test, _ = wordnet
    first, later = [ex.text for ex in train[:40]], [ex.text for ex in test[:10]]
    store = Store.create(tmp_path / "s", dim=embedder.dim, embedder=embedder.name, config={})
    centred = CentredEmbedder(embedder, store)
    assert not centred.centring.fitted and store.fitted(CENTRING_KEY) is None
    got_first = centred.encode(first)
    raw = embedder.encode(first).astype(np.float64)
    mean = raw.mean(axis=0)
    expected = (raw - mean) / np.linalg.norm(raw - mean, axis=1, keepdims=True)
    np.testing.assert_allclose(got_first, expected, atol=1e-6)
    # Later inputs go through the same mean; nothing is refitted.
    got_later = centred.encode(later)
    raw_later = embedder.encode(later).astype(np.float64) - mean
    np.testing.assert_allclose(
        got_later, raw_later / np.linalg.norm(raw_later, axis=1, keepdims=True), atol=1e-6
    )
    np.testing.assert_allclose(centred.centring.mean, mean)
    # Kept in the store: a reopened store centres the same way.
    store.close()
    reopened = CentredEmbedder(embedder, Store.open(tmp_path / "s"))
    assert reopened.centring.fitted
    np.testing.assert_allclose(reopened.encode(later), got_later, atol=1e-7)
    assert reopened.name == embedder.name and reopened.dim == embedder.dim


def test_only_an_llm_view_is_centred(tmp_path, embedder):
    store = Store.create(tmp_path / "s", dim=embedder.dim, embedder=embedder.name, config={})
    assert centred_for_store(embedder, EmbedderConfig(), store) is embedder
    view = EmbedderConfig(llm_view=LLMViewConfig())
    assert isinstance(centred_for_store(embedder, view, store), CentredEmbedder)
    plain = EmbedderConfig(llm_view=LLMViewConfig(centre=False))
    assert centred_for_store(embedder, plain, store) is embedder
