"""A readers-writer lock: many readers at once, or one writer.

The service's long reads (an audit scores every stored example) run on a classifier of their
own, so predictions never wait for them; what they must not see is an edit (forget, relabel)
renumbering the store's rows under them. They read under this lock, and an edit writes under it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ReadersWriterLock:
    """Shared holds for readers, an exclusive one for a writer (who waits for the readers in)."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._writing)
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._writing and self._readers == 0)
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()
