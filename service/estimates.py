"""Start-time estimates of waiting jobs: pure functions, used by the scheduler and tested on their own.

What runs now ends when its work left is done: a training run's epochs left (the spec's epochs minus
the epochs its metrics report) times its seconds per epoch, counted from its latest row. An epoch's
seconds are the wall time between consecutive epochs' rows (`extra.finished_at`: training plus
validation, checkpoint and report, the median of the latest ones, so a restart's gap does not count),
or where fewer than two rows follow each other, the mean training `seconds` of the rows (which leaves
out validation and reporting, a third of an epoch on the digits demo: such estimates come early); an evaluation's shards left times its seconds per shard (from its
progress rows of this attempt). Where that is unknown (no row yet, a sweep), a job is expected to take
LBGAT_ESTIMATE_DEFAULT_DURATION_S from its start. Waiting jobs then start in queue order (the
scheduler does not backfill) as soon as a Ray job slot and their GPUs and CPUs are free: the
simulation frees what each job holds at its expected end. Per-user limits are not simulated: a job
held by its owner's limit is counted as if it ran in its turn.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import pairwise
from typing import Any

EPS = 1e-9
#: metric rows averaged for a running job's seconds per epoch
RATE_ROWS = 5


@dataclass(frozen=True)
class Busy:
    """A running (or dispatched) job: what it holds, until when."""

    id: str
    gpus: float
    cpus: float
    ends_at: datetime


@dataclass(frozen=True)
class Ahead:
    """A waiting job, in queue order: what it will hold, for how long."""

    id: str
    gpus: float
    cpus: float
    duration_s: float


def estimate_starts(
    waiting: Sequence[Ahead],
    running: Iterable[Busy],
    *,
    gpus: float,
    cpus: float,
    max_running: int,
    now: datetime,
) -> dict[str, datetime | None]:
    """Each waiting job's expected start (None: it asks for more than the cluster has)."""
    heap: list[tuple[datetime, int, float, float]] = []
    free_g, free_c, free_s = gpus, cpus, max_running
    for n, job in enumerate(running):
        heapq.heappush(heap, (max(job.ends_at, now), n, job.gpus, job.cpus))
        free_g, free_c, free_s = free_g - job.gpus, free_c - job.cpus, free_s - 1
    seq = len(heap)
    t = now
    out: dict[str, datetime | None] = {}
    for job in waiting:
        if job.gpus > gpus + EPS or job.cpus > cpus + EPS or max_running <= 0:
            out[job.id] = None
            continue
        while (free_s < 1 or job.gpus > free_g + EPS or job.cpus > free_c + EPS) and heap:
            ends, _, g, c = heapq.heappop(heap)
            t = max(t, ends)
            free_g, free_c, free_s = free_g + g, free_c + c, free_s + 1
        out[job.id] = t
        free_g, free_c, free_s = free_g - job.gpus, free_c - job.cpus, free_s - 1
        seq += 1
        heapq.heappush(heap, (t + timedelta(seconds=job.duration_s), seq, job.gpus, job.cpus))
    return out


def _num(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def total_epochs(spec: dict[str, Any] | None) -> int | None:
    """A single run's epochs from its spec; None for a sweep (its trials' epochs vary) or no spec."""
    if not isinstance(spec, dict) or spec.get("sweep"):
        return None
    epochs = (spec.get("optimization") or {}).get("epochs")
    return int(epochs) if isinstance(epochs, int) and epochs > 0 else None


def epoch_seconds(rows: Sequence[dict[str, Any]]) -> float | None:
    """Seconds per epoch from metrics rows (oldest first): the median wall time between consecutive
    epochs' `extra.finished_at`, else the mean of their training `seconds`; None if neither."""
    walls = []
    for before, after in pairwise(rows):
        e0, e1 = _num(before.get("epoch")), _num(after.get("epoch"))
        t0 = _num((before.get("extra") or {}).get("finished_at"))
        t1 = _num((after.get("extra") or {}).get("finished_at"))
        if None not in (e0, e1, t0, t1) and e1 == e0 + 1 and t1 > t0:
            walls.append(t1 - t0)
    if walls:
        return statistics.median(walls)
    seconds = [s for s in (_num(r.get("seconds")) for r in rows) if s is not None and s >= 0]
    return sum(seconds) / len(seconds) if seconds else None


def training_left_s(spec: dict[str, Any] | None, rows: Sequence[dict[str, Any]]) -> float | None:
    """Seconds of training left after the last of `rows` (metrics.jsonl rows, oldest first):
    epochs left times the seconds per epoch of the latest rows (`epoch_seconds`); None if unknown."""
    epochs = total_epochs(spec)
    if epochs is None:
        return None
    done = [r for r in rows if _num(r.get("epoch")) is not None]
    if not done:
        return None
    per_epoch = epoch_seconds(done[-RATE_ROWS:])
    if per_epoch is None:
        return None
    left = max(0, epochs - int(_num(done[-1]["epoch"]) or 0))
    return left * per_epoch


def evaluation_left_s(rows: Sequence[dict[str, Any]], started_at: datetime | None) -> float | None:
    """Seconds left of an evaluation after its last progress row (one per finished shard): shards
    left times the seconds per shard of this attempt (rows since `started_at`); None if unknown."""
    if not rows or started_at is None:
        return None
    t0 = started_at.timestamp()
    mine = [r for r in rows if (_num(r.get("time")) or 0.0) >= t0]
    last = rows[-1]
    n_shards, done = _num(last.get("n_shards")), _num(last.get("shards_done"))
    if not mine or n_shards is None or done is None:
        return None
    t_last = _num(mine[-1].get("time")) or t0
    per_shard = (t_last - t0) / len(mine)
    return max(0.0, n_shards - done) * per_shard


def expected_end(
    *,
    kind: str,
    spec: dict[str, Any] | None,
    rows: Sequence[dict[str, Any]],
    last_row_at: datetime | None,
    started_at: datetime | None,
    now: datetime,
    default_s: float,
) -> datetime:
    """When a running job is expected to end (never before `now`)."""
    if kind == "evaluation":
        left = evaluation_left_s(rows, started_at)
        t_last = _num(rows[-1].get("time")) if rows else None
        base = (
            datetime.fromtimestamp(t_last, tz=now.tzinfo) if t_last is not None and left is not None else None
        )
    else:
        left = training_left_s(spec, rows)
        base = last_row_at if left is not None else None
    if left is None or base is None:
        end = (started_at or now) + timedelta(seconds=default_s)
    else:
        end = base + timedelta(seconds=left)
    return max(end, now)


def expected_duration_s(
    *, kind: str, spec: dict[str, Any] | None, latest: dict[str, Any] | None, default_s: float
) -> float:
    """How long a waiting job will run once started: from its latest metrics row where it ran before
    (a preempted or retried training run resumes from its checkpoint), else `default_s`."""
    if kind != "evaluation" and latest:
        left = training_left_s(spec, [latest])
        if left is not None:
            return left
    return default_s
