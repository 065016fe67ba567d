"""Training jobs: the proposer runs rounds one job at a time in a background thread, which consoles follow."""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fl.server import RoundFailed
from node.engine.coordinator import Coordinator
from node.engine.election import SupersededError
from node.engine.errors import NetError, UnavailableError
from node.engine.types import Note, Progress
from node.ledger import Ledger

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """One Train request being run: its progress, appended as rounds finish."""

    first_round: int
    last_round: int
    progress: list[Progress] = field(default_factory=list)
    done: bool = False
    current: int = 0                                # round in progress (0: none yet)


class TrainingJobs:
    """Runs training jobs one at a time in a background thread; pause stops a job after its current round."""

    def __init__(self, coordinator: Coordinator, rounds_default: int, retry_for: float = 0.0,
                 before_round: Callable[[], None] = lambda: None):
        self.coordinator = coordinator
        self.retry_for = retry_for                    # seconds a failing round is retried (0: stop at once)
        self.before_round = before_round              # a check before each round (raises to fail it)
        self.ledger: Ledger = coordinator.ledger
        self.rounds_default = rounds_default          # start(0): up to this total round
        self._cond = threading.Condition()
        self._job: TrainJob | None = None
        self._thread: threading.Thread | None = None
        self.pause_requested = False

    @property
    def training(self) -> bool:
        with self._cond:
            return self._job is not None and not self._job.done

    @property
    def current_round(self) -> int:
        with self._cond:
            if self._job is not None and not self._job.done and self._job.current:
                return self._job.current
        head = self.ledger.head
        return head.round if head else 0

    def start(self, rounds: int, last_round: int | None = None) -> tuple[TrainJob, bool]:
        """Start a job of ``rounds`` rounds after the head (0: up to the configured total), or up to round
        ``last_round`` when given (a validator continuing another's job); (job, False) when one is already
        running (the caller follows it)."""
        with self._cond:
            if self._job is not None and not self._job.done:
                return self._job, False
            head = self.ledger.head
            head_round = head.round if head else 0
            last = last_round if last_round is not None else head_round + rounds if rounds else self.rounds_default
            job = TrainJob(head_round + 1, last)
            self._job, self.pause_requested = job, False
            if job.first_round > job.last_round:
                job.progress.append(Note(head_round, f"nothing to do: round {head_round} already reached {last}"))
                job.done = True
                return job, True
            self._thread = threading.Thread(target=self._run, args=(job,), name="train", daemon=True)
            self._thread.start()
            return job, True

    def pause(self) -> None:
        with self._cond:
            self.pause_requested = True
            self._cond.notify_all()

    def follow(self, job: TrainJob, alive: Callable[[], bool] = lambda: True) -> Iterator[Progress]:
        """Yield the job's progress from the first until it is done (or the caller went away)."""
        sent = 0
        while alive():
            with self._cond:
                while sent == len(job.progress) and not job.done:
                    self._cond.wait(timeout=1.0)
                    if not alive():
                        return
                batch = job.progress[sent:]
                finished = job.done
            yield from batch
            sent += len(batch)
            if finished and sent == len(job.progress):
                return

    def join(self, timeout: float | None = None) -> None:
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _run(self, job: TrainJob) -> None:
        """Rounds after the head up to the job's last. A failed round is retried with backoff for ``retry_for``
        seconds of failures in a row (a peer or the store may come back), each failure a note; a newer proposer
        ends the job here without an error (it goes on there)."""
        failing_since: float | None = None
        delay = 1.0
        self.coordinator.target_round = job.last_round
        self.coordinator.state.set_target(job.last_round, dataclasses.asdict(self.coordinator.ctx.plan()))
        try:
            while True:
                head = self.ledger.head
                rnd = (head.round if head else 0) + 1
                if rnd > job.last_round:
                    break
                with self._cond:
                    if self.pause_requested:
                        job.progress.append(Note(rnd - 1, f"paused after round {rnd - 1}"))
                        break
                    job.current = rnd
                try:
                    self.before_round()
                    report = self.coordinator.run_round(rnd)
                except SupersededError as exc:
                    log.info("round %d: %s", rnd, exc)
                    self._note(job, Note(rnd, f"round {rnd}: another super node took over proposing ({exc}); "
                                              "training goes on there"))
                    break
                except (RoundFailed, NetError, OSError) as exc:
                    now = time.monotonic()
                    failing_since = now if failing_since is None else failing_since
                    if now - failing_since + delay > self.retry_for:
                        log.error("%s", _failed(rnd, exc))
                        tried = f"; training stopped after {now - failing_since:.0f} s of failures" \
                            if self.retry_for else ""
                        self._note(job, Note(rnd, f"{_failed(rnd, exc)}{tried}", error=True))
                        break
                    log.warning("%s; retrying in %.0f s", _failed(rnd, exc), delay)
                    self._note(job, Note(rnd, f"{_failed(rnd, exc)}; retrying in {delay:.0f} s"))
                    with self._cond:
                        self._cond.wait_for(lambda: self.pause_requested, timeout=delay)
                    delay = min(delay * 2, 30.0)
                    continue
                failing_since, delay = None, 1.0
                self._note(job, report)
        except Exception as exc:  # a bug must not leave followers waiting forever
            log.exception("training stopped")
            self._note(job, Note(job.current, f"training stopped: {exc}", error=True))
        finally:
            with self._cond:
                job.done = True
                self._cond.notify_all()

    def _note(self, job: TrainJob, progress: Progress) -> None:
        with self._cond:
            job.progress.append(progress)
            self._cond.notify_all()


def healthy_ledger(ledger: Ledger) -> Callable[[], None]:
    """A check before each round: a ledger that cannot write tries to heal first; UnavailableError when it still
    cannot (the round then fails and is retried)."""
    def check() -> None:
        if not ledger.healthy and not ledger.heal():
            raise UnavailableError(f"this node's ledger cannot write: {ledger.health_reason}")
    return check


def _failed(rnd: int, exc: BaseException) -> str:
    """"round N failed: why" (a RoundFailed says so itself)."""
    return str(exc) if isinstance(exc, RoundFailed) else f"round {rnd} failed: {exc}"
