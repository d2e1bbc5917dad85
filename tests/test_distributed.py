"""Distributed predict and learn on a local Ray (one per module: Ray starts slowly on 2 cores).

The merge of partial statistics is also checked without Ray, against learning the union.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig
from icl_cl.errors import DataError, WorkerError
from icl_cl.inputs import read_examples
from icl_cl.memory.feature_space import FeatureSpace, SpaceKind, Strength
from icl_cl.memory.item_groups import Additions
from icl_cl.memory.partial import merge, shard_space_statistics, shard_statistics
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.statistics import RunningStatistics
from icl_cl.memory.store import Store
from icl_cl.types import Prediction
from tests.conftest import SAMPLES

WORDNET = SAMPLES / "wordnet-sample"
K = 5


# ---- the merge, without Ray ---------------------------------------------------------------------


def test_merged_shards_equal_the_delta_of_their_union() -> None:
    rng = np.random.default_rng(0)
    dim, names = 6, [f"l{i}" for i in range(7)]
    base = RunningStatistics(dim)
    base.apply(base.delta(rng.normal(size=(5, dim)), [["l3"], ["l0"], ["l3"], ["l5"], ["l0"]]))
    shards = []
    for n in (4, 9, 1, 6):
        labels = [list(rng.choice(names, size=rng.integers(1, 3), replace=False)) for _ in range(n)]
        shards.append((rng.normal(size=(n, dim)), labels))
    whole = base.delta(np.vstack([v for v, _ in shards]), [labs for _, ls in shards for labs in ls])
    merged = merge([shard_statistics(dim, v, ls) for v, ls in shards], base)
    assert merged.new_labels == whole.new_labels
    np.testing.assert_array_equal(merged.cols, whole.cols)
    np.testing.assert_array_equal(merged.counts, whole.counts)
    np.testing.assert_allclose(merged.sums, whole.sums, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.gram, whole.gram, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merged.weighted_gram, whole.weighted_gram, rtol=1e-12, atol=1e-12)
    assert merged.n_examples == whole.n_examples


@pytest.mark.parametrize(
    ("kind", "multi_label"), [("ridge", False), ("lda", False), ("lda", True), ("ridge", True)]
)
def test_shards_summed_in_a_feature_map_equal_adding_their_rows(
    kind: SpaceKind, multi_label: bool
) -> None:
    """Workers' sums (label sums and the Gram, ranpac's of ``[phi, 1]``, klda's weighted by label
    count in a multi-label store) taken in one solve equal the row-by-row update."""
    rng = np.random.default_rng(1)
    dim, names = 8, [f"l{i}" for i in range(5)]

    def labels(n: int) -> list[list[str]]:
        size = 2 if multi_label else 1
        return [list(rng.choice(names[:4], size=size, replace=False)) for _ in range(n)]

    features = RandomFeatures("rff" if kind == "lda" else "relu", dim, 256, 0, 1.0)
    stored, stored_labels = rng.normal(size=(30, dim)), labels(30)
    spaces = [
        FeatureSpace.build(
            kind, features, labels=names[:4], vectors=stored, row_labels=stored_labels,
            inputs=[None] * 30, items=multi_label, strength=lambda space, gram: Strength(0.5, 1.0),
        )
        for _ in range(2)
    ]  # fmt: skip
    shards = [(rng.normal(size=(n, dim)), labels(n)) for n in (7, 12, 5)]
    shards[1][1][3] = ["l4"]  # a label new to the store
    vectors = np.vstack([v for v, _ in shards])
    added = Additions(vectors, [ls for _, part in shards for ls in part], np.ones(24, bool), True)
    weighted = kind == "lda" and multi_label
    parts = [shard_space_statistics(features, weighted, v, ls) for v, ls in shards]
    rows, summed = spaces[0], spaces[1]
    rows.apply(rows.delta(added), 24)
    summed.apply(summed.summed_delta(parts, added), 24)
    assert summed.stats.labels == rows.stats.labels == [*names[:4], "l4"]
    np.testing.assert_array_equal(summed.stats.counts, rows.stats.counts)
    np.testing.assert_allclose(summed.stats.sums, rows.stats.sums, rtol=1e-12, atol=1e-12)
    scale = np.abs(rows.solver.inverse).max()
    assert np.abs(summed.solver.inverse - rows.solver.inverse).max() <= 1e-9 * scale
    assert summed.rows == rows.rows == 54


# ---- on a local Ray ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray = pytest.importorskip("ray")
    from icl_cl.distributed import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store learned in process from the WordNet sample, its heads fitted."""
    path = tmp_path_factory.mktemp("distributed") / "store"
    examples, _ = read_examples(WORDNET / "train.jsonl", max_chars=10_000)
    with ContinualClassifier.open(path) as clf:
        clf.learn(examples, k=K)
    return path


