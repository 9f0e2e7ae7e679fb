"""The job queue's domain operations: create, transition, cancel, retry, delete, and their views.

API handlers and the scheduler both change jobs only through these functions, so that every state
change is checked against the lifecycle and recorded as an event (the history and the SSE stream).
Functions take an open Session and never commit: the caller owns the transaction.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Row, and_, func, or_, select, update
from sqlalchemy.orm import Session

from api_schemas import ExperimentSpec
from api_schemas.jobs import (
    TERMINAL_STATES,
    ExperimentOut,
    JobState,
    QueueInfo,
    ResultRow,
    StateChange,
)
from service import accounting, webhooks
from service.db.models import Event, Experiment, Team, Trial, User, utcnow
from service.settings import ServiceSettings

# Allowed transitions of the lifecycle. `retrying` is the pause between a failed attempt and the
# next dispatch; it is scheduled like `queued` (and keeps its place: created_at is unchanged).
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.dispatching, JobState.cancelled}),
    JobState.retrying: frozenset({JobState.dispatching, JobState.cancelled}),
    JobState.dispatching: frozenset(
        {
            JobState.running,
            JobState.queued,
            JobState.retrying,
            JobState.succeeded,
            JobState.failed,
            JobState.cancelled,
        }
    ),
    # running -> queued: preempted for a higher-priority job (it resumes from its checkpoint)
    JobState.running: frozenset(
        {JobState.queued, JobState.retrying, JobState.succeeded, JobState.failed, JobState.cancelled}
    ),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset({JobState.queued}),
    JobState.cancelled: frozenset({JobState.queued}),
}

WAITING_STATES = (JobState.queued.value, JobState.retrying.value)
ACTIVE_STATES = (JobState.dispatching.value, JobState.running.value)


class JobError(Exception):
    """A request the queue refuses; `status` is the HTTP status the API answers with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


class NotFound(JobError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} not found", status=404)


class Forbidden(JobError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=403)


# -- creation ----------------------------------------------------------------------------------------


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return (slug or "exp")[:40].rstrip("-")


def new_experiment_id(name: str) -> str:
    """Readable and unique: `<spec name>-<8 hex>`; also the Ray submission id's stem and the store prefix."""
    return f"{_slug(name)}-{secrets.token_hex(4)}"


def spec_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def requested_resources(spec: ExperimentSpec) -> tuple[float, float]:
    """(GPUs, CPUs) a job holds while it runs: one run's workers, times the concurrent trials of a sweep.

    `use_gpu: null` (auto) counts as GPUs: on a GPU cluster that is what the run takes, and on a CPU
    cluster admission treats GPU-less jobs by their CPUs (see `charge_rate`).
    """
    res = spec.resources
    per_run_gpus = 0.0 if res.use_gpu is False else res.num_workers * res.gpus_per_worker
    per_run_cpus = res.num_workers * res.cpus_per_worker
    runs = 1
    if spec.sweep is not None and spec.sweep.max_concurrent_trials:
        runs = spec.sweep.max_concurrent_trials
    return per_run_gpus * runs, per_run_cpus * runs


def create_experiment(
    session: Session,
    *,
    owner: User,
    spec: ExperimentSpec,
    settings: ServiceSettings,
    priority: int = 0,
    max_attempts: int | None = None,
    tags: list[str] | None = None,
    idempotency_key: str | None = None,
    cluster_has_gpus: bool | None = None,
) -> tuple[Experiment, bool]:
    """Queue a validated spec. Returns (experiment, created); a repeated idempotency key returns the
    first experiment (created=False) when the spec is the same, and refuses a different spec."""
    gpus, cpus = requested_resources(spec)
    return queue_job(
        session,
        owner=owner,
        kind="training",
        name=spec.name,
        spec_data=spec.model_dump(mode="json"),
        method=spec.method.name,
        dataset=spec.dataset.name,
        norm=spec.threat_model.norm,
        eps=float(spec.threat_model.eps),
        model=spec.model.robust.name,
        is_sweep=spec.sweep is not None,
        gpus=gpus,
        cpus=cpus,
        use_gpu=spec.resources.use_gpu,
        settings=settings,
        priority=priority,
        max_attempts=max_attempts,
        tags=tags,
        idempotency_key=idempotency_key,
        cluster_has_gpus=cluster_has_gpus,
    )


