"""A background ledger writer: one thread appends blocks in submission order, off the training path."""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

log = logging.getLogger(__name__)

_STOP = object()
T = TypeVar("T")


class WriterFailed(RuntimeError):
    """An earlier write failed, so later blocks cannot extend the chain."""


class BackgroundWriter:
    """Runs submitted write calls on one thread, strictly in order.

    ``submit`` returns a Future that resolves once the write is committed (durable). After a failure every
    later submission fails with WriterFailed, so the chain never gets a gap. ``flush`` waits for all writes.
    """

    def __init__(self, name: str = "ledger-writer", max_pending: int = 8):
        # A bounded queue: if the database falls far behind, training waits instead of holding every model.
        self._queue: queue.Queue[Any] = queue.Queue(max_pending)
        self._failure: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        if self._closed:
            future.set_exception(WriterFailed("the ledger writer is closed; reopen the ledger to write"))
            return future
        if self._failure is not None:
            future.set_exception(WriterFailed(f"ledger writer stopped after an error: {self._failure}"))
            return future
        self._queue.put((future, fn, args, kwargs))
        return future

    def flush(self) -> None:
        """Block until everything submitted so far is written; raise the first write error, if any. After
        ``close`` everything was written already, and this returns at once."""
        if not self._closed:
            self.submit(lambda: None).result()
        if self._failure is not None:
            raise WriterFailed(f"ledger write failed: {self._failure}") from self._failure

    def close(self) -> None:
        """Write what is queued, then stop the thread; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if self._failure is not None:
                future.set_exception(WriterFailed(f"ledger writer stopped after an error: {self._failure}"))
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller through the future
                log.error("ledger write failed: %s", exc)
                self._failure = exc
                future.set_exception(exc)