def _test_items() -> list[dict[str, str]]:
    lines = (WORDNET / "test.jsonl").read_text(encoding="utf-8").splitlines()
    return [{"id": o["id"], "text": o["text"]} for o in map(json.loads, lines)]


def _ray_predictions(store: Path, **options: object) -> list[dict]:
    from icl_cl.distributed import predict, read_inputs

    dataset = read_inputs(WORDNET / "test.jsonl")
    rows = predict(dataset, store=store, k=K, use_llm=False, **options).take_all()
    return [json.loads(r["prediction"]) for r in rows]


class _Killer:
    """Kills (SIGKILL) the first process of this test's Ray whose title contains ``title``.

    Ray titles a worker ``ray::Class.method`` only while it runs that method, so a title naming the
    method finds a worker mid-task, never an idle actor an earlier test's ``ray.kill`` is still
    tearing down.
    """

    def __init__(self, title: str, timeout: float = 120.0) -> None:
        self.title, self.killed = title, None
        self._deadline = time.monotonic() + timeout
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        me = psutil.Process()
        while self.killed is None and time.monotonic() < self._deadline:
            for proc in me.children(recursive=True):  # only the Ray this test started
                try:
                    if self.title in " ".join(proc.cmdline()):
                        os.kill(proc.pid, signal.SIGKILL)
                        self.killed = proc.pid
                        return
                except (OSError, psutil.Error):
                    continue
            time.sleep(0.05)

    def join(self) -> None:
        self._deadline = 0.0
        self._thread.join(timeout=10)


def _assert_same(remote: dict, local: Prediction, tolerance: float) -> None:
    assert remote["labels"] == list(local.labels)
    assert remote["scores"].keys() == local.scores.keys()
    for label, score in local.scores.items():
        assert remote["scores"][label] == pytest.approx(score, abs=tolerance)