def queue_job(
    session: Session,
    *,
    owner: User,
    kind: str,
    name: str,
    spec_data: dict[str, Any],
    method: str,
    dataset: str,
    norm: str,
    eps: float,
    model: str,
    is_sweep: bool,
    gpus: float,
    cpus: float,
    use_gpu: bool | None,
    settings: ServiceSettings,
    priority: int = 0,
    max_attempts: int | None = None,
    tags: list[str] | None = None,
    idempotency_key: str | None = None,
    cluster_has_gpus: bool | None = None,
) -> tuple[Experiment, bool]:
    """Put a job of either kind (a training spec, an evaluation job spec) in the queue: one row, one
    `queued` event. The same idempotency key with the same spec returns the first job (created=False)."""
    digest = spec_hash(spec_data)
    if idempotency_key is not None:
        existing = session.scalar(
            select(Experiment).where(
                Experiment.owner_id == owner.id, Experiment.idempotency_key == idempotency_key
            )
        )
        if existing is not None:
            if existing.spec_hash != digest:
                raise JobError(
                    f"Idempotency-Key {idempotency_key!r} was used for experiment {existing.id} with another "
                    "spec; use a new key for a new submission",
                    status=409,
                )
            return existing, False
    if cluster_has_gpus is False and use_gpu is None:
        gpus = 0.0  # auto on a CPU-only cluster: the run will not ask Ray for GPUs
    charge = gpus if gpus > 0 else cpus * settings.cpu_gpu_equivalent
    now = utcnow()
    exp = Experiment(
        id=new_experiment_id(name),
        kind=kind,
        name=name,
        owner_id=owner.id,
        team_id=owner.team_id,
        state=JobState.queued.value,
        priority=priority,
        tags=list(tags or []),
        method=method,
        dataset=dataset,
        norm=norm,
        eps=eps,
        model=model,
        is_sweep=is_sweep,
        gpus=gpus,
        gpu_optional=use_gpu is None,
        cpus=cpus,
        charge_rate=charge,
        spec=spec_data,
        spec_hash=digest,
        idempotency_key=idempotency_key,
        attempts=0,
        max_attempts=max_attempts or settings.default_max_attempts,
        created_at=now,
        updated_at=now,
    )
    session.add(exp)
    session.flush()  # the experiment row before its first event (foreign key)
    session.add(
        Event(
            experiment_id=exp.id, kind="state", data=_state_data(None, JobState.queued, "submitted"), at=now
        )
    )
    return exp, True


# -- transitions -------------------------------------------------------------------------------------


def _state_data(old: JobState | None, new: JobState, reason: str | None) -> dict[str, Any]:
    return {"from": old.value if old else None, "to": new.value, "reason": reason}


