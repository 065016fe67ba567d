"""One federated round without any ledger: ask participants to fit, record failures, fold results into the aggregate."""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from fl.participant import FitIns, FitRes, Participant
from fl.strategy import Aggregator

log = logging.getLogger(__name__)


class RoundFailed(RuntimeError):
    """No participant produced a usable result, so the round has no new model."""

    def __init__(self, round: int, failures: list[tuple[str, str]]) -> None:
        detail = "; ".join(f"{pid}: {why}" for pid, why in failures[:3]) or "no participants"
        super().__init__(f"round {round} failed: no usable results ({detail})")
        self.round = round
        self.failures = failures


@dataclass(frozen=True)
class RoundOutcome:
    """What a round produced; ``weights`` holds only the shared keys (FedPer: base layers), to merge into the global
    state."""

    weights: dict[str, np.ndarray]
    results: list[tuple[str, FitRes]]  # in participant order; weights emptied once folded (receipt, samples kept)
    failures: list[tuple[str, str]]  # (participant id, "ErrorType: message"), in participant order
    total_samples: int


def run_round(
    round: int,
    participants: Sequence[Participant],
    global_weights: Mapping[str, np.ndarray],
    ins_for: Callable[[int, Participant], FitIns],
    aggregator: Aggregator,
    *,
    check: Callable[[Participant, FitRes], None] | None = None,
    max_workers: int = 1,
    on_result: Callable[[str, FitRes], None] | None = None,
) -> RoundOutcome:
    """Run one round; results are folded in participant order whatever the concurrency, so the aggregate is
    bit-identical. One participant failing is a failure in the outcome, never an exception.

    ``ins_for(index, participant)`` gives each participant its instructions; ``aggregator`` (the strategy's) folds
    the results; ``check(participant, res)`` may refuse a result (ValueError) before it is folded, e.g. a receipt
    that does not match; ``on_result(id, res)`` is called for each folded result, in participant order.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    instructions = [ins_for(i, p) for i, p in enumerate(participants)]
    acc = aggregator
    results: list[tuple[str, FitRes]] = []
    failures: list[tuple[str, str]] = []

    def fold(index: int, outcome: FitRes | BaseException) -> None:
        participant = participants[index]
        pid = participant.participant_id
        if isinstance(outcome, BaseException):
            failures.append((pid, f"{type(outcome).__name__}: {outcome}"))
            log.warning("round %d: participant %s failed: %s", round, pid, failures[-1][1])
            return
        try:
            _check_result(outcome, global_weights)
            if check is not None:
                check(participant, outcome)
            acc.add(outcome.weights, outcome.samples)
        except (ValueError, TypeError) as exc:
            failures.append((pid, f"rejected: {exc}"))
            log.warning("round %d: result of %s rejected: %s", round, pid, exc)
            return
        kept = dataclasses.replace(outcome, weights={})
        results.append((pid, kept))
        if on_result is not None:
            on_result(pid, kept)

    if max_workers == 1 or len(participants) <= 1:
        for i, p in enumerate(participants):
            fold(i, _call_fit(p, global_weights, instructions[i]))
    else:
        _run_concurrently(participants, global_weights, instructions, max_workers, fold)

    if acc.count == 0:
        raise RoundFailed(round, failures)
    try:
        weights = acc.result()
    except ValueError as exc:  # every result reported zero samples
        raise RoundFailed(round, failures + [("*", str(exc))]) from None
    log.info("round %d: %d results, %d failures, %d samples", round, len(results), len(failures), acc.total_samples)
    return RoundOutcome(weights=weights, results=results, failures=failures, total_samples=acc.total_samples)


def _call_fit(p: Participant, weights: Mapping[str, np.ndarray], ins: FitIns) -> FitRes | BaseException:
    try:
        return p.fit(dict(weights), ins)
    except Exception as exc:  # a dropping participant is data, not the end of the round
        return exc


def _run_concurrently(participants: Sequence[Participant], weights: Mapping[str, np.ndarray],
                      instructions: list[FitIns], max_workers: int,
                      fold: Callable[[int, FitRes | BaseException], None]) -> None:
    """Fit in a thread pool; buffer out-of-order completions and fold strictly in participant order."""
    buffered: dict[int, FitRes | BaseException] = {}
    next_index = 0
    with ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fl-fit") as pool:
        pending: dict[Future[FitRes | BaseException], int] = {
            pool.submit(_call_fit, p, weights, instructions[i]): i for i, p in enumerate(participants)
        }
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                buffered[pending.pop(future)] = future.result()
            while next_index in buffered:
                fold(next_index, buffered.pop(next_index))
                next_index += 1


def _check_result(res: FitRes, global_weights: Mapping[str, np.ndarray]) -> None:
    """A result may hold a subset of the global tensors (FedPer), each with the global shape and dtype."""
    if not isinstance(res, FitRes):
        raise TypeError(f"fit returned {type(res).__name__}, expected FitRes")
    if not res.weights:
        raise ValueError("result carries no weights")
    for name, array in res.weights.items():
        if name not in global_weights:
            raise ValueError(f"unknown tensor {name!r}")
        ref = global_weights[name]
        if not isinstance(array, np.ndarray) or array.shape != ref.shape or array.dtype != ref.dtype:
            raise ValueError(f"tensor {name!r} does not match the global model's shape {ref.shape} and dtype "
                             f"{ref.dtype}")
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise ValueError(f"tensor {name!r} has NaN or infinite values")


def evaluate_personalised(participants: Sequence[Participant], weights: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each participant's personalised accuracy on its local test split -> mean, min, max over participants that
    have one."""
    accuracies: list[float] = []
    for p in participants:
        try:
            res = p.evaluate(dict(weights))
        except Exception as exc:  # an unreachable participant just does not count
            log.warning("evaluation on %s failed: %s", p.participant_id, exc)
            continue
        if res.samples > 0:
            accuracies.append(res.accuracy)
    if not accuracies:
        return {"mean": math.nan, "min": math.nan, "max": math.nan, "count": 0}
    return {"mean": float(np.mean(accuracies)), "min": min(accuracies), "max": max(accuracies),
            "count": len(accuracies)}
