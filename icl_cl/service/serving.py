"""What the service serves from: read-only snapshots of the store, and its one writer.

Predictions read a :class:`Snapshot`, a classifier opened on the store as it was after some
session, which nothing changes. The writer thread learns each session into the store with its
own classifier and opens a snapshot of the store as it is then. The refit thread fits that
snapshot's heads (a newer snapshot replaces one still waiting: refits never pile up) and swaps
it in at once: a prediction sees the state before a session or after it, never a mix, and the
last fit serves until the next one is ready. A retired snapshot is closed when its last reader
is done.

The service must be the only writer of its store while it runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from icl_cl.backends.base import LLMBackend
from icl_cl.classifier import ContinualClassifier
from icl_cl.config import ClassifierConfig, DecisionConfig
from icl_cl.errors import BackendError, DataError, IclClError
from icl_cl.heads import HeadSpec
from icl_cl.service.batcher import BusyError
from icl_cl.service.metrics import ServiceMetrics
from icl_cl.service.models import LearnResponse, Readiness
from icl_cl.service.readers_writer import ReadersWriterLock
from icl_cl.service.settings import ServiceSettings
from icl_cl.types import Example, Label

logger = logging.getLogger(__name__)


class EmptyStoreError(IclClError):
    """Nothing is learned yet, so there is nothing to predict with (409)."""


def _no_key() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


class IdempotencyConflictError(IclClError):
    """An idempotency key came back with another request than the one it was first used for."""


class RefitCancelledError(IclClError):
    """The service is closing: a running refit stops at its next step (nothing it would have
    stored is needed: the next start refits from the committed sessions)."""


STOP_WAIT_S = 5.0
"""How long closing waits for a cancelled refit to reach its next step, or for the predict
batch running, before leaving it to end with the process."""


class _OneAtATime:
    """An embedder that encodes for one thread at a time (the writer's learns and the
    predict batches share it; tokenizers are not safe to share between threads)."""

    def __init__(self, embedder: Any) -> None:
        self._embedder = embedder
        self._lock = threading.Lock()

    def encode(self, items: Sequence[Any], **kwargs: Any) -> Any:
        with self._lock:
            return self._embedder.encode(items, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)


class Snapshot:
    """A read-only classifier on the store as it was after session ``session``.

    Args:
        clf: The classifier, opened for this snapshot alone.
        backend: The shared LLM backend (``None``: none configured, or each view makes its own).
    """

    def __init__(self, clf: ContinualClassifier, backend: LLMBackend | None) -> None:
        self.clf = clf
        sessions = clf.memory.sessions()
        self.session = sessions[-1].session if sessions else 0
        self.lock = threading.Lock()  # one reader at a time: lazy caches are built on first use
        self._backend = backend
        self._views: dict[DecisionConfig | None, ContinualClassifier] = {None: clf}
        self._readers = 0
        self._retired = False
        self._guard = threading.Lock()

    def fitted(self, k: int, use_llm: bool) -> bool:
        """Whether heads for ``k`` candidates (with the LLM or not) fitted on this state are stored."""
        clf = self.clf
        spec = HeadSpec.of(clf.config, k, clf.memory.resolve_scorer(None), use_llm=use_llm)
        heads = clf.heads.find(spec)
        return heads is not None and clf.heads.current(heads)

    def view(self, decision: DecisionConfig | None) -> ContinualClassifier:
        """The classifier of this state with another label-set rule (``None``: the config's)."""
        if decision not in self._views:
            config = self.clf.config.model_copy(update={"decision": decision})
            self._views[decision] = ContinualClassifier(
                self.clf.memory, self.clf.embedder, config, backend=self._backend
            )
        return self._views[decision]

    def enter(self) -> None:
        with self._guard:
            self._readers += 1

    def leave(self) -> None:
        with self._guard:
            self._readers -= 1
            done = self._retired and self._readers == 0
        if done:
            self.clf.close()

    def retire(self) -> None:
        """No new reader will come: close now, or when the last reader leaves."""
        with self._guard:
            self._retired = True
            done = self._readers == 0
        if done:
            self.clf.close()


def request_digest(examples: Sequence[Example], labels: Sequence[Label]) -> str:
    """What a learn request asked for, as a digest stored with its idempotency key."""
    body = {
        "examples": [[ex.id, ex.text, list(ex.labels)] for ex in examples],
        "labels": [[lab.label, lab.name, lab.description, lab.group] for lab in labels],
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class Serving:
    """The store of one service: snapshots for predictions, one writer thread for learns.

    Args:
        path: The store directory (created empty if there is none).
        config: A new store's config, or query-time settings for an existing one.
        settings: The service's settings (``default_k`` is what the refit fits for).
        metrics: Where learns and refits are counted.
        embedder: An embedder to use instead of loading the configured one.
        backend: An LLM backend to use instead of building the configured one.
    """

    def __init__(
        self,
        path: str | Path,
        config: ClassifierConfig | None,
        settings: ServiceSettings,
        metrics: ServiceMetrics,
        *,
        embedder: Any = None,
        backend: LLMBackend | None = None,
    ) -> None:
        self.path = Path(path)
        self.settings = settings
        self.metrics = metrics
        self._config = config
        self._writer = ContinualClassifier.open(
            self.path, config, embedder=embedder, backend=backend
        )
        self.embedder = _OneAtATime(self._writer.embedder)
        self._writer.embedder = self.embedder
        self._backend = backend if backend is not None else self._shared_backend()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="icl-cl-writer")
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._swap = threading.Lock()
        self._edits = ReadersWriterLock()  # long private reads, against edits renumbering rows
        self._current = self._open_snapshot()
        self.metrics.serving_session.set(self._current.session)
        self._waiting: Snapshot | None = None  # opened after a learn, not fitted yet
        self._refits = threading.Condition()
        self._closing = threading.Event()
        self._refitter = threading.Thread(target=self._refit_loop, name="icl-cl-refit", daemon=True)
        self._refitter.start()
        if self._current.clf.memory.n_examples and not self._fit_ready(self._current):
            self._submit(lambda: self._offer(self._open_snapshot()))
        self._warm: str | None = "loading the models"  # None once they are loaded
        threading.Thread(target=self._warm_up, name="icl-cl-warm-up", daemon=True).start()

    @property
    def uses_llm(self) -> bool:
        return self._writer.config.llm is not None

    @property
    def current(self) -> Snapshot:
        """The snapshot predictions are served from now."""
        return self._current

    @contextlib.contextmanager
    def reading(self) -> Iterator[Snapshot]:
        """The current snapshot, held (not closed) and locked for this reader until it is done."""
        with self._swap:
            snapshot = self._current
            snapshot.enter()
        try:
            with snapshot.lock:
                yield snapshot
        finally:
            snapshot.leave()

    @contextlib.contextmanager
    def private_reading(self) -> Iterator[Snapshot]:
        """A snapshot of the current state for one long read alone (an audit): predictions
        never wait for it, and edits wait until it is done."""
        with self._edits.reading():
            snapshot = self._open_snapshot()
            try:
                yield snapshot
            finally:
                snapshot.retire()

    def ready(self) -> Readiness:
        """Whether predictions are served (a store that is empty is not ready; one being
        refitted serves, with the last fit, said stale in the evidence)."""
        if self._warm is not None:  # before the snapshot's lock, which the warm-up holds
            return Readiness(ready=False, serving_session=self._current.session, reason=self._warm)
        with self.reading() as snapshot:
            if snapshot.clf.memory.n_examples == 0:
                empty = "the store is empty: learn a session first"
                return Readiness(ready=False, serving_session=snapshot.session, reason=empty)
            refitting = not self._fit_ready(snapshot)
            return Readiness(ready=True, serving_session=snapshot.session, refitting=refitting)

    def learn(
        self, examples: Sequence[Example], labels: Sequence[Label], key: str | None
    ) -> Future[LearnResponse]:
        """Queue one session for the writer; its future gives what it learned. With ``key``, a
        session already learned under it is answered as it was."""
        return self._submit(lambda: self._learn(examples, labels, key))

    def edit(self, kind: str, request: dict[str, Any], key: str | None) -> Future[dict[str, Any]]:
        """Queue a forget or a relabel (``kind``; ``request``: the arguments of the classifier's
        call) for the writer, as a learn; its future gives the edit's counts. With ``key``, an
        edit already made under it is answered as it was."""
        return self._submit(lambda: self._edit(kind, request, key))

    def _edit(self, kind: str, request: dict[str, Any], key: str | None) -> dict[str, Any]:
        from icl_cl.memory.forgetting import edits

        digest = hashlib.sha256(json.dumps([kind, request], sort_keys=True).encode()).hexdigest()
        store = self._writer.memory.store
        if key is not None:
            found = store.idempotent_session(key)
            if found is not None:
                if found[0] != digest:
                    raise IdempotencyConflictError(
                        "this Idempotency-Key was used for another request already"
                    )
                return next(e for e in edits(store) if e["session"] == found[1].session)
        # The edit renumbers the stored rows: the state served waits for it, then is replaced.
        with (
            self._edits.writing(),
            self._current.lock,
            store.idempotency_key(key, digest) if key else _no_key(),
        ):
            if kind == "forget":
                report = self._writer.forget(request["ids"], labels=request["labels"], fit=False)
            else:
                definitions = [Label(*lab) for lab in request["definitions"]]
                report = self._writer.relabel(request["examples"], definitions, fit=False)
            self._serve(self._open_snapshot())
        self.metrics.sessions.inc()
        self._offer(self._open_snapshot())
        return next(e for e in edits(self._writer.memory.store) if e["session"] == report.session)

    def close(self) -> None:
        """Cancel a running refit (it stops at its next step; one stuck longer than
        :data:`STOP_WAIT_S` is left to end with the process), drop one not started,
        finish queued learns, then close every classifier. The store holds only committed
        sessions, so nothing is lost: the next start refits."""
        with self._refits:
            self._closing.set()
            self._refits.notify()
        self._executor.shutdown(wait=True)
        self._refitter.join(STOP_WAIT_S)
        if self._refitter.is_alive():
            logger.warning(
                "a refit did not stop within %.0fs of the shutdown; leaving it to end with the "
                "process (the next start refits)",
                STOP_WAIT_S,
            )
        if self._waiting is not None:
            self._waiting.retire()
        self._current.retire()
        self._writer.close()  # last: it owns the LLM backend when it built it

    # ---- the writer thread ----------------------------------------------------------------

    def _submit(self, work: Any) -> Future[Any]:
        with self._pending_lock:
            if self._pending >= self.settings.max_pending_learns:
                raise BusyError(f"{self._pending} learns and refits are waiting already")
            self._pending += 1
        future = self._executor.submit(work)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: Future[Any]) -> None:
        with self._pending_lock:
            self._pending -= 1

    def _learn(
        self, examples: Sequence[Example], labels: Sequence[Label], key: str | None
    ) -> LearnResponse:
        digest = request_digest(examples, labels)
        if key is not None:
            found = self._writer.memory.store.idempotent_session(key)
            if found is not None:
                if found[0] != digest:
                    raise IdempotencyConflictError(
                        "this Idempotency-Key was used for another request already"
                    )
                record = found[1]
                n_labels = len(record.new_labels)
                return LearnResponse(
                    session=record.session, examples=record.n_examples, new_labels=n_labels
                )
        store = self._writer.memory.store
        with store.idempotency_key(key, digest) if key else contextlib.nullcontext():
            report = self._writer.learn(examples, labels, fit=False)
        self.metrics.sessions.inc()
        # Served at once: its exact statistics with the heads of the last fit (stale in the
        # evidence once the store has outgrown them); a second view of the same state is
        # refitted and swapped in when done. Both are opened here, between two commits, so that
        # each holds one state of the store.
        self._serve(self._open_snapshot())
        self._offer(self._open_snapshot())
        n_labels = len(report.new_labels)
        return LearnResponse(
            session=report.session, examples=report.n_examples, new_labels=n_labels
        )

    def _serve(self, snapshot: Snapshot) -> None:
        """Serve predictions from ``snapshot`` from now on."""
        with self._swap:
            old, self._current = self._current, snapshot
        old.retire()
        self.metrics.serving_session.set(snapshot.session)

    # ---- the refit thread -----------------------------------------------------------------

    def _offer(self, snapshot: Snapshot) -> None:
        """Hand ``snapshot`` to the refit thread, replacing one it has not started on."""
        with self._refits:
            stale, self._waiting = self._waiting, snapshot
            self._refits.notify()
        if stale is not None:
            stale.retire()

    def _refit_loop(self) -> None:
        while True:
            with self._refits:
                while self._waiting is None and not self._closing.is_set():
                    self._refits.wait()
                if self._closing.is_set():
                    return
                snapshot, self._waiting = self._waiting, None
            self.metrics.refitting.set(1)
            try:
                self._refit(snapshot)
            except RefitCancelledError:
                logger.info(
                    "refit of session %d cancelled: the service is closing", snapshot.session
                )
                snapshot.retire()
            except Exception:  # the thread must survive: the last fit keeps serving
                logger.exception("refit of session %d failed", snapshot.session)
                snapshot.retire()
            finally:
                self.metrics.refitting.set(0)

    def _refit(self, snapshot: Snapshot) -> None:
        """Fit the heads of ``snapshot`` (stored with it), then serve from it."""
        start = time.perf_counter()
        if snapshot.clf.memory.n_examples:
            for use_llm in (True, False) if self.uses_llm else (False,):
                try:
                    snapshot.clf.fit(
                        self.settings.default_k, use_llm=use_llm, progress=self._unless_closing
                    )
                except (BackendError, DataError) as exc:
                    logger.warning("refit (use_llm=%s) failed; serving on: %s", use_llm, exc)
        self._unless_closing()
        if snapshot.session < self._current.session:  # a later session is served already
            snapshot.retire()
            return
        self._serve(snapshot)
        seconds = time.perf_counter() - start
        self.metrics.refit.observe(seconds)
        logger.info("serving session %d (heads fitted in %.2fs)", snapshot.session, seconds)

    def _unless_closing(self, *_progress: Any) -> None:
        """A refit's progress callback: raises :class:`RefitCancelledError` once closing."""
        if self._closing.is_set():
            raise RefitCancelledError("the service is closing")

    def _warm_up(self) -> None:
        """Load the embedder, and the index and heads of the state served (a predict of one
        text), so that the first request does not wait for them; ``ready`` says so till then."""
        start = time.perf_counter()
        try:
            self.embedder.encode(["warm-up"])
            with self.reading() as snapshot:
                if snapshot.clf.memory.n_examples:
                    snapshot.clf.predict(["warm-up"], self.settings.default_k, use_llm=False)
        except Exception as exc:  # the service still answers; readyz says why it is not ready
            logger.warning("loading the models failed: %s", exc)
            self._warm = f"loading the models failed: {exc}"
            return
        self._warm = None
        logger.info("models loaded in %.1fs", time.perf_counter() - start)

    def _open_snapshot(self) -> Snapshot:
        clf = ContinualClassifier.open(
            self.path, self._config, embedder=self.embedder, backend=self._backend
        )
        return Snapshot(clf, self._backend)

    def _fit_ready(self, snapshot: Snapshot) -> bool:
        return snapshot.fitted(self.settings.default_k, self.uses_llm)

    def _shared_backend(self) -> LLMBackend | None:
        """The writer's LLM backend, shared with the snapshots (built once), if one is configured."""
        if not self.uses_llm:
            return None
        try:
            return self._writer.backend()
        except BackendError as exc:
            logger.warning("the LLM backend is not available now: %s", exc)
            return None
