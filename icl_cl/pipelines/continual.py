"""ContinualClassifier: the public entry point. Learns sessions into a store; predicts labels."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from icl_cl.config import ClassifierConfig, MemoryConfig
from icl_cl.data import Located, check_text, validate_examples
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.base import ProgressCallback
from icl_cl.errors import ConfigError, DataError
from icl_cl.memory.ecl import ExternalContinualLearner
from icl_cl.memory.store import MANIFEST, Store
from icl_cl.types import Candidate, Example, Label, Prediction

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnReport:
    """What one call to :meth:`ContinualClassifier.learn` stored."""

    session: int
    n_examples: int
    new_labels: tuple[str, ...]
    seconds: float
    embed_seconds: float


class ContinualClassifier:
    """An in-context continual classifier over a persistent store.

    Use :meth:`open` to create or reopen a store. ``learn`` appends a session (no retraining, no
    forgetting); ``predict`` ranks candidate labels with the external continual learner and decides.
    """

    def __init__(
        self, memory: ExternalContinualLearner, embedder: Embedder, config: ClassifierConfig
    ) -> None:
        self.memory = memory
        self.embedder = embedder
        self.config = config

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        config: ClassifierConfig | None = None,
        *,
        memory: MemoryConfig | None = None,
        embedder: Embedder | None = None,
    ) -> ContinualClassifier:
        """Create the store at ``path`` if it does not exist, else reopen it.

        Args:
            path: Store directory.
            config: Config for a new store. For an existing store it must agree with the stored
                one on the embedder; its memory settings (scorer, ...) apply to this session.
            memory: Query-time memory settings that override the stored ones (scorer, k of kNN).
            embedder: An embedder instance to use instead of loading the configured one.
        """
        path = Path(path)
        if (path / MANIFEST).exists():
            store = Store.open(path)
            stored = ClassifierConfig.from_dict(store.meta("config"), source=str(path))
            if config is not None and config.embedder.model != stored.embedder.model:
                store.close()
                raise ConfigError(
                    f"{path}: store was built with embedder {stored.embedder.model!r}, "
                    f"not {config.embedder.model!r}"
                )
            if config is not None:
                stored = stored.model_copy(update={"memory": config.memory})
            config = stored
        else:
            config = config or ClassifierConfig()
            embedder = embedder or load_embedder(config.embedder)
            store = Store.create(
                path,
                dim=embedder.dim,
                embedder=embedder.name,
                config=config.model_dump(mode="json"),
            )
        if memory is not None:
            config = config.model_copy(update={"memory": memory})
        embedder = embedder or load_embedder(config.embedder)
        return cls(ExternalContinualLearner(store, config.memory), embedder, config)

    def close(self) -> None:
        self.memory.store.close()

    def __enter__(self) -> ContinualClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- learning --------------------------------------------------------------------------

    def learn(
        self,
        examples: Sequence[Example],
        labels: Sequence[Label] = (),
        *,
        progress: ProgressCallback | None = None,
        locations: Sequence[Located] | None = None,
        label_locations: Sequence[Located] | None = None,
    ) -> LearnReport:
        """Learn one session. All-or-nothing: on any error, the store is unchanged.

        Args:
            examples: The session's examples. Ids must be new to the store.
            labels: Label definitions (names, descriptions). Labels used by examples but not
                defined here or earlier are created with their identifier as name.
            progress: Called with the number of texts embedded so far, chunk by chunk.
            locations: Where each example came from, for error messages.
            label_locations: Where each label came from, for error messages.
        """
        start = time.perf_counter()
        examples = list(examples)
        if not examples:
            raise DataError("a session needs at least one example")
        validate_examples(examples, max_chars=self.config.max_text_chars, locations=locations)
        self._check_new_ids(examples, locations)
        new_labels = self._new_labels(examples, labels, label_locations)
        multi_label = self._multi_label_after(examples, locations)

        embed_start = time.perf_counter()
        vectors = self.embedder.encode([ex.text for ex in examples], progress=progress)
        label_vectors = self.embedder.encode([lab.text for lab in new_labels])
        embed_seconds = time.perf_counter() - embed_start
        session = self.memory.learn(
            examples,
            vectors,
            new_labels,
            label_vectors,
            multi_label=multi_label,
            seconds=time.perf_counter() - start,
        )
        report = LearnReport(
            session=session,
            n_examples=len(examples),
            new_labels=tuple(lab.label for lab in new_labels),
            seconds=time.perf_counter() - start,
            embed_seconds=embed_seconds,
        )
        logger.info(
            "learned session %d: %d examples, %d new labels",
            session,
            len(examples),
            len(new_labels),
        )
        return report

    def _check_new_ids(
        self, examples: Sequence[Example], locations: Sequence[Located] | None
    ) -> None:
        clash = set(self.memory.store.existing_ids([ex.id for ex in examples]))
        if clash:
            i = next(i for i, ex in enumerate(examples) if ex.id in clash)
            where = {"source": locations[i].source, "line": locations[i].line} if locations else {}
            raise DataError(
                f"id already in the store ({len(clash)} such ids in this session)",
                field="id",
                item=examples[i].id,
                **where,
            )

    def _new_labels(
        self,
        examples: Sequence[Example],
        labels: Sequence[Label],
        locations: Sequence[Located] | None,
    ) -> list[Label]:
        declared: dict[str, Label] = {}
        for i, lab in enumerate(labels):
            where = {"source": locations[i].source, "line": locations[i].line} if locations else {}
            if not isinstance(lab, Label) or not lab.label.strip():
                raise DataError(
                    "expected a Label with a non-empty identifier", item=str(i), **where
                )
            if lab.label in declared:
                raise DataError("label defined twice", field="label", item=lab.label, **where)
            known = self.memory.label(lab.label)
            if known is not None:
                for field in ("name", "description", "group"):
                    if getattr(known, field) != getattr(lab, field):
                        raise DataError(
                            f"conflicts with the stored label ({field} {getattr(known, field)!r} "
                            f"vs {getattr(lab, field)!r})",
                            field=field,
                            item=lab.label,
                            **where,
                        )
            declared[lab.label] = lab
        new = [lab for lab in declared.values() if self.memory.label(lab.label) is None]
        known_or_new = {lab.label for lab in new}
        for ex in examples:
            for name in ex.labels:
                if name not in known_or_new and self.memory.label(name) is None:
                    known_or_new.add(name)
                    new.append(Label(name))
        return new

    def _multi_label_after(
        self, examples: Sequence[Example], locations: Sequence[Located] | None
    ) -> bool:
        """Whether the store is multi-label once this session is in."""
        setting = self.config.multi_label
        if setting is False:
            for i, ex in enumerate(examples):
                if len(ex.labels) != 1:
                    where = (
                        {"source": locations[i].source, "line": locations[i].line}
                        if locations
                        else {}
                    )
                    raise DataError(
                        f"a single-label store needs exactly one label, got {len(ex.labels)}",
                        field="labels",
                        item=ex.id,
                        **where,
                    )
            return False
        if setting is True:
            return True
        seen_multi = any(len(ex.labels) != 1 for ex in examples)
        if seen_multi and self.memory.multi_label is False:
            logger.warning("examples with != 1 label: the store becomes multi-label")
        return bool(self.memory.multi_label) or seen_multi

    # ---- prediction ------------------------------------------------------------------------

    def predict(
        self,
        texts: Sequence[str],
        k: int = 10,
        *,
        scorer: str | None = None,
        use_llm: bool = True,
        progress: ProgressCallback | None = None,
    ) -> list[Prediction]:
        """Predict labels for each text.

        Args:
            texts: Inputs to classify.
            k: Number of candidate labels to return (and, with an LLM, to read in context).
            scorer: ECL scorer to rank candidates with; default from the config.
            use_llm: Ask the LLM to re-rank candidates. No LLM is configured yet, so the ECL decides.
            progress: Called with the number of texts embedded so far.
        """
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise DataError(f"k must be a positive integer, got {k!r}")
        for i, text in enumerate(texts):
            check_text(text, max_chars=self.config.max_text_chars, item=str(i))
        self.memory.require_examples()
        queries = self.embedder.encode(list(texts), progress=progress)
        return self.predict_vectors(queries, k, scorer=scorer)

    def predict_vectors(
        self, queries: np.ndarray, k: int = 10, *, scorer: str | None = None
    ) -> list[Prediction]:
        """Predict from already-embedded inputs (used by evaluation to embed once)."""
        if k <= 0:
            raise DataError(f"k must be a positive integer, got {k!r}")
        scorer_name = self.memory.resolve_scorer(scorer)
        ranked = self.memory.candidates(queries, k, scorer_name)
        multi = bool(self.memory.multi_label)
        cardinality = self.memory.expected_cardinality(queries) if multi else np.ones(len(queries))
        predictions = []
        for cands, card in zip(ranked, cardinality, strict=True):
            n_chosen = max(1, min(len(cands), round(float(card)))) if multi else 1
            predictions.append(
                Prediction(
                    labels=tuple(label for label, _ in cands[:n_chosen]),
                    scores={label: score for label, score in cands},
                    candidates=tuple(Candidate(label, s, ecl_score=s) for label, s in cands),
                    scorer=scorer_name,
                    evidence={"expected_cardinality": float(card)} if multi else {},
                )
            )
        return predictions

    # ---- introspection ---------------------------------------------------------------------

    def labels(self) -> list[dict[str, Any]]:
        """Known labels with their example counts and the session that introduced them."""
        sessions = self.memory.store.label_sessions()
        counts = self.memory.stats.counts
        return [
            {
                "label": lab.label,
                "name": lab.name,
                "group": lab.group,
                "count": int(counts[i]),
                "session": sessions.get(lab.label),
            }
            for i, lab in enumerate(self.memory.labels)
        ]

    def info(self) -> dict[str, Any]:
        """Config, model, sizes and sessions of the store."""
        store = self.memory.store
        size = sum(f.stat().st_size for f in Path(store.path).iterdir() if f.is_file())
        return {
            **self.memory.info(),
            "format_version": store.manifest["format_version"],
            "created_by": store.manifest["created_by"],
            "embedder": store.manifest["embedder"],
            "bytes_on_disk": size,
            "config": self.config.model_dump(mode="json"),
            "sessions": [
                {
                    "session": s.session,
                    "created_at": s.created_at,
                    "examples": s.n_examples,
                    "new_labels": len(s.new_labels),
                    "seconds": round(s.seconds, 3),
                }
                for s in self.memory.sessions()
            ],
        }
