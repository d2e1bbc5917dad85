"""Batch predict on Ray Data: ``map_batches`` over a pool of actors, each holding the classifier
opened on the store. Prediction only reads the store, so any number of actors share it.

A batch is a dict of columns ``id`` and ``text``; the result adds ``prediction``, the JSON record
``icl-cl predict`` writes for the item. Ray restarts an actor that dies and retries its batch,
so every id comes out exactly once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig
from icl_cl.describe import PredictionRow
from icl_cl.distributed.runtime import ray_module
from icl_cl.distributed.sources import input_files
from icl_cl.errors import DataError, StoreError
from icl_cl.inputs import check_text
from icl_cl.memory.store import MANIFEST

logger = logging.getLogger(__name__)


class Predictor:
    """A Ray Data actor: the classifier opened on the store (read only), applied to batches.

    Args:
        store: The store directory; it must exist (an actor never creates one).
        config: Query-time settings (as a dict, so that it travels to the actor).
        options: Keyword arguments of :meth:`ContinualClassifier.predict`.
    """

    def __init__(self, store: str, config: dict[str, Any] | None, options: dict[str, Any]) -> None:
        if not (Path(store) / MANIFEST).exists():
            raise StoreError(f"{store}: no store here")
        settings = ClassifierConfig.model_validate(config) if config is not None else None
        self._clf = ContinualClassifier.open(store, settings, read_only=True)
        self._options = options

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "id" not in batch or "text" not in batch:
            raise DataError(f"expected columns 'id' and 'text', got {sorted(batch)}")
        ids = [str(i) for i in batch["id"]]
        limit = self._clf.config.max_text_chars
        texts = [
            check_text(t, max_chars=limit, item=i, source=_source(batch, n))
            for n, (i, t) in enumerate(zip(ids, batch["text"], strict=True))
        ]
        preds = self._clf.predict(texts, **self._options)
        abstain = self._options.get("abstain_below") is not None
        records = [
            PredictionRow.of(i, p, abstain=abstain).line() for i, p in zip(ids, preds, strict=True)
        ]
        return {"id": np.asarray(ids, dtype=object), "prediction": np.asarray(records, object)}


def _source(batch: dict[str, np.ndarray], n: int) -> str | None:
    return str(batch["path"][n]) if "path" in batch else None


def read_inputs(path: str | Path) -> Any:
    """A ``ray.data.Dataset`` of a JSONL or Parquet file, or a folder of them, with a ``path``
    column naming each row's file (for error messages)."""
    ray = ray_module()
    files = [str(p) for p in input_files(path)]
    jsonl = [f for f in files if f.endswith(".jsonl")]
    parquet = [f for f in files if f.endswith(".parquet")]
    # Reading reserves no CPU: the predicting actors may then take every CPU of a small cluster
    # without starving the read tasks that feed them (which would wait forever).
    parts = []
    if jsonl:
        parts.append(ray.data.read_json(jsonl, lines=True, include_paths=True, num_cpus=0))
    if parquet:
        parts.append(ray.data.read_parquet(parquet, include_paths=True, num_cpus=0))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def predict(
    dataset: Any,
    *,
    store: str | Path,
    config: ClassifierConfig | None = None,
    actors: int = 2,
    batch_size: int = 256,
    num_cpus: float = 1,
    num_gpus: float = 0,
    **options: Any,
) -> Any:
    """Predict every row of ``dataset`` (a ``ray.data.Dataset`` with ``id`` and ``text``
    columns) with ``actors`` actors, each holding the classifier opened on ``store``.

    Args:
        dataset: The inputs.
        store: The store; it must exist.
        config: Query-time settings (LLM, prompt, decision, ...), as for
            :meth:`ContinualClassifier.open`.
        actors: Actors in the pool.
        batch_size: Rows per call of an actor.
        num_cpus: CPUs per actor.
        num_gpus: GPUs per actor (a GPU embedder or LLM runs on them).
        **options: Keyword arguments of :meth:`ContinualClassifier.predict` (``k``, ``scorer``,
            ``use_llm``, ``confidence``, ``abstain_below``).

    Returns:
        A lazy ``ray.data.Dataset`` with ``id`` and ``prediction`` (the JSON record) columns.
    """
    if not (Path(store) / MANIFEST).exists():
        raise StoreError(f"{store}: no store here (create one with 'icl-cl learn')")
    settings = config.model_dump(mode="json") if config is not None else None
    ray = ray_module()
    # Ray Data restarts a dead actor and retries its batch (its defaults for actor pools). The
    # pool starts with one actor and grows to ``actors``: had they all started at once, they
    # could hold every CPU of a small cluster while the tasks that list and read the input wait.
    return dataset.map_batches(
        Predictor,
        fn_constructor_kwargs={"store": str(store), "config": settings, "options": options},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
    )
