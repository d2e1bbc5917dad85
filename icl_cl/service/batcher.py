"""The micro-batcher: predicts that arrive together are classified together.

Requests wait in a queue bounded in inputs (a full queue refuses at once, it never grows
without bound). One worker thread takes the oldest request, waits at most ``wait_s`` for more,
up to ``max_items`` inputs, and hands them to ``run`` as one batch.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from icl_cl.errors import IclClError

logger = logging.getLogger(__name__)


class BusyError(IclClError):
    """Too much work is waiting (predicts in the queue, or learns); retry later (429)."""


@dataclass
class Job:
    """One request: its inputs, the options that must be equal within a batch, its answer."""

    items: Sequence[Any]
    options: Hashable
    future: Future[Any] = field(default_factory=Future)


class MicroBatcher:
    """Collects :class:`Job` s into batches for ``run(jobs)``, which sets every job's future.

    Args:
        run: Classifies a batch; called on the worker thread only.
        wait_s: How long a batch waits for more jobs after its first.
        max_items: Inputs per batch (a job larger than this is a batch of its own).
        max_queue_items: Inputs waiting at most; :meth:`submit` refuses beyond.
        on_queue: Told the number of inputs waiting whenever it changes.
    """

    def __init__(
        self,
        run: Callable[[list[Job]], None],
        *,
        wait_s: float,
        max_items: int,
        max_queue_items: int,
        on_queue: Callable[[int], None] = lambda n: None,
    ) -> None:
        self._run = run
        self.wait_s = wait_s
        self.max_items = max_items
        self.max_queue_items = max_queue_items
        self._on_queue = on_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._queued_items = 0
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="icl-cl-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> Future[Any]:
        """Queue ``job``; raises :class:`BusyError` when its inputs do not fit."""
        with self._cond:
            if self._closing:
                raise BusyError("the service is shutting down")
            if self._queued_items + len(job.items) > self.max_queue_items:
                raise BusyError(f"{self._queued_items} inputs are waiting already")
            self._queue.append(job)
            self._queued_items += len(job.items)
            self._on_queue(self._queued_items)
            self._cond.notify()
        return job.future

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, finish the queued ones, and stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            # A job whose caller gave up (timed out) before it started is dropped.
            live = [job for job in batch if job.future.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                self._run(live)
            except BaseException as exc:  # the worker must survive; each caller gets the error
                logger.exception("a predict batch failed")
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
            batch = [self._take()]
            size = len(batch[0].items)
            deadline = time.monotonic() + self.wait_s
            while size < self.max_items:
                if self._queue:
                    if size + len(self._queue[0].items) > self.max_items:
                        break
                    batch.append(self._take())
                    size += len(batch[-1].items)
                    continue
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    break
                self._cond.wait(left)
            return batch

    def _take(self) -> Job:
        job = self._queue.popleft()
        self._queued_items -= len(job.items)
        self._on_queue(self._queued_items)
        return job
