"""A background ledger writer: one thread appends blocks in submission order, off the training path."""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from storage.engine import StorageUnavailable

__all__ = ["BackgroundWriter", "WriterFailed", "describe", "is_transient"]

log = logging.getLogger(__name__)

_STOP = object()
T = TypeVar("T")

FIRST_DELAY_S = 0.1   # the first retry of a transient failure waits this long; each next one twice as long...
MAX_DELAY_S = 2.0     # ...but never more than this
REASON_CHARS = 300    # a failure named in a log line or a health reason is cut to this length


class WriterFailed(RuntimeError):
    """A write was not attempted: an earlier write failed (so a later block cannot extend the chain), or the
    writer is closed."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` says the database (or the disk) is unavailable right now, so the same write may succeed if
    tried again: a lost or refused connection, a lock or statement timeout, a full pool, an I/O error. A refused
    block, a constraint violation or a bug is not transient."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, (OperationalError, PoolTimeout, StorageUnavailable, OSError))


def describe(exc: BaseException) -> str:
    """One line naming ``exc`` without SQL text or parameters (a SQLAlchemy error is named by the driver's error),
    at most REASON_CHARS long."""
    orig = exc.orig if isinstance(exc, StatementError) else None
    text = str(orig) if orig is not None else str(exc)
    text = " ".join(text.split()) or type(orig if orig is not None else exc).__name__
    return text if len(text) <= REASON_CHARS else text[:REASON_CHARS - 3] + "..."


@dataclass
class _Job:
    future: Future[Any]
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    retry: bool
    epoch: int   # the writer's failure count when submitted: a failure after that fails this job unrun


class BackgroundWriter:
    """Runs submitted write calls on one thread, strictly in order.

    ``submit`` returns a Future that resolves once the write is committed (durable). A call that fails with a
    transient error (``is_transient``) is tried again, with backoff, for up to ``retry_for`` seconds. When a call
    fails for good, every call queued behind it then fails with WriterFailed unrun, so the chain never gets a gap;
    calls submitted after that run normally. ``flush`` waits for all writes and never raises.
    """

    def __init__(self, name: str = "ledger-writer", max_pending: int = 8, retry_for: float = 10.0):
        # A bounded queue: if the database falls far behind, training waits instead of holding every model.
        self._queue: queue.Queue[Any] = queue.Queue(max_pending)
        self.retry_for = retry_for
        self._epoch = 0                       # failures so far; written by the writer thread only
        self._behind = "not written: an earlier write failed"   # what jobs queued behind a failure fail with
        self._closed = False
        self._submitting = threading.Lock()   # the closed check and the put happen together
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[..., T], *args: Any, retry: bool = True, **kwargs: Any) -> Future[T]:
        """Queue ``fn(*args, **kwargs)``; blocks while ``max_pending`` calls are queued. With ``retry`` false the
        call runs once even if it fails with a transient error (a probe of the database)."""
        future: Future[T] = Future()
        with self._submitting:
            if self._closed:
                future.set_exception(WriterFailed("the ledger writer is closed; reopen the ledger to write"))
                return future
            self._queue.put(_Job(future, fn, args, kwargs, retry, self._epoch))
        return future

    def flush(self) -> None:
        """Block until everything submitted so far has been written or has failed (each future says which);
        never raises. After ``close`` everything was written already, and this returns at once."""
        concurrent.futures.wait([self.submit(_nothing, retry=False)])

    def close(self) -> None:
        """Write what is queued, then stop the thread; closing twice is harmless."""
        with self._submitting:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is _STOP:
                return
            if not job.future.set_running_or_notify_cancel():   # a cancelled write leaves a gap like a failed one
                self._behind = "not written: an earlier write was cancelled"
                self._epoch += 1
                continue
            if job.epoch != self._epoch:
                job.future.set_exception(WriterFailed(self._behind))
                continue
            try:
                result = self._call(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller through the future
                # Jobs queued behind this one must fail too: count the failure before anyone learns of it.
                self._behind = f"not written: an earlier write failed: {describe(exc)}"
                self._epoch += 1
                job.future.set_exception(exc)
            else:
                job.future.set_result(result)

    def _call(self, job: _Job) -> Any:
        """Run the job's call, trying a transient failure again with backoff until ``retry_for`` has passed."""
        deadline = time.monotonic() + self.retry_for
        delay = FIRST_DELAY_S
        tries = 0
        while True:
            tries += 1
            try:
                return job.fn(*job.args, **job.kwargs)
            except BaseException as exc:
                remaining = deadline - time.monotonic()
                if not job.retry or not is_transient(exc) or remaining <= 0:
                    if not job.retry:
                        log.debug("ledger writer: call failed: %s", describe(exc))
                    elif tries > 1:
                        log.error("ledger write failed after %d tries in %.1f s: %s", tries,
                                  self.retry_for - remaining, describe(exc))
                    else:
                        log.error("ledger write failed: %s", describe(exc))
                    raise
                if tries == 1:
                    log.warning("ledger write failed (%s); retrying for up to %g s", describe(exc), self.retry_for)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, MAX_DELAY_S)


def _nothing() -> None:
    return None