def transition(
    session: Session,
    exp: Experiment,
    new: JobState,
    *,
    reason: str | None = None,
    expect: JobState | None = None,
    **fields: Any,
) -> bool:
    """Move `exp` to `new` if it is still in the state we read (`expect`, default its current state).

    The UPDATE is conditional on the old state, so two replicas (or the API and the scheduler) racing
    on one job cannot both apply a change: the loser gets False and changes nothing.
    """
    old = JobState(exp.state) if expect is None else expect
    if new not in TRANSITIONS[old]:
        raise JobError(f"experiment {exp.id} is {old.value}; it cannot become {new.value}")
    now = utcnow()
    values: dict[str, Any] = {"state": new.value, "updated_at": now, **fields}
    if new in TERMINAL_STATES:
        values.setdefault("finished_at", now)
    usage = None
    if old.active and new is not JobState.running and exp.started_at is not None:
        # leaving a running attempt: charge it to the owner's fair-share usage
        values["gpu_seconds"] = (
            exp.gpu_seconds + max(0.0, (now - exp.started_at).total_seconds()) * exp.charge_rate
        )
        # ... and to the ledger (service.accounting), with the GPU-seconds since its last checkpoint lost
        usage = accounting.attempt_record(exp, new_state=new, reason=reason, ended_at=now)
        values["lost_gpu_seconds"] = (exp.lost_gpu_seconds or 0.0) + usage.lost_gpu_seconds
    event = webhooks.event_for(exp, old, new, reason)  # read before `fields` change the row
    result = session.execute(
        update(Experiment)
        .where(Experiment.id == exp.id, Experiment.state == old.value)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:
        session.expire(exp)
        return False
    for key, value in values.items():
        setattr(exp, key, value)
    session.add(Event(experiment_id=exp.id, kind="state", data=_state_data(old, new, reason), at=now))
    if usage is not None:
        session.add(usage)
    if event is not None:  # webhook deliveries, in this transaction (service.webhooks)
        webhooks.enqueue_job_event(session, exp, event, reason)
    return True


# -- access ------------------------------------------------------------------------------------------


def get_experiment(session: Session, experiment_id: str, *, viewer: User) -> Experiment:
    """The experiment, if `viewer` may see it (their team's, or any for an admin)."""
    query = select(Experiment).where(Experiment.id == experiment_id)
    exp = session.scalar(query)
    if exp is None or (not viewer.is_admin and exp.team_id != viewer.team_id):
        raise NotFound(f"experiment {experiment_id!r}")
    return exp


def require_owner(exp: Experiment, user: User) -> None:
    if not user.is_admin and exp.owner_id != user.id:
        raise Forbidden(
            f"experiment {exp.id} belongs to {exp.owner.name}; only its owner or an admin may change it"
        )


def cancel_experiment(session: Session, exp: Experiment, *, user: User) -> Experiment:
    """Queued jobs are cancelled at once; dispatched ones are marked and the scheduler stops their Ray job."""
    require_owner(exp, user)
    state = JobState(exp.state)
    if state.terminal:
        raise JobError(f"experiment {exp.id} is already {state.value}")
    if state.value in WAITING_STATES:
        if not transition(session, exp, JobState.cancelled, reason=f"cancelled by {user.name}"):
            raise JobError(f"experiment {exp.id} changed state meanwhile; try again")
        return exp
    session.execute(
        update(Experiment).where(Experiment.id == exp.id).values(cancel_requested=True, updated_at=utcnow())
    )
    exp.cancel_requested = True
    session.add(
        Event(
            experiment_id=exp.id,
            kind="state",
            data={
                "from": state.value,
                "to": state.value,
                "reason": f"cancel requested by {user.name}; stopping the Ray job",
            },
        )
    )
    return exp


def retry_experiment(session: Session, exp: Experiment, *, user: User) -> Experiment:
    """Queue a failed or cancelled experiment again. The worker resumes from the last checkpoint
    that Ray Train stored under the experiment's prefix (same experiment id, same Ray run name)."""
    require_owner(exp, user)
    state = JobState(exp.state)
    if state not in (JobState.failed, JobState.cancelled):
        raise JobError(
            f"experiment {exp.id} is {state.value}; only failed or cancelled experiments can be retried"
        )
    ok = transition(
        session,
        exp,
        JobState.queued,
        reason=f"retried by {user.name} (resumes from the last checkpoint)",
        finished_at=None,
        error=None,
        error_log_tail=None,
        cancel_requested=False,
        attempts=0,
    )
    if not ok:
        raise JobError(f"experiment {exp.id} changed state meanwhile; try again")
    return exp


# -- listing -----------------------------------------------------------------------------------------


def encode_cursor(exp: Experiment | Row[Any]) -> str:
    raw = f"{exp.created_at.isoformat()}|{exp.id}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, exp_id = raw.split("|", 1)
        created = datetime.fromisoformat(at)
        # Ours carry a UTC time and an id; a naive time (the UTC column refuses it) or a NUL (PostgreSQL
        # text cannot hold one) would fail in the query instead: a 500 for a bad cursor.
        if created.tzinfo is None or "\x00" in exp_id:
            raise ValueError("not a cursor this service returned")
        return created.astimezone(timezone.utc), exp_id  # OverflowError at the ends of time
    except (ValueError, UnicodeDecodeError, OverflowError) as exc:
        raise JobError("cursor: not a cursor this service returned", status=422) from exc


def list_experiments(
    session: Session,
    *,
    viewer: User,
    user: str | None = None,
    team: str | None = None,
    state: list[JobState] | None = None,
    method: str | None = None,
    dataset: str | None = None,
    kind: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[Experiment], str | None]:
    """Newest first, `limit` per page, keyset pagination on (created_at, id); `kind` picks training
    runs or evaluations (default: both, the queue as it is).

    The page's keys first, then its rows: ordering whole rows (specs and all) made SQLite sort every
    match in a temporary B-tree (16 s for 50 of 100,000 queued jobs, under load); the keys come from
    the (state | team_id [, state], created_at, id) indexes in key order (migration 0005).
    """
    query = select(Experiment.id, Experiment.created_at)
    if not viewer.is_admin:
        query = query.where(Experiment.team_id == viewer.team_id)
    if user:
        query = query.join(User, Experiment.owner_id == User.id).where(User.name == user)
    if team:
        query = query.join(Team, Experiment.team_id == Team.id).where(Team.name == team)
    if state:
        query = query.where(Experiment.state.in_([s.value for s in state]))
    if method:
        query = query.where(Experiment.method == method)
    if dataset:
        query = query.where(Experiment.dataset == dataset)
    if kind:
        query = query.where(Experiment.kind == kind)
    if cursor:
        at, exp_id = decode_cursor(cursor)
        query = query.where(
            or_(Experiment.created_at < at, and_(Experiment.created_at == at, Experiment.id < exp_id))
        )
    keys = session.execute(
        query.order_by(Experiment.created_at.desc(), Experiment.id.desc()).limit(limit + 1)
    ).all()
    more = len(keys) > limit
    ids = [k.id for k in keys[:limit]]
    loaded: dict[str, Experiment] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        loaded.update((e.id, e) for e in session.scalars(select(Experiment).where(Experiment.id.in_(chunk))))
    rows = [loaded[i] for i in ids if i in loaded]  # one deleted between the two reads is left out
    return rows, encode_cursor(keys[limit - 1]) if more else None


def history(session: Session, experiment_id: str) -> list[StateChange]:
    events = session.scalars(
        select(Event).where(Event.experiment_id == experiment_id, Event.kind == "state").order_by(Event.id)
    )
    return [
        StateChange(
            from_state=e.data.get("from"), to_state=e.data["to"], at=e.at, reason=e.data.get("reason")
        )
        for e in events
    ]


def metric_rows(session: Session, experiment_id: str, trial: str | None = "main") -> list[dict[str, Any]]:
    query = select(Event).where(Event.experiment_id == experiment_id, Event.kind == "metric")
    if trial is not None:
        query = query.where(Event.trial == trial)
    return [{"trial": e.trial, **e.data} for e in session.scalars(query.order_by(Event.id))]


def trials(session: Session, experiment_id: str) -> list[Trial]:
    return list(
        session.scalars(select(Trial).where(Trial.experiment_id == experiment_id).order_by(Trial.name))
    )


def to_out(
    exp: Experiment, *, settings: ServiceSettings, queue: dict[str, tuple[Any, ...]] | None = None
) -> ExperimentOut:
    info = None
    if queue is not None and exp.state in WAITING_STATES and exp.id in queue:
        # (position, reason) or (position, reason, estimated start) from Scheduler.queue_view
        position, reason, *rest = queue[exp.id]
        info = QueueInfo(position=position, reason=reason, estimated_start=rest[0] if rest else None)
    base = settings.dashboard_base()
    return ExperimentOut(
        id=exp.id,
        kind=exp.kind,
        name=exp.name,
        owner=exp.owner.name,
        team=exp.team.name,
        state=JobState(exp.state),
        priority=exp.priority,
        method=exp.method,
        dataset=exp.dataset,
        norm=exp.norm,
        eps=exp.eps,
        gpus=exp.gpus,
        cpus=exp.cpus,
        is_sweep=exp.is_sweep,
        tags=list(exp.tags or []),
        attempts=exp.attempts,
        max_attempts=exp.max_attempts,
        created_at=exp.created_at,
        started_at=exp.started_at,
        finished_at=exp.finished_at,
        error=exp.error,
        ray_job_id=exp.ray_job_id,
        dashboard_url=f"{base}/#/jobs/{exp.ray_job_id}" if base and exp.ray_job_id else None,
        queue=info,
        latest_metrics=exp.latest_metrics,
    )


def result_row(exp: Experiment, *, require_results: bool = True) -> ResultRow | None:
    """The experiment's leaderboard row; None before it has results, unless `require_results` is
    False (a comparison shows unfinished experiments as rows without accuracies)."""
    if not exp.results and require_results:
        return None
    return ResultRow.model_validate(
        {
            **(exp.results or {}),
            "experiment_id": exp.id,
            "name": exp.name,
            "owner": exp.owner.name,
            "team": exp.team.name,
            "method": exp.method,
            "dataset": exp.dataset,
            "norm": exp.norm,
            "eps": exp.eps,
            "model": exp.model,
            "finished_at": exp.finished_at,
        }
    )


def leaderboard(
    session: Session,
    *,
    viewer: User,
    dataset: str | None = None,
    norm: str | None = None,
    eps: float | None = None,
    method: str | None = None,
    limit: int = 50,
) -> list[ResultRow]:
    """Finished experiments of the viewer's team ranked by AutoAttack accuracy, then the worst attack."""
    query = select(Experiment).where(
        Experiment.kind == "training",
        Experiment.state == JobState.succeeded.value,
        Experiment.results.is_not(None),
    )
    if not viewer.is_admin:
        query = query.where(Experiment.team_id == viewer.team_id)
    if dataset:
        query = query.where(Experiment.dataset == dataset)
    if norm:
        query = query.where(Experiment.norm == norm)
    if eps is not None:
        query = query.where(func.abs(Experiment.eps - eps) < 1e-6)
    if method:
        query = query.where(Experiment.method == method)
    query = query.order_by(
        func.coalesce(Experiment.autoattack_accuracy, Experiment.robust_accuracy, -1.0).desc(),
        func.coalesce(Experiment.robust_accuracy, -1.0).desc(),
        func.coalesce(Experiment.clean_accuracy, -1.0).desc(),
        Experiment.finished_at,
    ).limit(limit)
    return [row for row in (result_row(e) for e in session.scalars(query)) if row is not None]


# -- fair-share usage --------------------------------------------------------------------------------


def usage_gpu_hours(
    session: Session, *, settings: ServiceSettings, now: datetime | None = None
) -> tuple[dict[int, float], dict[int, float]]:
    """GPU-hours charged per user and per team within the fair-share window (running attempts included)."""
    now = now or utcnow()
    since = now - timedelta(hours=settings.fair_share_window_h)
    rows = session.execute(
        select(
            Experiment.owner_id,
            Experiment.team_id,
            Experiment.gpu_seconds,
            Experiment.state,
            Experiment.started_at,
            Experiment.charge_rate,
        ).where(
            or_(Experiment.finished_at.is_(None), Experiment.finished_at >= since),
            or_(Experiment.gpu_seconds > 0, Experiment.state == JobState.running.value),
        )
    )
    users: dict[int, float] = {}
    teams: dict[int, float] = {}
    for owner_id, team_id, seconds, state, started_at, rate in rows:
        total = seconds or 0.0
        if state == JobState.running.value and started_at is not None:
            total += max(0.0, (now - started_at).total_seconds()) * rate
        users[owner_id] = users.get(owner_id, 0.0) + total / 3600
        teams[team_id] = teams.get(team_id, 0.0) + total / 3600
    return users, teams
