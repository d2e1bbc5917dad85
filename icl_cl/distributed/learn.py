"""Map-reduce learn: workers read, check and embed shards and sum their statistics (and, for a
large session, their sums in each kept random feature map); the driver merges the partial sums
and commits ONE session in one transaction.

Every shard is read and checked before anything is written, so bad input in any shard fails the
whole session (naming shard, line and field), and so does a worker that dies: the store stays at
its last committed session.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig, EmbedderConfig
from icl_cl.distributed.runtime import ray_module, unwrapped
from icl_cl.distributed.sources import input_files, iter_records
from icl_cl.errors import DataError, WorkerError
from icl_cl.inputs import Located, validate_examples
from icl_cl.inputs.jsonl import parse_example
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.partial import ShardSums, shard_space_statistics, shard_statistics
from icl_cl.memory.random_features import RandomFeatures
from icl_cl.memory.statistics import StatisticsDelta
from icl_cl.types import Example, Label, LearnReport, Progress

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """What a worker returns for one shard: its checked examples (with their lines), their
    vectors and the statistics they add, counted from zero."""

    source: str
    examples: list[Example]
    locations: list[Located]
    vectors: np.ndarray
    statistics: StatisticsDelta


def read_shard(path: str, max_chars: int) -> tuple[list[Example], list[Located]]:
    """A shard's examples, each checked as the in-process reader checks it (ids unique within
    the shard; across shards and against the store the driver checks them)."""
    examples, locations = [], []
    for line, obj in iter_records(path):
        examples.append(parse_example(obj, max_chars=max_chars, source=path, line=line))
        locations.append(Located(path, line))
    if not examples:
        raise DataError("no examples", source=path)
    validate_examples(examples, max_chars=max_chars, locations=locations)
    return examples, locations


class ShardLearner:
    """A worker: holds the store's embedder and turns shards into :class:`Shard` results.

    Args:
        embedder: The store's embedder config (as a dict, so that it travels to the worker).
        max_chars: The longest text accepted.
    """

    def __init__(self, embedder: dict[str, Any], max_chars: int) -> None:
        from icl_cl.embedding import load_embedder

        self._embedder = load_embedder(EmbedderConfig.model_validate(embedder))
        self._max_chars = max_chars

    def learn(self, path: str) -> Shard:
        examples, locations = read_shard(path, self._max_chars)
        vectors = self._embedder.encode([ex.item for ex in examples])
        statistics = shard_statistics(vectors.shape[1], vectors, [ex.labels for ex in examples])
        return Shard(path, examples, locations, vectors, statistics)


def map_shards(
    paths: Sequence[str],
    embedder: EmbedderConfig,
    max_chars: int,
    *,
    actors: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    progress: Progress | None = None,
) -> list[Shard]:
    """Every shard through a pool of :class:`ShardLearner` actors, results in shard order.

    A worker that dies fails the whole map (no retry: the session is rerun as a whole).
    """
    ray = ray_module()
    from ray.util import ActorPool

    remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0)(ShardLearner)
    config = embedder.model_dump(mode="json")
    workers = [remote.remote(config, max_chars) for _ in range(max(1, min(actors, len(paths))))]
    pool = ActorPool(workers)
    shards: list[Shard] = []
    try:
        for shard in pool.map(lambda actor, path: actor.learn.remote(path), list(paths)):
            shards.append(shard)
            if progress is not None:
                progress("shards embedded", len(shards), len(paths))
    except ray.exceptions.RayActorError as exc:
        raise WorkerError(
            f"a Ray worker died while learning ({len(shards)} of {len(paths)} shards were "
            f"done); nothing was committed: {exc}"
        ) from exc
    except ray.exceptions.RayTaskError as exc:
        raise unwrapped(exc) from exc
    finally:
        for worker in workers:
            ray.kill(worker)
    return shards


def shard_sums(
    shards: Sequence[Shard],
    memory: ExternalContinualLearner,
    *,
    num_cpus: float = 1,
    progress: Progress | None = None,
) -> ShardSums:
    """The shards' vectors and statistics, and each shard's sums (``O(n M^2)`` per shard, as Ray
    tasks) in each feature map where the store would rather take them summed
    (:meth:`~icl_cl.memory.store_feature_spaces.FeatureSpaces.summable`): none for a session small
    enough to be added row by row on the driver.

    The driver holds the shards' vectors already (it stores them), so each goes back to the
    workers once, through the object store, whatever the number of maps.
    """
    n_new = sum(len(s.examples) for s in shards)
    wanted = memory.spaces.summable(
        n_items=memory.n_items + n_new, n_rows=n_new, multi_label=memory.multi_label
    )
    vectors, statistics = np.vstack([s.vectors for s in shards]), [s.statistics for s in shards]
    if not wanted:
        return ShardSums(vectors, statistics)
    ray = ray_module()
    task = ray.remote(num_cpus=num_cpus, max_retries=0)(shard_space_statistics)
    refs = [(ray.put(s.vectors), [ex.labels for ex in s.examples]) for s in shards]
    pending = {
        name: [task.remote(features, weighted, ref, row_labels) for ref, row_labels in refs]
        for name, (features, weighted) in wanted.items()
    }
    out: dict[str, tuple[RandomFeatures, list[StatisticsDelta]]] = {}
    try:
        for name, tasks in pending.items():
            out[name] = (wanted[name][0], ray.get(tasks))
            if progress is not None:
                progress("feature sums", len(out), len(pending))
    except ray.exceptions.WorkerCrashedError as exc:
        raise WorkerError(
            f"a Ray worker died while summing features; nothing was committed: {exc}"
        ) from exc
    except ray.exceptions.RayTaskError as exc:
        raise unwrapped(exc) from exc
    return ShardSums(vectors, statistics, out)


def learn(
    data: str | Path,
    store: str | Path,
    *,
    labels: Sequence[Label] = (),
    label_locations: Sequence[Located] | None = None,
    config: ClassifierConfig | None = None,
    actors: int = 2,
    num_cpus: float = 1,
    num_gpus: float = 0,
    fit: bool = True,
    k: int = 10,
    progress: Progress | None = None,
    lock_timeout: float = 0.0,
) -> LearnReport:
    """Learn the examples of ``data`` (a JSONL or Parquet file, or a folder of them: one shard
    per file) into ``store`` as one session, embedded on Ray workers (see :func:`connect`).

    Workers read, check, embed and sum shards (:func:`map_shards`, :func:`shard_sums`);
    under the store's writer lock the sums are merged in shard order and committed with the
    examples and their vectors, as a local learn of the shards' examples in order would.

    Args:
        data: The examples.
        store: The store (created with ``config`` if it does not exist).
        labels: Label definitions of the session.
        label_locations: Where each of ``labels`` was read, for error messages.
        config: A new store's config, or the query-time settings of an existing one.
        actors: Embedding workers.
        num_cpus: CPUs per worker; ``num_gpus``: GPUs per worker (the embedder runs there).
        fit: Fit the heads for ``k`` candidates per input after learning.
        progress: Told how many shards are embedded, then how far fitting got.
        lock_timeout: Seconds to wait for another writer of the store to finish.
    """
    paths = [str(p) for p in input_files(data)]
    with ContinualClassifier.open(store, config) as clf:
        shards = map_shards(
            paths,
            clf.config.embedder,
            clf.config.max_text_chars,
            actors=actors,
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            progress=progress,
        )
        sums = shard_sums(shards, clf.memory, num_cpus=num_cpus, progress=progress)
        report = clf.learn(
            [ex for s in shards for ex in s.examples],
            labels,
            fit=fit,
            k=k,
            progress=progress,
            locations=[at for s in shards for at in s.locations],
            label_locations=label_locations,
            lock_timeout=lock_timeout,
            embedded=sums,
        )
    logger.info("learned %d shards as session %d", len(shards), report.session)
    return report
