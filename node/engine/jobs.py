"""Training jobs: the proposer runs rounds one job at a time in a background thread, which consoles follow."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from fl.server import RoundFailed
from node.engine.coordinator import Coordinator
from node.engine.errors import NetError
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

    def __init__(self, coordinator: Coordinator, rounds_default: int):
        self.coordinator = coordinator
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

    def start(self, rounds: int) -> tuple[TrainJob, bool]:
        """Start a job of ``rounds`` rounds after the head (0: up to the configured total); (job, False) when one
        is already running (the caller follows it)."""
        with self._cond:
            if self._job is not None and not self._job.done:
                return self._job, False
            head = self.ledger.head
            head_round = head.round if head else 0
            last = head_round + rounds if rounds else self.rounds_default
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
        try:
            for rnd in range(job.first_round, job.last_round + 1):
                with self._cond:
                    if self.pause_requested:
                        job.progress.append(Note(rnd - 1, f"paused after round {rnd - 1}"))
                        break
                    job.current = rnd
                try:
                    report = self.coordinator.run_round(rnd)
                except (RoundFailed, NetError) as exc:
                    log.error("round %d failed: %s", rnd, exc)
                    with self._cond:
                        job.progress.append(Note(rnd, f"round {rnd} failed: {exc}"))
                    break
                with self._cond:
                    job.progress.append(report)
                    self._cond.notify_all()
        except Exception as exc:  # a bug must not leave followers waiting forever
            log.exception("training stopped")
            with self._cond:
                job.progress.append(Note(job.current, f"training stopped: {exc}"))
        finally:
            with self._cond:
                job.done = True
                self._cond.notify_all()
