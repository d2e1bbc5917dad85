"""The example index: exact, then HNSW saved next to the store and read on open (checked against
the committed vectors); on CUDA GPUs, exact on every GPU (``gpu`` marker)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.memory.example_index import EXAMPLES_FILE, LABELS_FILE, ExampleIndex, gpu_count
from icl_cl.types import Example, Label


def _unit(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_cpu_path_is_the_default_here() -> None:
    assert gpu_count() == 0  # faiss-cpu
    index = ExampleIndex(16, exact_max=10)
    index.add(_unit(10))
    assert index.kind == "flat"
    index.add(_unit(1, seed=1))
    assert index.kind == "hnsw"


def test_a_saved_index_is_read_and_completed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    vectors = _unit(300)
    index = ExampleIndex(16, exact_max=50)
    index.add(vectors[:200])
    index.save(tmp_path / "x.hnsw")
    with caplog.at_level(logging.DEBUG, logger="icl_cl.memory.example_index"):
        restored = ExampleIndex.restore(tmp_path / "x.hnsw", 16, 50, vectors)
    assert "read the index of 200 vectors" in caplog.text
    assert restored.size == 300 and restored.kind == "hnsw"
    sims, rows = restored.search(vectors[[5, 250]], 1)  # old rows and the ones added after
    assert rows[:, 0].tolist() == [5, 250]
    np.testing.assert_allclose(sims[:, 0], 1.0, rtol=1e-5)


def test_a_saved_index_of_other_vectors_is_rebuilt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    index = ExampleIndex(16, exact_max=50)
    index.add(_unit(100, seed=1))
    index.save(tmp_path / "x.hnsw")
    vectors = _unit(80)
    with caplog.at_level(logging.DEBUG, logger="icl_cl.memory.example_index"):
        restored = ExampleIndex.restore(tmp_path / "x.hnsw", 16, 50, vectors)  # a longer cache
        assert "does not match the store" in caplog.text
        restored = ExampleIndex.restore(tmp_path / "x.hnsw", 16, 50, _unit(120))  # other rows
        assert "holds other vectors" in caplog.text
    assert restored.size == 120
    assert restored.search(_unit(120)[[7]], 1)[1][0, 0] == 7


def test_a_store_saves_its_hnsw_indexes_and_reopens_with_the_same_neighbours(
    tmp_path: Path,
) -> None:
    """Examples and labels above their exact limits: each session saves the graphs."""
    config = ClassifierConfig(memory=MemoryConfig(exact_search_max=30, label_exact_search_max=5))
    texts = [f"item number {i} about topic {i % 7}" for i in range(60)]
    labels = [Label(f"t{j}", description=f"topic {j}") for j in range(7)]
    with ContinualClassifier.open(tmp_path / "store", config) as clf:
        clf.learn(
            [Example(f"a{i}", t, [f"t{i % 7}"]) for i, t in enumerate(texts[:40])],
            labels,
            fit=False,
        )
        clf.learn([Example(f"b{i}", t, [f"t{i % 7}"]) for i, t in enumerate(texts[40:])], fit=False)
        queries = clf.embedder.encode(["topic 3", "item number 12"])
        before = clf.memory.neighbours(queries, 5), clf.memory.retrieve_labels(queries, 3)
    assert (tmp_path / "store" / EXAMPLES_FILE).exists()
    assert (tmp_path / "store" / LABELS_FILE).exists()
    with ContinualClassifier.open(tmp_path / "store") as clf:
        assert clf.memory.index.kind == "hnsw" and clf.memory.index.size == 60
        after = clf.memory.neighbours(queries, 5), clf.memory.retrieve_labels(queries, 3)
    for (s0, r0), (s1, r1) in zip(before, after, strict=True):
        np.testing.assert_array_equal(r0, r1)
        np.testing.assert_allclose(s0, s1, rtol=1e-6)


@pytest.mark.gpu
def test_on_gpus_the_index_is_exact_at_any_size() -> None:
    if gpu_count() == 0:
        pytest.skip("needs faiss-gpu and a CUDA GPU (pip install icl-cl[gpu])")
    vectors = _unit(5000, dim=64)
    gpu, cpu = ExampleIndex(64, exact_max=100), ExampleIndex(64, exact_max=10**9, use_gpu=False)
    gpu.add(vectors)
    cpu.add(vectors)
    assert gpu.kind == "flat-gpu"
    sims_gpu, rows_gpu = gpu.search(vectors[:50], 10)
    sims_cpu, _ = cpu.search(vectors[:50], 10)
    np.testing.assert_array_equal(rows_gpu[:, 0], np.arange(50))
    np.testing.assert_allclose(sims_gpu, sims_cpu, rtol=1e-4, atol=1e-5)
