"""Infer-Retrieve-Rank: query parsing, label retrieval (flat and HNSW, growing with sessions),
and every combination of its step switches through predict, on the real embedder and FAISS with
a tiny random-weight LLM."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from icl_cl import ClassifierConfig, ContinualClassifier
from icl_cl.candidates import InferRetrieveRank, parse_queries, reciprocal_rank_fusion
from icl_cl.config import FusionConfig, IRRConfig, LLMConfig, MemoryConfig
from icl_cl.errors import ConfigError, DataError
from icl_cl.types import Label
from tests.tiny_models import tiny_backend

WORDS = "audio music player video editor game python library tags : , text image".split()


def test_queries_are_parsed_from_free_text():
    text = 'Tags: audio player, "Music"; GTK\n- 1. video editor\n* audio player,, , music.'
    assert parse_queries(text, 8) == ["audio player", "Music", "GTK", "video editor"]
    assert parse_queries("a, b, c, d", 2) == ["a", "b"]
    assert parse_queries("  \n , ;", 5) == []
    long = "word " * 40
    assert len(parse_queries(long, 3)[0]) <= 60


def test_reciprocal_rank_fusion_by_hand():
    fused = reciprocal_rank_fusion([[("a", 0.9), ("b", 0.5)], [("b", 3.0), ("c", 1.0)]])
    # b: 1/62 + 1/61; a: 1/61; c: 1/62.
    assert [label for label, _ in fused] == ["b", "a", "c"]
    assert fused[0][1] == pytest.approx(1 / 62 + 1 / 61)


class CountingEmbedder:
    """The real embedder, counting what it is asked to embed."""

    reads_images = False

    def __init__(self, inner):
        self.inner, self.texts = inner, []
        self.dim, self.name = inner.dim, inner.name

    def encode(self, texts, progress=None):
        self.texts += list(texts)
        return self.inner.encode(texts, progress=progress)


def test_new_labels_are_retrievable_at_once_without_embedding_old_ones(tmp_path, embedder, debtags):
    train, _, labels = debtags
    counting = CountingEmbedder(embedder)
    clf = ContinualClassifier.open(tmp_path / "s", ClassifierConfig(), embedder=counting)
    clf.learn(train, labels)
    query = embedder.encode(["simulate the physics of quarks and gluons"])
    clf.memory.retrieve_labels(query, 3)  # builds the label index
    counting.texts.clear()
    new = Label("science::qcd", "Quantum chromodynamics", "simulation of quarks and gluons")
    report = clf.learn([], [new])  # a session that only declares a label
    assert report.n_examples == 0 and report.new_labels == ("science::qcd",)
    assert counting.texts == [new.text]  # only the new label was embedded
    _, cols = clf.memory.retrieve_labels(query, 3)
    assert clf.memory.labels[cols[0][0]].label == "science::qcd"
    clf.close()
    # Reopened: the index is rebuilt from stored vectors, still without embedding any label.
    counting.texts.clear()
    clf = ContinualClassifier.open(tmp_path / "s", embedder=counting)
    _, cols = clf.memory.retrieve_labels(query, 3)
    assert clf.memory.labels[cols[0][0]].label == "science::qcd" and counting.texts == []
    with pytest.raises(DataError, match="nothing to learn"):
        clf.learn([], [new])
    clf.close()


def test_hnsw_label_index_above_the_size_limit_agrees_with_flat(tmp_path, embedder, debtags):
    train, test, labels = debtags
    clf = ContinualClassifier.open(tmp_path / "s", ClassifierConfig(), embedder=embedder)
    clf.learn(train, labels)
    clf.close()
    queries = embedder.encode([ex.text for ex in test[:20]])
    found = {}
    for limit in (10_000, 10):
        clf = ContinualClassifier.open(
            tmp_path / "s", memory=MemoryConfig(label_exact_search_max=limit), embedder=embedder
        )
        _, found[limit] = clf.memory.retrieve_labels(queries, 5)
        assert clf.memory.label_set.index().kind == ("flat" if limit > len(labels) else "hnsw")
        clf.close()
    overlap = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(found[10_000], found[10], strict=True)]
    )
    assert overlap >= 0.9


@pytest.fixture(scope="module")
def tiny_llm():
    return tiny_backend(seed=5, words=WORDS, context=1024)


@pytest.fixture(scope="module")
def tag_store(tmp_path_factory, embedder, debtags):
    train, _, labels = debtags
    path = tmp_path_factory.mktemp("irr") / "s"
    with ContinualClassifier.open(path, ClassifierConfig(), embedder=embedder) as clf:
        clf.learn(train, labels, fit=False)  # each test fits for its Infer-Retrieve-Rank steps
    return path


SWITCHES = list(itertools.product([False, True], repeat=4))


@pytest.mark.parametrize(("infer", "retrieve", "ecl", "rank"), SWITCHES)
def test_every_combination_of_steps_runs(
    tag_store, embedder, debtags, tiny_llm, infer, retrieve, ecl, rank
):
    _, test, labels = debtags
    irr = IRRConfig(infer=infer, retrieve=retrieve, ecl=ecl, rank=rank, max_query_tokens=8)
    config = ClassifierConfig(llm=LLMConfig(), irr=irr, fusion=FusionConfig(heldout=12))
    clf = ContinualClassifier.open(tag_store, config, embedder=embedder, backend=tiny_llm)
    texts = [ex.text for ex in test[:3]]
    preds = clf.predict(texts, k=6)
    known = {lab.label for lab in labels}
    for p in preds:
        assert 1 <= len(p.candidates) <= 6 and p.labels
        assert {c.label for c in p.candidates} <= known and set(p.labels) <= known
        assert all(0 <= v <= 1 for v in p.scores.values())
        queries, tokens = p.evidence.irr_queries, p.evidence.irr_infer_tokens
        assert (len(queries) > 0) <= infer  # no queries without the infer step
        assert tokens > 0 if infer else tokens == 0
        if not rank:
            assert all(c.llm_score is None for c in p.candidates)
    clf.close()


def test_rank_scores_only_the_retrieved_labels(tag_store, embedder, debtags, tiny_llm):
    _, test, _ = debtags
    config = ClassifierConfig(
        llm=LLMConfig(), irr=IRRConfig(max_query_tokens=8), fusion=FusionConfig(heldout=12)
    )
    clf = ContinualClassifier.open(tag_store, config, embedder=embedder, backend=tiny_llm)
    irr = InferRetrieveRank(
        clf.memory, embedder, config.irr, lambda vectors, k: [], backend=clf.backend()
    )
    vectors = embedder.encode([test[0].text])
    found = irr.candidates([test[0].text], vectors, 5)
    ranked, inferred = found.ranked, found.inferred
    reading = clf.reader().read([test[0].text], vectors, [[lab for lab, _ in ranked[0]]])
    assert reading.readings[0].prompt.labels == [lab for lab, _ in ranked[0]]
    assert len(inferred.queries[0]) <= config.irr.max_queries
    clf.close()


def test_infer_or_rank_without_an_llm_is_refused():
    with pytest.raises(ConfigError, match="need an LLM"):
        ClassifierConfig.from_dict({"irr": {}})
    ClassifierConfig.from_dict({"irr": {"infer": False, "rank": False}})
