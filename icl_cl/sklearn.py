"""A scikit-learn face for :class:`~icl_cl.classifier.ContinualClassifier`.

:class:`ContinualClassifierEstimator` has ``fit``, ``partial_fit`` (one session; the classes
grow), ``predict``, ``predict_proba``, ``score`` and ``classes_``, so it works inside a
``Pipeline``, with ``cross_val_score`` and in a grid search. Its inputs are texts (a list, a 1-d
array or a pandas Series of strings), or with ``embedder="precomputed"`` vectors (a 2-d float
array, one row per item, embedded by the user's own model). Its targets are one label per item:
it is single-label. Multi-label tagging goes through
:class:`~icl_cl.classifier.ContinualClassifier` itself.
"""

# ruff: noqa: N803  (X and y: scikit-learn's argument names)
from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import tempfile
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import Tags
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig, EmbedderConfig, LLMConfig, MemoryConfig
from icl_cl.embedding import Embedder, load_embedder
from icl_cl.embedding.cache import CachedEmbedder
from icl_cl.embedding.given import GivenVectors
from icl_cl.embedding.precomputed import PrecomputedVectors, unit_rows
from icl_cl.memory.store import MANIFEST
from icl_cl.types import Example, Label, Prediction

logger = logging.getLogger(__name__)

# The store's label id of a class value: sklearn targets may be ints, strings, bools...
_label_id = str
# The embedder parameter that makes X vectors rather than texts.
PRECOMPUTED = "precomputed"


@functools.lru_cache(maxsize=4)
def _shared_embedder(config: EmbedderConfig, cache: str | None) -> Embedder:
    # Cross-validation and grid searches fit a fresh clone per fold: load each model once, and
    # with a cache folder, embed each text once across all of them.
    embedder = load_embedder(config)
    return CachedEmbedder(embedder, cache) if cache is not None else embedder


class _StoreFolder:
    """Where an estimator's store lives, and the classifier open on it (opened on first use).

    A temporary folder is removed when this object is closed or garbage-collected. Pickled, a
    temporary store travels as the bytes of its files; a given path travels as the path.
    """

    def __init__(self, path: Path, *, temporary: bool) -> None:
        self.path = path
        self.temporary = temporary
        self._classifier: ContinualClassifier | None = None
        root = path.parent
        self._remove = weakref.finalize(self, shutil.rmtree, root, True) if temporary else None

    @classmethod
    def new_temporary(cls) -> _StoreFolder:
        return cls(_temporary_path(), temporary=True)

    def classifier(
        self, config: ClassifierConfig, embedder: Callable[[], Embedder]
    ) -> ContinualClassifier:
        if self._classifier is None:
            self._classifier = ContinualClassifier.open(self.path, config, embedder=embedder())
        return self._classifier

    def release(self) -> None:
        """Close the classifier (SQLite checkpoints its log into the database file)."""
        if self._classifier is not None:
            self._classifier.close()
            self._classifier = None

    def close(self) -> None:
        self.release()
        if self._remove is not None:
            self._remove()

    def __getstate__(self) -> dict[str, Any]:
        self.release()
        if not self.temporary:
            return {"path": str(self.path)}
        files = {
            str(file.relative_to(self.path)): file.read_bytes()
            for file in sorted(self.path.rglob("*"))
            if file.is_file()
        }
        return {"files": files}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "path" in state:
            self.__init__(Path(state["path"]), temporary=False)  # type: ignore[misc]
            return
        path = _temporary_path()
        path.mkdir()
        for name, data in state["files"].items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        self.__init__(path, temporary=True)  # type: ignore[misc]


def _temporary_path() -> Path:
    """A store path inside a new temporary folder (the store is created on first use)."""
    return Path(tempfile.mkdtemp(prefix="icl-cl-sklearn-")) / "store"


def _texts(values: Any) -> list[str]:
    """The inputs as a list of strings: a 1-d sequence of texts, as text vectorizers take."""
    if isinstance(values, str):
        raise TypeError("X must be a sequence of texts, not one string")
    if getattr(values, "ndim", 1) != 1:
        raise ValueError(
            f"X must be 1-d (one text per item), got shape {values.shape}; for vectors, "
            f'set embedder="{PRECOMPUTED}"'
        )
    texts = list(values)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"X[{i}] is {type(text).__name__}, not a text (str)")
    return texts


