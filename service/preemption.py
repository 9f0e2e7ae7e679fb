"""Checkpoint-aware preemption: which running jobs make way for a waiting higher-priority one.

Pure functions, used by `service.scheduler.plan` and tested on their own. A job that cannot be admitted
for capacity (a Ray job slot, GPUs, CPUs) may stop running jobs of strictly lower priority when
preemption is on (LBGAT_PREEMPTION_ENABLED), its priority is at least LBGAT_PREEMPT_MIN_PRIORITY and the
victims have run at least LBGAT_PREEMPT_MIN_RUN_S. Victims are chosen by the least work lost (GPU-time
since their last checkpoint, `(now - max(started_at, last_checkpoint_at)) * gpus`; CPU jobs count
their GPU-equivalent charge rate), then the lowest priority, then the most recent start; only as
many as the job needs. A job blocked by its owner's own limits never preempts anyone, and a job with
victims still stopping gets no second decision (the scheduler passes those in as `in_flight`).

How a victim stops (see service.scheduler): the scheduler marks it (`preempt_requested_at`,
`preempted_by`, a `state` event from its state to itself), stops its Ray job (the entrypoint gets
SIGTERM, saves a just-in-time checkpoint and writes `<trial>/preempted.json`, Ray kills it after
LBGAT_PREEMPTION_GRACE_S; past grace + LBGAT_PREEMPTION_STOP_MARGIN_S the scheduler stops it again),
and once Ray reports it ended puts it back in `queued` with the reason "preempted by <job>"; its
attempt is not charged.

The hand-over: the preempting job is dispatched in the same round, right after the victims' stop, on
what they free; its Ray job's driver starts (Python, imports, `ray.init`, the trainer's setup) while
the victims checkpoint, and Ray itself holds its workers until the victims' actors release the
resources. From the decision on, a victim whose preemptor is dispatched holds nothing in the plan
(its slot, GPUs and CPUs are counted once, as the preemptor's and, beyond what it takes, as free for
the jobs planned after it), so no slot is given twice; a victim whose preemptor is no longer active
(cancelled, or its submission failed) holds what it has until it ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

EPS = 1e-9

#: written by the worker into experiments/<id>/<trial>/ when it saved its just-in-time checkpoint
PREEMPTED_FILE = "preempted.json"


@dataclass(frozen=True)
class PreemptionPolicy:
    min_priority: int
    min_run_s: float
    now: datetime


class Running(Protocol):
    """What choosing a victim needs of a running job (service.scheduler.Holder has it)."""

    id: str
    priority: int
    gpus: float
    cpus: float
    charge_rate: float
    started_at: datetime | None
    last_checkpoint_at: datetime | None
    preempting_for: str | None


def work_lost_s(job: Running, now: datetime) -> float:
    """GPU-seconds a stop now would lose: time since the last checkpoint (or the start) times GPUs
    (the charge rate, in GPU-equivalents, for a job without GPUs)."""
    assert job.started_at is not None
    since = job.started_at
    if job.last_checkpoint_at is not None and job.last_checkpoint_at > since:
        since = job.last_checkpoint_at
    rate = job.gpus if job.gpus > 0 else job.charge_rate
    return max(0.0, (now - since).total_seconds()) * rate


def eligible(job: Running, *, priority: int, policy: PreemptionPolicy) -> bool:
    """May `job` be stopped for a job of `priority`? Strictly lower priority, running long enough,
    not already being preempted."""
    return (
        bool(job.id)
        and job.preempting_for is None
        and job.started_at is not None
        and job.priority < priority
        and (policy.now - job.started_at).total_seconds() >= policy.min_run_s
    )


def victim_order(jobs: Iterable[Running], now: datetime) -> list[Running]:
    """Least work lost first, then lowest priority, then the most recent start."""
    return sorted(
        jobs,
        key=lambda j: (work_lost_s(j, now), j.priority, -j.started_at.timestamp(), j.id),  # type: ignore[union-attr]
    )


def choose_victims(
    *,
    priority: int,
    need_slots: int,
    need_gpus: float,
    need_cpus: float,
    running: Iterable[Running],
    policy: PreemptionPolicy,
    taken: set[str] | frozenset[str] = frozenset(),
) -> list[Running] | None:
    """The fewest eligible jobs, in victim order, whose stop frees `need_slots` Ray job slots,
    `need_gpus` GPUs and `need_cpus` CPUs; None when all of them together would not."""
    if need_slots <= 0 and need_gpus <= EPS and need_cpus <= EPS:
        return []
    pool = victim_order(
        (j for j in running if j.id not in taken and eligible(j, priority=priority, policy=policy)),
        policy.now,
    )
    chosen: list[Running] = []
    slots = gpus = cpus = 0.0

    def enough(s: float, g: float, c: float) -> bool:
        return s >= need_slots and g >= need_gpus - EPS and c >= need_cpus - EPS

    for job in pool:
        if enough(slots, gpus, cpus):
            break
        helps = (
            slots < need_slots
            or (job.gpus > 0 and gpus < need_gpus - EPS)
            or (job.cpus > 0 and cpus < need_cpus - EPS)
        )
        if helps:
            chosen.append(job)
            slots, gpus, cpus = slots + 1, gpus + job.gpus, cpus + job.cpus
    if not enough(slots, gpus, cpus):
        return None
    # a job taken early may have become unnecessary once larger ones were added: drop those, the
    # ones losing the most work first
    for job in reversed(list(chosen)):
        if enough(slots - 1, gpus - job.gpus, cpus - job.cpus):
            chosen.remove(job)
            slots, gpus, cpus = slots - 1, gpus - job.gpus, cpus - job.cpus
    return chosen


def waiting_reason(victims: Sequence[str]) -> str:
    return f"waiting for {', '.join(victims)} to checkpoint and stop (preempted)"


def requeue_reason(preemptor: str | None, *, checkpoint_saved: bool, why: str | None = None) -> str:
    if preemptor is None and why:
        why = f"preempted ({why})"
    else:
        why = f"preempted by {preemptor or 'a higher-priority job'}"
    if checkpoint_saved:
        return f"{why}; resumes from its just-in-time checkpoint"
    return f"{why}; no just-in-time checkpoint was saved, resumes from its last checkpoint"


def saved_at(marker: Any) -> float | None:
    """`saved_at` (unix time) of a preempted.json, or None if it is not one."""
    if isinstance(marker, dict):
        value = marker.get("saved_at")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None
