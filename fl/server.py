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

REJECTED = "rejected: "   # how a failure reason starts when the update arrived and was refused (not a dropout)


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
    validate: bool = True,
) -> RoundOutcome:
    """Run one round; results are folded in participant order whatever the concurrency, so the aggregate is
    bit-identical. One participant failing is a failure in the outcome, never an exception.

    ``ins_for(index, participant)`` gives each participant its instructions; ``aggregator`` (the strategy's) folds
    the results; ``check(participant, res)`` may refuse a result (ValueError) before it is folded, e.g. a receipt
    that does not match; ``on_result(id, res)`` is called for each folded result, in participant order.
    ``validate=False`` leaves the content checks (``check_update``) to the caller: a super node that forwards
    every update to the proposer, which validates them all in one place.
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
            if validate:
                _check_result(outcome, global_weights)
            elif not isinstance(outcome, FitRes):
                raise TypeError(f"fit returned {type(outcome).__name__}, expected FitRes")
            if check is not None:
                check(participant, outcome)
            acc.add(outcome.weights, outcome.samples)
        except (ValueError, TypeError) as exc:
            failures.append((pid, f"{REJECTED}{exc}"))
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


def check_update(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 max_norm: float | None = None) -> None:
    """An update must hold exactly the reference model's tensors (the strategy's shared keys: FedPer's personal
    layers never leave the edge node, so they are not among them), each with its shape and dtype, all finite, and
    (``max_norm``) be at most that far (L2, over the floating tensors) from the reference. ValueError naming the
    first problem. A subset is refused: it would otherwise decide which tensors an average has."""
    if not weights:
        raise ValueError("result carries no weights")
    unknown = sorted(set(weights) - set(reference))
    if unknown:
        raise ValueError(f"unknown tensor {unknown[0]!r}")
    missing = sorted(set(reference) - set(weights))
    if missing:
        raise ValueError(f"{len(missing)} tensor(s) missing, e.g. {missing[0]!r}: an update holds every shared tensor")
    squares = 0.0
    for name in sorted(weights):
        array, ref = weights[name], reference[name]
        if not isinstance(array, np.ndarray) or array.shape != ref.shape or array.dtype != ref.dtype:
            raise ValueError(f"tensor {name!r} does not match the global model's shape {ref.shape} and dtype "
                             f"{ref.dtype}")
        if np.issubdtype(array.dtype, np.floating):
            if not np.isfinite(array).all():
                raise ValueError(f"tensor {name!r} has NaN or infinite values")
            if max_norm is not None:
                squares += float(np.sum(np.square(array.astype(np.float64) - ref.astype(np.float64))))
    if max_norm is not None and math.sqrt(squares) > max_norm:
        raise ValueError(f"update is {math.sqrt(squares):.4g} from the base model (L2), more than the bound "
                         f"{max_norm:g} (--max-update-norm)")


def _check_result(res: FitRes, global_weights: Mapping[str, np.ndarray]) -> None:
    if not isinstance(res, FitRes):
        raise TypeError(f"fit returned {type(res).__name__}, expected FitRes")
    check_update(res.weights, global_weights)


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
