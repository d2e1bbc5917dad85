"""The evaluation harness: every method kind, Hugging Face datasets offline, config errors.

The LLM is a tiny random-weight Llama (real transformers code paths, fast); the embedder, FAISS
and SQLite are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from icl_cl.classifier import ContinualClassifier
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.errors import ConfigError
from icl_cl.evaluation.datasets import DatasetSpec, load_dataset
from icl_cl.evaluation.llm_pool import SharedBackend
from icl_cl.evaluation.outputs import Decision
from icl_cl.evaluation.protocol import EvalConfig, TrainCounts, run_protocol, score_decisions
from icl_cl.evaluation.rag_icl import _map_answer, answer_parts
from icl_cl.evaluation.report import write_report
from icl_cl.evaluation.sessions import SessionSpec, split_sessions
from icl_cl.types import Example, Label
from tests.conftest import SAMPLES
from tests.tiny_models import tiny_backend

LABEL_WORDS = "noun verb adj . animal plant food artifact person motion communication all".split()


@pytest.fixture(scope="module")
def tiny():
    return tiny_backend(seed=3, words=LABEL_WORDS, context=512)


def factory(tiny):
    """Every LLM config gets the tiny model; the pool must not close it (other tests use it)."""
    return lambda llm: SharedBackend(tiny)


def eval_config(methods: list[dict[str, Any]], dataset: str = "wordnet-sample", **extra: Any):
    return EvalConfig.from_dict(
        {
            "name": "t",
            "dataset": {"path": str(SAMPLES / dataset), "test_file": "test.jsonl", "max_test": 40},
            "sessions": {"by": "random", "n": 2, "seed": 0},
            "k": 3,
            "classifier": {
                "llm": {"backend": "transformers", "model": "tiny-random"},
                "fusion": {"heldout": 10},
                "prompt": {"n_demonstrations": 2, "label_presentation": "names"},
            },
            "methods": methods,
            "joint_check": False,
            **extra,
        }
    )


ALL_KINDS = [
    {"name": "ecl", "scorer": "mahalanobis", "max_test": 12},
    {"name": "inca", "kind": "inca", "scorer": "mahalanobis", "max_test": 12},
    {"name": "zero-shot", "kind": "zero_shot", "max_test": 12},
    {"name": "rag", "kind": "rag_icl", "n_demonstrations": 4, "context_budget": 300},
]


def test_every_method_kind_reports_quality_and_cost(tmp_path, embedder, tiny):
    config = eval_config(ALL_KINDS, llm_max_test=10)
    results = run_protocol(config, tmp_path, embedder=embedder, backend_factory=factory(tiny))
    methods = results["methods"]
    for name, m in methods.items():
        assert [s["session"] for s in m["stages"]] == [1, 2], name
        for stage in m["stages"]:
            assert 0.0 <= stage["accuracy"] <= 1.0 and 0.0 <= stage["recall@3"] <= 1.0
            assert stage["seconds_per_item"] > 0
    # Budgets: the method's own max_test, else the protocol's llm_max_test for LLM methods.
    assert [s["n_test"] for s in methods["inca"]["stages"]] == [12, 12]
    assert [s["n_test"] for s in methods["rag"]["stages"]] == [10, 10]
    ecl, inca = methods["ecl"]["stages"], methods["inca"]["stages"]
    assert all(s["prompt_tokens_per_item"] == 0 and s["llm_calls_per_item"] == 0 for s in ecl)
    # Calibrated methods report ECE and the coverage and size of their 90% conformal sets.
    for stage in ecl + inca:
        assert 0.0 <= stage["ece"] <= 1.0 and 0.0 <= stage["coverage"] <= 1.0
        assert 0.0 <= stage["set_size"] <= 3
    assert all("ece" not in s for s in methods["rag"]["stages"])  # free text: no probabilities
    for name in ("inca", "zero-shot", "rag"):
        for stage in methods[name]["stages"]:
            assert stage["prompt_tokens_per_item"] > 0 and stage["llm_calls_per_item"] == 1.0
    assert all(s["completion_tokens_per_item"] > 0 for s in methods["rag"]["stages"])
    assert all(s["completion_tokens_per_item"] == 0 for s in inca)  # options are scored
    for e, i in zip(ecl, inca, strict=True):
        # Same seeded items and scorer: InCA's ECL-alone variant is the ECL method's result.
        assert i["ecl_accuracy"] == e["accuracy"]
        assert 0.0 <= i["llm_accuracy"] <= 1.0 and i["fit_llm_calls"] >= 10
        if i["fusion_llm_weight"] == 0:  # the weak model earns no weight: fused = ECL
            assert i["accuracy"] == e["accuracy"]
    # Zero-shot lists every seen label: twice the labels after session 2, longer prompts.
    zs = methods["zero-shot"]["stages"]
    assert zs[0]["labels_seen"] < zs[1]["labels_seen"]
    assert zs[1]["prompt_tokens_per_item"] > zs[0]["prompt_tokens_per_item"]
    assert results["llm_usage"]["requests"] > 0

    files = write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    for name in methods:
        assert f"| {name} |" in report
    assert "prompt_tokens_per_item" in report and "llm_accuracy" in report
    for png in ("per_session.png", "quality_vs_tokens.png"):
        assert (tmp_path / png) in files
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_multi_label_methods_report_ranking_metrics(tmp_path, embedder, tiny):
    config = eval_config(
        [
            {"name": "ecl"},
            {"name": "inca", "kind": "inca", "max_test": 8},
            {"name": "irr-ecl", "kind": "irr", "max_test": 6, "irr": {"ecl": True}},
        ],
        dataset="debtags-sample",
    )
    results = run_protocol(config, tmp_path, embedder=embedder, backend_factory=factory(tiny))
    assert results["dataset"]["multi_label"] and results["headline"] == "rp@5"
    irr = results["methods"]["irr-ecl"]["stages"][-1]
    for key in ("rp@5", "micro_f1", "map", "ece"):
        assert 0.0 <= irr[key] <= 1.0, key
    # Its infer step generates queries, so it costs prompt and completion tokens per item.
    assert irr["prompt_tokens_per_item"] > 0 and irr["completion_tokens_per_item"] > 0
    last = results["methods"]["inca"]["stages"][-1]
    for key in (
        "rp@5",
        "rp@10",
        "p@5",
        "micro_f1",
        "macro_f1",
        "map",
        "recall@3",
        "llm_rp@5",
        "ece",
    ):
        assert 0.0 <= last[key] <= 1.0, key
    assert last["n_test"] == 8 and last["prompt_tokens_per_item"] > 0
    assert results["methods"]["ecl"]["summary"]["n_test"] > 8


def test_rag_answers_map_to_the_nearest_label_name(embedder):
    names = ["noun.animal", "verb.motion", "noun.food"]
    vectors = embedder.encode(names)
    parts = ["noun.animal"]
    d = _map_answer(parts, dict(zip(parts, embedder.encode(parts), strict=True)), names, vectors)
    assert d.labels == ("noun.animal",) and d.ranking[0] == "noun.animal" and len(d.ranking) == 3
    assert answer_parts(" food, animal.\nmore", multi_label=True) == ["food", "animal", "more"]
    assert answer_parts(" food, animal.\nmore", multi_label=False) == ["food, animal"]
    parts = ["foods", "moving"]
    d = _map_answer(parts, dict(zip(parts, embedder.encode(parts), strict=True)), names, vectors)
    assert set(d.labels) == {"noun.food", "verb.motion"}
    assert _map_answer([], {}, names, vectors).labels == ()


# ---- Hugging Face datasets, offline ---------------------------------------------------------


def _save_hf(tmp_path: Path, wordnet, multi: bool) -> Path:
    datasets = pytest.importorskip("datasets")
    train, test, labels = wordnet
    names = [lab.label for lab in labels]
    if multi:
        # Each item also carries the next label: a multi-label set of ClassLabel ids.
        def row(ex):
            i = names.index(ex.labels[0])
            return [i, (i + 1) % len(names)]

        feature = datasets.Sequence(datasets.ClassLabel(names=names))
    else:

        def row(ex):
            return names.index(ex.labels[0])

        feature = datasets.ClassLabel(names=names)
    features = datasets.Features({"sentence": datasets.Value("string"), "tag": feature})
    dd = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"sentence": [ex.text for ex in items], "tag": [row(ex) for ex in items]},
                features=features,
            )
            for split, items in (("train", train), ("validation", test))
        }
    )
    folder = tmp_path / "hf-set"
    dd.save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize("multi", [False, True])
def test_hf_dataset_saved_to_disk_runs_through_the_eval_config(tmp_path, embedder, wordnet, multi):
    _save_hf(tmp_path, wordnet, multi)
    config_path = tmp_path / "configs" / "hf.yaml"
    config_path.parent.mkdir()
    config_path.write_text(
        yaml.safe_dump(
            {
                "name": "hf",
                # Relative to the config file, like the shipped configs.
                "dataset": {
                    "hf": {
                        "name": "../hf-set",
                        "test_split": "validation",
                        "text": "sentence",
                        "label": "tag",
                    },
                },
                "sessions": {"by": "random", "n": 2},
                "k": 3,
                "methods": [{"name": "ecl-ncm", "scorer": "ncm"}],
                "joint_check": False,
            }
        )
    )
    config = EvalConfig.from_yaml(config_path)
    data = load_dataset(config.dataset, config_path.parent)
    train, test, labels = wordnet
    assert data.multi_label is multi and len(data.train) == len(train)
    assert [lab.label for lab in data.labels] == [lab.label for lab in labels]  # ClassLabel names
    assert data.train[0].labels[0] == train[0].labels[0] and data.test[0].text == test[0].text
    if multi:
        assert len(data.train[0].labels) == 2
    results = run_protocol(config, tmp_path / "run", config_path.parent, embedder=embedder)
    stage = results["methods"]["ecl-ncm"]["stages"][-1]
    assert results["dataset"]["labels"] == len(labels)
    assert stage["n_test"] == len(test) and 0 < stage[results["headline"]] <= 1


def test_hf_dataset_without_test_split_holds_out_a_seeded_share(tmp_path, wordnet):
    folder = _save_hf(tmp_path, wordnet, multi=False)
    hf = {
        "name": str(folder),
        "test_split": None,
        "test_fraction": 0.25,
        "text": "sentence",
        "label": "tag",
    }
    a = load_dataset(DatasetSpec(hf=hf))
    b = load_dataset(DatasetSpec(hf=hf))
    assert len(a.test) == round(len(wordnet[0]) * 0.25) and len(a.train) + len(a.test) == 240
    assert [ex.id for ex in a.test] == [ex.id for ex in b.test]
    assert not {ex.id for ex in a.train} & {ex.id for ex in a.test}
    with pytest.raises(ConfigError, match="no field 'txt'"):
        load_dataset(DatasetSpec(hf={**hf, "text": "txt"}))


# ---- configs and caches -------------------------------------------------------------------


def test_bad_method_configs_are_refused_with_the_method_named():
    with pytest.raises(ConfigError, match=r"'reader'.*needs an LLM"):
        EvalConfig.from_dict(
            {"name": "x", "dataset": {"path": "d"}, "methods": [{"name": "reader", "kind": "inca"}]}
        )
    with pytest.raises(ConfigError, match=r"'z'.*invalid override"):
        eval_config([{"name": "z", "kind": "zero_shot", "prompt": {"label_presentation": "x"}}])
    with pytest.raises(ConfigError, match="no field 'colour'"):
        eval_config([{"name": "c", "kind": "inca", "classifier": {"colour": "red"}}])
    with pytest.raises(ConfigError, match="unique"):
        eval_config([{"name": "a"}, {"name": "a", "scorer": "knn"}])
    with pytest.raises(ConfigError, match="kind"):
        eval_config([{"name": "a", "kind": "telepathy"}])


def test_disk_embedding_cache_survives_a_new_process(tmp_path, embedder):
    texts = ["a cat sat", "a dog ran", "a cat sat"]
    first = CachedEmbedder(embedder, tmp_path)
    vectors = first.encode(texts)
    assert first.misses == 2
    again = CachedEmbedder(embedder, tmp_path)
    assert again.missing(texts) == 0
    np.testing.assert_array_equal(again.encode(texts), vectors)
    assert again.misses == 0


def test_queries_go_through_the_stores_transform_as_in_predict(tmp_path, embedder, wordnet):
    """With a centred LLM view the stored vectors are centred by the store's frozen mean; the
    harness must score its test items through that same transform, as ``predict`` does."""
    config = EvalConfig.from_dict(
        {
            "name": "centred",
            "dataset": {"path": str(SAMPLES / "wordnet-sample"), "test_file": "test.jsonl"},
            "sessions": {"by": "random", "n": 2, "seed": 0},
            "k": 3,
            # The view's settings only decide the centring here: the embedder is the fixture's.
            "classifier": {"embedder": {"llm_view": {"centre": True}}},
            "methods": [{"name": "ecl", "scorer": "mahalanobis"}],
            "joint_check": False,
        }
    )
    results = run_protocol(config, tmp_path / "run", SAMPLES, embedder=embedder)
    stage = results["methods"]["ecl"]["stages"][-1]
    _, test, _ = wordnet
    store = tmp_path / "run" / "stores" / "incremental"
    with ContinualClassifier.open(store, config.classifier, embedder=embedder) as clf:
        preds = clf.predict([ex.text for ex in test], 3, scorer="mahalanobis", use_llm=False)
    accuracy = np.mean([p.labels[0] in ex.labels for p, ex in zip(preds, test, strict=True)])
    assert stage["n_test"] == len(test)
    assert stage["accuracy"] == pytest.approx(accuracy)


def test_group_sessions_define_the_labels_without_examples_of_their_group():
    labels = [
        Label("a", group="g1"),
        Label("b", group="g1"),
        Label("c", group="g2"),
        Label("d", group="g1"),  # no example: joins g1's session
        Label("e", group="g3"),  # no example, and no label of g3 has one: left out
    ]
    train = [Example("1", "x", ["a", "c"]), Example("2", "y", ["b"])]
    assert split_sessions(SessionSpec(by="group"), labels, train) == [["a", "b", "d"], ["c"]]
    random_split = split_sessions(SessionSpec(by="random", n=2), labels, train)
    assert sorted(lab for s in random_split for lab in s) == ["a", "b", "c"]


def test_long_tail_metrics_need_the_training_counts():
    gold = [Example("1", "x", ["a", "u"]), Example("2", "y", ["b"])]
    decisions = [
        Decision(("u",), ("u", "x", "a"), (0.9, 0.5, 0.4)),
        Decision(("c",), ("c", "b"), (0.9, 0.8)),
    ]
    plain = score_decisions(gold, decisions, True, 3)
    # P@1: 1/1 and 0/1; nDCG@5: item1 (1 + 1/2) / (1 + 1/log2(3)), item2 (1/log2(3)) / 1.
    d2 = 1 / np.log2(3)
    assert plain["p@1"] == pytest.approx(0.5)
    assert plain["ndcg@5"] == pytest.approx((1.5 / (1 + d2) + d2) / 2)
    assert "psp@5" not in plain and "unseen_recall@10" not in plain
    # u has no training example: found at rank 1, so its recall is 1. With b as frequent as a,
    # PSP@5 = (w_u + w_a + w_b) / (w_u + w_a + w_b) = 1: every gold label is in the top 5.
    tail = score_decisions(gold, decisions, True, 3, train=TrainCounts({"a": 4, "b": 4}, 10))
    assert tail["unseen_recall@10"] == 1.0 and tail["psp@5"] == pytest.approx(1.0)
    # Every gold label seen in training: no unseen recall; too few items: no propensity model.
    seen = score_decisions(gold, decisions, True, 3, train=TrainCounts({"a": 1, "b": 1, "u": 1}, 2))
    assert "unseen_recall@10" not in seen and "psp@5" not in seen


def test_multi_label_runs_report_the_long_tail_metrics(tmp_path, embedder):
    """debtags-sample declares tags that no training item carries: by group they are defined
    in their facet's session and stay in the test items' gold sets."""
    config = eval_config([{"name": "knn", "scorer": "knn"}], dataset="debtags-sample")
    config = config.model_copy(update={"sessions": SessionSpec(by="group")})
    results = run_protocol(config, tmp_path, embedder=embedder)
    train_tags = {lab for ex in load_dataset(config.dataset).train for lab in ex.labels}
    session_tags = {lab for s in results["sessions"] for lab in s}
    assert session_tags - train_tags, "tags without examples are in their group's session"
    last = results["methods"]["knn"]["stages"][-1]
    for key in ("p@1", "p@5", "rp@5", "ndcg@5", "psp@5", "unseen_recall@10"):
        assert 0.0 <= last[key] <= 1.0, key
    assert results["methods"]["knn"]["summary"]["psp@5"] == last["psp@5"]


def test_the_wordnet_hypernyms_config_asks_for_what_the_extreme_tagging_runs_need():
    config = EvalConfig.from_yaml(SAMPLES.parent / "configs" / "wordnet-hypernyms.yaml")
    assert config.sessions.by == "group" and config.joint_check
    # Every candidate source alone, the default path, and the LLM reading the shortlist.
    scorers = {m.scorer for m in config.methods if m.kind == "ecl"}  # type: ignore[union-attr]
    assert scorers == {"knn", "description", "ncm", "mahalanobis", "auto"}
    assert [m.kind for m in config.methods if m.kind != "ecl"] == ["inca"]
    # Relative to the config file, like every shipped config: never an absolute path.
    assert config.dataset.path == "../../../shared/datasets/wordnet-hypernyms"
