"""Shared fixtures. Tests run offline against the real packaged embedder, FAISS and SQLite."""

from __future__ import annotations

import dataclasses
import os
import sys
import types

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path
from typing import Any

import pytest

from icl_cl.config import EmbedderConfig
from icl_cl.embedding import load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.inputs import read_examples, read_labels
from icl_cl.types import Example, Label

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "eval" / "data"


@pytest.fixture(scope="session")
def embedder() -> CachedEmbedder:
    """The real default embedder (all-MiniLM-L6-v2 from its package), shared and cached by text."""
    return CachedEmbedder(load_embedder(EmbedderConfig()))


@pytest.fixture(scope="session")
def wordnet() -> tuple[list[Example], list[Example], list[Label]]:
    train, _ = read_examples(SAMPLES / "wordnet-sample" / "train.jsonl", max_chars=10_000)
    test, _ = read_examples(SAMPLES / "wordnet-sample" / "test.jsonl", max_chars=10_000)
    labels, _ = read_labels(SAMPLES / "wordnet-sample" / "labels.jsonl")
    return train, test, labels


@pytest.fixture(scope="session")
def debtags() -> tuple[list[Example], list[Example], list[Label]]:
    train, _ = read_examples(SAMPLES / "debtags-sample" / "train.jsonl", max_chars=10_000)
    test, _ = read_examples(SAMPLES / "debtags-sample" / "test.jsonl", max_chars=10_000)
    labels, _ = read_labels(SAMPLES / "debtags-sample" / "labels.jsonl")
    return train, test, labels


@pytest.fixture
def stand_in_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """Just the names the backend takes from vllm: SamplingParams and StructuredOutputsParams."""

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)

    @dataclasses.dataclass
    class StructuredOutputsParams:
        choice: list[str] | None = None
        regex: str | None = None

    vllm = types.ModuleType("vllm")
    submodule = types.ModuleType("vllm.sampling_params")
    submodule.StructuredOutputsParams = StructuredOutputsParams  # type: ignore[attr-defined]
    vllm.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    vllm.sampling_params = submodule  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", submodule)
    return vllm