def test_ray_predict_equals_in_process_predict(local_ray: None, store: Path) -> None:
    """Exact when each Ray batch is the batch predicted in process (one block per batch)."""
    import ray

    from icl_cl.distributed import predict

    items, size = _test_items(), 16
    with ContinualClassifier.open(store) as clf:
        local = [
            p
            for i in range(0, len(items), size)
            for p in clf.predict([x["text"] for x in items[i : i + size]], k=K, use_llm=False)
        ]
    dataset = ray.data.from_items(items, override_num_blocks=len(items) // size)
    rows = predict(dataset, store=store, k=K, use_llm=False, actors=2, batch_size=size).take_all()
    by_id = {r["id"]: json.loads(r["prediction"]) for r in rows}
    assert sorted(by_id) == sorted(i["id"] for i in items)
    for item, pred in zip(items, local, strict=True):
        _assert_same(by_id[item["id"]], pred, 1e-6)


def test_ray_predict_of_a_file_agrees_whatever_the_batches(local_ray: None, store: Path) -> None:
    """Other batches pad texts differently: the embedder's float32 rounding (about 1e-7 per
    coordinate) then moves probabilities by up to about 1e-5, never a label here."""
    items = _test_items()
    with ContinualClassifier.open(store) as clf:
        local = clf.predict([i["text"] for i in items], k=K, use_llm=False)
    by_id = {p["id"]: p for p in _ray_predictions(store, actors=2, batch_size=16)}
    assert sorted(by_id) == sorted(i["id"] for i in items)
    for item, pred in zip(items, local, strict=True):
        _assert_same(by_id[item["id"]], pred, 1e-4)


def test_a_predict_worker_killed_mid_run_is_retried_without_loss(
    local_ray: None, store: Path
) -> None:
    killer = _Killer("MapBatches(Predictor)).submit")
    try:
        predictions = _ray_predictions(store, actors=2, batch_size=4)
    finally:
        killer.join()
    assert killer.killed is not None, "no predicting worker was seen running"
    ids = [p["id"] for p in predictions]
    assert len(ids) == len(set(ids))  # nothing duplicated
    assert sorted(ids) == sorted(i["id"] for i in _test_items())  # nothing lost


def _write_shards(folder: Path, n: int = 4) -> list[str]:
    """The sample's training lines split into ``n`` JSONL shards, in order."""
    lines = (WORDNET / "train.jsonl").read_text(encoding="utf-8").splitlines()
    folder.mkdir(parents=True)
    size = -(-len(lines) // n)
    for s in range(n):
        chunk = lines[s * size : (s + 1) * size]
        (folder / f"part-{s}.jsonl").write_text("\n".join(chunk) + "\n", encoding="utf-8")
    return lines


def test_ray_learn_of_four_shards_equals_serial_learn(local_ray: None, tmp_path: Path) -> None:
    from icl_cl.distributed import learn

    _write_shards(tmp_path / "shards")
    examples, _ = read_examples(WORDNET / "train.jsonl", max_chars=10_000)
    with ContinualClassifier.open(tmp_path / "serial") as clf:
        # One in-process session per shard: each is embedded in the same call as a worker
        # embeds its shard (an embedding's float32 rounding depends on the texts padded with
        # it), and its statistics are added by the ECL itself, with no merge.
        size = -(-len(examples) // 4)
        for i in range(0, len(examples), size):
            clf.learn(examples[i : i + size], fit=False)
    report = learn(tmp_path / "shards", tmp_path / "ray", actors=2, fit=False)
    assert (report.session, report.n_examples) == (1, len(examples))

    stores = [Store.open(tmp_path / name) for name in ("serial", "ray")]
    (serial, serial_labels, _), (ray_, ray_labels, _) = [s.load_statistics() for s in stores]
    assert [lab.label for lab in ray_labels] == [lab.label for lab in serial_labels]
    np.testing.assert_array_equal(ray_.counts, serial.counts)
    for name in ("sums", "gram", "weighted_gram"):
        a, b = getattr(ray_, name), getattr(serial, name)
        assert np.abs(a - b).max() <= 1e-9 * np.abs(b).max(), name
    np.testing.assert_array_equal(stores[1].load_vectors(), stores[0].load_vectors())
    assert [ex.id for ex in stores[1].examples(range(len(examples)))] == [ex.id for ex in examples]
    for s in stores:
        s.close()

    texts = [i["text"] for i in _test_items()]
    predictions = []
    for name in ("serial", "ray"):
        with ContinualClassifier.open(tmp_path / name) as clf:
            predictions.append(clf.predict(texts, k=K, use_llm=False))
    for a, b in zip(*predictions, strict=True):
        assert a.labels == b.labels
        assert a.scores == pytest.approx(b.scores, rel=1e-9, abs=1e-12)


def test_ray_learn_sums_the_feature_maps_on_workers(
    local_ray: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A session of at least half a store's feature width (M = 256 here) is summed in each kept
    feature map on the workers and taken in one solve: the same scores as a serial learn."""
    from icl_cl.distributed import learn

    config = ClassifierConfig(memory={"ranpac_features": 256, "klda_features": 256})
    examples, _ = read_examples(WORDNET / "train.jsonl", max_chars=10_000)
    lines = (WORDNET / "train.jsonl").read_text(encoding="utf-8").splitlines()[40:]
    (tmp_path / "shards").mkdir()
    for s in range(4):
        part = lines[s * 50 : (s + 1) * 50]
        (tmp_path / "shards" / f"part-{s}.jsonl").write_text("\n".join(part) + "\n")
    for name in ("serial", "ray"):
        with ContinualClassifier.open(tmp_path / name, config) as clf:
            clf.learn(examples[:40], fit=False)
            for scorer in ("ranpac", "klda"):  # their states are saved by the fit
                clf.fit(K, scorer=scorer, use_llm=False)
    with ContinualClassifier.open(tmp_path / "serial") as clf:
        clf.learn(examples[40:240], fit=False)
    with caplog.at_level(logging.INFO, logger="icl_cl.memory.store_feature_spaces"):
        learn(tmp_path / "shards", tmp_path / "ray", actors=2, fit=False)
    summed = [r.getMessage() for r in caplog.records if "summed on workers" in r.getMessage()]
    assert len(summed) == 2, summed

    texts = [i["text"] for i in _test_items()]
    for scorer in ("ranpac", "klda"):
        predictions = []
        for name in ("serial", "ray"):
            with ContinualClassifier.open(tmp_path / name) as clf:
                predictions.append(clf.predict(texts, k=K, use_llm=False, scorer=scorer))
        for a, b in zip(*predictions, strict=True):
            assert a.labels == b.labels
            # The inverses agree to 1e-15; predict reads float32 solved weights, whose roundings
            # can differ in the last bit.
            assert a.scores == pytest.approx(b.scores, rel=1e-4, abs=1e-6)


def _state(path: Path) -> tuple[int, int, list[int]]:
    store = Store.open(path)
    try:
        stats, _, _ = store.load_statistics()
        return len(store.sessions()), store.n_examples(), stats.counts.tolist()
    finally:
        store.close()


@pytest.fixture
def learned_once(tmp_path: Path) -> Path:
    """A store with one session (the first 20 training examples)."""
    examples, _ = read_examples(WORDNET / "train.jsonl", max_chars=10_000)
    with ContinualClassifier.open(tmp_path / "store") as clf:
        clf.learn(examples[:20], fit=False)
    lines = (WORDNET / "train.jsonl").read_text(encoding="utf-8").splitlines()[20:]
    (tmp_path / "shards").mkdir()
    for s in range(4):
        part = lines[s * 55 : (s + 1) * 55]
        (tmp_path / "shards" / f"part-{s}.jsonl").write_text("\n".join(part) + "\n")
    return tmp_path


def test_bad_input_in_one_shard_fails_the_session(local_ray: None, learned_once: Path) -> None:
    from icl_cl.distributed import learn

    shard = learned_once / "shards" / "part-2.jsonl"
    lines = shard.read_text().splitlines()
    lines[4] = json.dumps({"id": "bad", "text": "   ", "labels": ["noun.animal"]})
    shard.write_text("\n".join(lines) + "\n")
    before = _state(learned_once / "store")
    with pytest.raises(DataError) as err:
        learn(learned_once / "shards", learned_once / "store", actors=2, fit=False)
    assert (err.value.source, err.value.line, err.value.field) == (str(shard), 5, "text")
    assert _state(learned_once / "store") == before


def test_an_id_in_two_shards_fails_the_session(local_ray: None, learned_once: Path) -> None:
    from icl_cl.distributed import learn

    first = json.loads((learned_once / "shards" / "part-0.jsonl").read_text().splitlines()[0])
    shard = learned_once / "shards" / "part-3.jsonl"
    shard.write_text(shard.read_text() + json.dumps(first) + "\n")
    before = _state(learned_once / "store")
    with pytest.raises(DataError, match="duplicate id") as err:
        learn(learned_once / "shards", learned_once / "store", actors=2, fit=False)
    assert err.value.source == str(shard)
    assert _state(learned_once / "store") == before


def test_a_learn_worker_killed_leaves_the_store_at_its_last_session(
    local_ray: None, learned_once: Path
) -> None:
    from icl_cl.distributed import learn

    # Shards long enough (4 x 1,000 texts) that the workers are still embedding when the killer,
    # polling every 50 ms, finds one; with the fixture's 55-line shards a loaded machine could
    # finish the learn first.
    examples, _ = read_examples(WORDNET / "train.jsonl", max_chars=10_000)
    long_shards = learned_once / "long-shards"
    long_shards.mkdir()
    for s in range(4):
        rows = (examples[(s * 1000 + i) % len(examples)] for i in range(1000))
        lines = (
            json.dumps({"id": f"s{s}-{i}", "text": f"{ex.text} ({s}.{i})", "labels": ex.labels})
            for i, ex in enumerate(rows)
        )
        (long_shards / f"part-{s}.jsonl").write_text("\n".join(lines) + "\n")
    before = _state(learned_once / "store")
    killer = _Killer("ray::ShardLearner.learn")
    try:
        with pytest.raises(WorkerError, match="died"):
            learn(long_shards, learned_once / "store", actors=2, fit=False)
    finally:
        killer.join()
    assert killer.killed is not None
    assert _state(learned_once / "store") == before
    with ContinualClassifier.open(learned_once / "store") as clf:  # still readable
        assert clf.memory.n_examples == 20


def test_cli_learns_and_predicts_with_the_ray_engine(
    local_ray: None, learned_once: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--engine ray`` from a folder of shards, then from Parquet into one file and a folder;
    the same labels as the local engine."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from icl_cl.cli import main

    store, shards = str(learned_once / "store"), str(learned_once / "shards")
    assert main(["learn", "-q", "--engine", "ray", "--store", store, "--data", shards]) == 0
    assert json.loads(capsys.readouterr().out)["session"] == 2
    items = _test_items()
    pq.write_table(pa.Table.from_pylist(items), learned_once / "inputs.parquet")
    local = learned_once / "local.jsonl"
    common = ["predict", "-q", "--store", store, "--no-llm", "--k", str(K)]
    assert main([*common, "--input", str(WORDNET / "test.jsonl"), "--output", str(local)]) == 0
    for out in ("ray.jsonl", "ray-parts"):
        args = [
            "--engine",
            "ray",
            "--batch-size",
            "32",
            "--input",
            str(learned_once / "inputs.parquet"),
        ]
        assert main([*common, *args, "--output", str(learned_once / out)]) == 0
    expected = [json.loads(line) for line in local.read_text().splitlines()]
    single = [json.loads(line) for line in (learned_once / "ray.jsonl").read_text().splitlines()]
    assert [r["id"] for r in single] == [i["id"] for i in items]  # one file keeps input order
    parts = sorted((learned_once / "ray-parts").glob("part-*.jsonl"))
    sharded = [json.loads(line) for p in parts for line in p.read_text().splitlines()]
    assert len(parts) > 1
    for rows in (single, sharded):
        labels = {r["id"]: r["labels"] for r in rows}
        assert labels == {r["id"]: r["labels"] for r in expected}