def _vectors(estimator: BaseEstimator, values: Any, *, reset: bool) -> np.ndarray:
    """The inputs as unit float32 rows, checked as scikit-learn checks a numeric ``X``: 2-d,
    dense, finite, not empty, as wide as at the first fit (``reset`` sets that width)."""
    texts = isinstance(values, (list, tuple)) and any(isinstance(v, str) for v in values)
    kind = getattr(getattr(values, "dtype", None), "kind", "")
    if isinstance(values, str) or texts or kind in ("U", "S"):
        raise TypeError(
            f'X holds texts, but embedder="{PRECOMPUTED}" takes vectors (a 2-d float array); '
            "leave embedder unset to embed texts"
        )
    checked = validate_data(estimator, values, reset=reset, dtype=[np.float64, np.float32])
    return unit_rows(checked)


class ContinualClassifierEstimator(ClassifierMixin, BaseEstimator):
    """scikit-learn classifier over a :class:`~icl_cl.classifier.ContinualClassifier`.

    ``fit`` learns its data as one session into a new store, ``partial_fit`` adds one session
    (new classes may appear in any session; none is forgotten, nothing is retrained). Each
    session ends with the fit of the heads (fusion weights, probabilities) on held-out stored
    examples. By default the external continual learner decides alone; with ``llm`` an LLM reads
    each input's ``k`` candidates, and fusion gives it the weight it earned on held-out data.

    With ``embedder="precomputed"``, ``X`` is the user's own vectors (a 2-d float array, as wide
    at every call as at the first fit) instead of texts: they are learned and predicted as given,
    scaled to unit length (the ECL compares directions), and the store holds no text. No LLM
    reads them, and ``n_features_in_`` is their width.

    ``predict_proba`` puts the classifier's calibrated probabilities on the ``k`` candidates,
    and shares what it puts outside them (``evidence.p_outside_candidates``) equally among the
    other classes, so each row sums to 1.

    Args:
        k: Candidate labels per input.
        scorer: ECL scorer: ``auto`` (chosen by the fit step) or one of ``icl_cl.config.SCORERS``.
        llm: The LLM that reads the candidates (an :class:`~icl_cl.config.LLMConfig` or its
            dict, e.g. ``{"backend": "transformers", "model": "smollm2-135m-instruct"}``);
            ``None`` keeps ``config``'s (none by default).
        config: The rest of the classifier config (:class:`~icl_cl.config.ClassifierConfig` or
            its dict): embedder, prompt, fusion, calibration.
        store: Folder of the store. ``None``: a temporary folder, removed with the estimator.
            ``fit`` refuses a folder that already holds a store (it would start from scratch);
            ``partial_fit`` on an unfitted estimator continues an existing store.
        embedding_cache: A folder where the vectors of the texts are kept (and kept in memory
            in this process), so that cross-validation and grid searches embed each text once.
            ``None``: every fit and predict embeds its texts.
        embedder: ``None``: ``X`` is texts, embedded by ``config``'s embedder;
            ``"precomputed"``: ``X`` is vectors.

    Attributes:
        classes_: Every class learned so far, sorted.
        n_features_in_: The width of the vectors (``embedder="precomputed"`` only).
        classifier_: The underlying :class:`~icl_cl.classifier.ContinualClassifier`, for its
            full :class:`~icl_cl.types.Prediction` (candidates, evidence, cost) and ``info()``.
    """

    def __init__(
        self,
        k: int = 10,
        scorer: str = "auto",
        llm: LLMConfig | dict[str, Any] | None = None,
        config: ClassifierConfig | dict[str, Any] | None = None,
        store: str | Path | None = None,
        embedding_cache: str | Path | None = None,
        embedder: str | None = None,
    ) -> None:
        self.k = k
        self.scorer = scorer
        self.llm = llm
        self.config = config
        self.store = store
        self.embedding_cache = embedding_cache
        self.embedder = embedder

    def __sklearn_tags__(self) -> Tags:
        tags = super().__sklearn_tags__()
        vectors = self.embedder == PRECOMPUTED
        tags.input_tags.one_d_array = not vectors
        tags.input_tags.two_d_array = vectors
        tags.input_tags.string = not vectors
        return tags

    def fit(self, X: Any, y: Sequence[Any]) -> ContinualClassifierEstimator:
        """Learn ``X`` (texts, or vectors) with labels ``y`` as the first session of a new store.

        Returns:
            The estimator.
        """
        if self.store is not None and (Path(self.store) / MANIFEST).exists():
            raise ValueError(
                f"{self.store} already holds a store; fit starts a new one. Use partial_fit to "
                "add a session to it, or give another folder"
            )
        self._forget()
        return self.partial_fit(X, y)

    def partial_fit(
        self, X: Any, y: Sequence[Any], classes: Sequence[Any] | None = None
    ) -> ContinualClassifierEstimator:
        """Learn one more session. Its classes may be new; the earlier ones are kept as learned.

        Args:
            X: Texts, or vectors with ``embedder="precomputed"``.
            y: One label per item.
            classes: Classes to define now even without examples (they are scored once
                examples of them arrive); not needed for classes that appear in ``y``.

        Returns:
            The estimator.
        """
        labels = column_or_1d(y, warn=True)
        check_classification_targets(labels)
        vectors, texts = None, None
        if self._reads_vectors():
            if not hasattr(self, "classes_") and self._store_exists():
                self._classifier()  # continuing a store: X must be as wide as its vectors
            vectors = _vectors(self, X, reset=not hasattr(self, "classes_"))
        else:
            texts = _texts(X)
            if not texts:
                raise ValueError("nothing to learn: X is empty")
        check_consistent_length(vectors if texts is None else texts, labels)
        clf = self._classifier()
        known = list(self.classes_) if hasattr(self, "classes_") else []
        classes = () if classes is None else classes
        classes_ = _sorted_classes([*known, *labels, *classes])
        ids = [f"sklearn-{clf.memory.n_examples + i}" for i in range(len(labels))]
        if texts is None:
            texts = [_vector_key(row) for row in vectors]
        examples = [
            Example(id, text, [_label_id(label)])
            for id, text, label in zip(ids, texts, labels, strict=True)
        ]
        defined = [Label(_label_id(c)) for c in classes if clf.memory.label(str(c)) is None]
        if vectors is None:
            clf.learn(examples, defined, k=self.k)
        else:
            _learn_vectors(clf, examples, vectors, defined, classes_, self.k)
        self.classes_ = classes_
        self._columns = {_label_id(c): j for j, c in enumerate(classes_)}
        return self

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class of each item."""
        predictions = self.predictions(X)
        return self.classes_[[self._columns[p.labels[0]] for p in predictions]]

    def predict_proba(self, X: Any) -> np.ndarray:
        """Probability of each class (columns in the order of ``classes_``) for each item."""
        predictions = self.predictions(X)
        proba = np.zeros((len(predictions), len(self.classes_)))
        for row, prediction in zip(proba, predictions, strict=True):
            for label, probability in prediction.scores.items():
                row[self._columns[label]] = probability
            outside = np.ones(len(row), dtype=bool)
            outside[[self._columns[label] for label in prediction.scores]] = False
            rest = max(1.0 - row.sum(), 0.0)
            if outside.any():
                row[outside] = rest / outside.sum()
            row /= row.sum()
        return proba

    def predictions(self, X: Any) -> list[Prediction]:
        """The full :class:`~icl_cl.types.Prediction` of each item: labels, probabilities,
        candidates with their ECL and LLM scores, evidence (fusion weights, demonstrations)
        and LLM cost."""
        check_is_fitted(self, "classes_")
        clf = self._classifier()
        if self._reads_vectors():
            return clf.predict_vectors(_vectors(self, X, reset=False), k=self.k)
        return clf.predict(_texts(X), k=self.k)

    @property
    def classifier_(self) -> ContinualClassifier:
        check_is_fitted(self, "classes_")
        return self._classifier()

    def _classifier(self) -> ContinualClassifier:
        folder: _StoreFolder | None = self.__dict__.get("_folder")
        if folder is None:
            if self.store is None:
                folder = _StoreFolder.new_temporary()
            else:
                folder = _StoreFolder(Path(self.store), temporary=False)
            self._folder = folder
        config = self._config()
        clf = folder.classifier(config, lambda: self._embedder(config, folder.path))
        if clf.memory.multi_label:
            raise ValueError(f"{folder.path} is a multi-label store; use ContinualClassifier")
        if not hasattr(self, "classes_") and clf.memory.n_examples:
            # Continuing a store made elsewhere: its labels are the classes so far.
            self.classes_ = _sorted_classes([row["label"] for row in clf.labels()])
            self._columns = {_label_id(c): j for j, c in enumerate(self.classes_)}
            if self._reads_vectors():
                self.n_features_in_ = clf.embedder.dim
        return clf

    def _embedder(self, config: ClassifierConfig, store: Path) -> Embedder:
        if self._reads_vectors():
            manifest = store / MANIFEST
            if manifest.exists():  # a store made before: its width
                return PrecomputedVectors(int(json.loads(manifest.read_text())["dim"]))
            return PrecomputedVectors(self.n_features_in_)
        cache = None if self.embedding_cache is None else str(Path(self.embedding_cache).resolve())
        return _shared_embedder(config.embedder, cache)

    def _reads_vectors(self) -> bool:
        if self.embedder not in (None, PRECOMPUTED):
            raise ValueError(
                f'embedder must be None (texts) or "{PRECOMPUTED}" (vectors), not {self.embedder!r}'
            )
        return self.embedder == PRECOMPUTED

    def _store_exists(self) -> bool:
        return self.store is not None and (Path(self.store) / MANIFEST).exists()

    def _config(self) -> ClassifierConfig:
        config = self.config
        if not isinstance(config, ClassifierConfig):
            config = ClassifierConfig.model_validate(config or {})
        # Validated (model_copy alone would not refuse a bad scorer name).
        memory = MemoryConfig.model_validate({**config.memory.model_dump(), "scorer": self.scorer})
        update: dict[str, Any] = {"memory": memory}
        if self.llm is not None:
            llm = (
                self.llm if isinstance(self.llm, LLMConfig) else LLMConfig.model_validate(self.llm)
            )
            update["llm"] = llm
        config = config.model_copy(update=update)
        if config.llm is not None and self._reads_vectors():
            raise ValueError(f'an LLM reads texts; embedder="{PRECOMPUTED}" gives it none')
        return config

    def _forget(self) -> None:
        folder: _StoreFolder | None = self.__dict__.pop("_folder", None)
        if folder is not None:
            folder.close()
        for name in ("classes_", "_columns", "n_features_in_"):
            self.__dict__.pop(name, None)


def _vector_key(row: np.ndarray) -> str:
    """What the store keeps as a vector's text: a digest of it, so that equal vectors are one
    input, as equal texts are (a held-out item takes its copies out of memory with it)."""
    return "vector " + hashlib.sha256(row.tobytes()).hexdigest()[:32]


def _learn_vectors(
    clf: ContinualClassifier,
    examples: list[Example],
    vectors: np.ndarray,
    defined: list[Label],
    classes: np.ndarray,
    k: int,
) -> None:
    """Learn examples whose text is their vector's key, with their given vectors. A class's text
    gets the zero vector (no direction): without a text model, no class is ranked by its name."""
    store_embedder = clf.embedder
    known = {Label(_label_id(c)).text: np.zeros(store_embedder.dim, np.float32) for c in classes}
    # Rows come last: a class named like a vector's key must not take the place of its vector.
    known.update((ex.text, row) for ex, row in zip(examples, vectors, strict=True))
    clf.embedder = GivenVectors(store_embedder, known)
    try:
        clf.learn(examples, defined, k=k)
    finally:
        clf.embedder = store_embedder


def _sorted_classes(values: Sequence[Any]) -> np.ndarray:
    """The distinct classes, sorted as scikit-learn sorts them; two that the store would keep
    under one label id (``1`` and ``"1"``) are refused."""
    classes = np.unique(np.asarray(values))
    ids = [_label_id(c) for c in classes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes {classes.tolist()} are not distinct as texts")
    return classes
