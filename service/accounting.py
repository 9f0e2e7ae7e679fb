"""Accounting: the GPU-/CPU-hour ledger, usage reports, team budgets and what a spent budget does.

The ledger (`usage_records`) has one row per attempt that ran: `service.jobs.transition` builds it with
`attempt_record` when a started attempt leaves the active states, and adds it in the same transaction
as the state change. An attempt's outcome is succeeded, failed, retrying (failed, will run again),
cancelled, preempted (the scheduler asked it to make way: `preempt_requested_at`, or it went back to
the queue with a reason starting "preempted"), or lost (back to the queue for any other reason). Its
lost GPU-seconds are the part after its last checkpoint (or its start): nothing for a success.

Usage over a window `[since, until)` counts the part of each attempt inside the window (an attempt
that spans a boundary is prorated) plus the running attempts up to now.

Budgets: a team's GPU-hours per UTC calendar period (day, week from Monday, month). At
`budget_warning_fraction` (80%) the team is warned: the log (once per period and process) and the
`budget.warning` webhook event (once per period and webhook). Once spent, the budget's action applies
to the team's waiting jobs in the scheduler: `lower_priority` subtracts LBGAT_BUDGET_PRIORITY_PENALTY
from their priority, `hold` keeps them waiting with the reason "team <t> spent its budget: ...".
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from api_schemas.jobs import JobState
from service.db.models import Experiment, Team, TeamBudget, UsageRecord, User, utcnow
from service.settings import ServiceSettings

log = logging.getLogger("service.accounting")

PREEMPTED = "preempted"
FAILURE_OUTCOMES = frozenset({"failed", "retrying", "lost"})


# -- the ledger --------------------------------------------------------------------------------------


def attempt_outcome(exp: Experiment, new: JobState, reason: str | None) -> str:
    """How the attempt that `exp` is leaving ends, read before the state change is applied."""
    if new is JobState.succeeded:
        return "succeeded"
    if new is JobState.cancelled:
        return "cancelled"
    if exp.preempt_requested_at is not None or (
        new is JobState.queued and (reason or "").startswith("preempted")
    ):
        return PREEMPTED
    if new is JobState.failed:
        return "failed"
    if new is JobState.retrying:
        return "retrying"
    return "lost"


def attempt_record(
    exp: Experiment, *, new_state: JobState, reason: str | None, ended_at: datetime
) -> UsageRecord:
    """The ledger row of the attempt `exp` is leaving (not yet added to a session): its GPU-
    equivalent and CPU seconds, its outcome and the GPU-seconds lost since its last checkpoint."""
    assert exp.started_at is not None
    seconds = max(0.0, (ended_at - exp.started_at).total_seconds())
    outcome = attempt_outcome(exp, new_state, reason)
    lost = 0.0
    if outcome != "succeeded":
        since = exp.started_at
        if exp.last_checkpoint_at is not None and exp.last_checkpoint_at > since:
            since = min(exp.last_checkpoint_at, ended_at)
        lost = max(0.0, (ended_at - since).total_seconds()) * exp.charge_rate
    return UsageRecord(
        experiment_id=exp.id,
        attempt=exp.attempts,
        user_id=exp.owner_id,
        team_id=exp.team_id,
        method=exp.method,
        kind=exp.kind,
        gpus=exp.gpus,
        cpus=exp.cpus,
        started_at=exp.started_at,
        ended_at=ended_at,
        gpu_seconds=seconds * exp.charge_rate,
        cpu_seconds=seconds * exp.cpus,
        outcome=outcome,
        lost_gpu_seconds=lost,
    )


def record_attempt(
    session: Session, exp: Experiment, *, new_state: JobState, reason: str | None, ended_at: datetime
) -> UsageRecord:
    """Add the ledger row of the attempt `exp` is leaving to `session` (for callers outside
    `transition`, which adds its row only once its conditional UPDATE applied)."""
    record = attempt_record(exp, new_state=new_state, reason=reason, ended_at=ended_at)
    session.add(record)
    return record


# -- usage over a window -----------------------------------------------------------------------------


@dataclass
class Usage:
    gpu_seconds: float = 0.0
    cpu_seconds: float = 0.0
    lost_preemption_seconds: float = 0.0
    lost_failure_seconds: float = 0.0
    attempts: int = 0
    running: int = 0

    def add(self, gpu: float, cpu: float, lost: float, outcome: str | None) -> None:
        self.gpu_seconds += gpu
        self.cpu_seconds += cpu
        if outcome == PREEMPTED:
            self.lost_preemption_seconds += lost
        elif outcome in FAILURE_OUTCOMES:
            self.lost_failure_seconds += lost
        self.attempts += 1
        if outcome is None:
            self.running += 1

    def hours(self) -> dict[str, Any]:
        return {
            "gpu_hours": self.gpu_seconds / 3600,
            "cpu_hours": self.cpu_seconds / 3600,
            "lost_preemption_gpu_hours": self.lost_preemption_seconds / 3600,
            "lost_failure_gpu_hours": self.lost_failure_seconds / 3600,
            "attempts": self.attempts,
            "running": self.running,
        }


@dataclass(frozen=True)
class Attempt:
    """An attempt's part of a usage query: who, what, and its seconds inside the window."""

    user_id: int
    team_id: int
    method: str
    gpu: float
    cpu: float
    lost: float
    outcome: str | None  # None: still running


def _overlap(start: datetime, end: datetime, since: datetime, until: datetime) -> tuple[float, float]:
    """(seconds of [start, end) inside [since, until), the attempt's whole duration)."""
    whole = max(0.0, (end - start).total_seconds())
    inside = max(0.0, (min(end, until) - max(start, since)).total_seconds())
    return inside, whole


def attempts_in(
    session: Session,
    *,
    since: datetime,
    until: datetime,
    team_ids: Iterable[int] | None = None,
    now: datetime | None = None,
) -> list[Attempt]:
    """Every attempt's share of `[since, until)`: the ledger's rows (prorated when they span a
    boundary) and the running attempts up to `now` (their lost part is not known yet)."""
    now = now or utcnow()
    teams = None if team_ids is None else list(team_ids)
    out: list[Attempt] = []
    query = select(
        UsageRecord.user_id,
        UsageRecord.team_id,
        UsageRecord.method,
        UsageRecord.started_at,
        UsageRecord.ended_at,
        UsageRecord.gpu_seconds,
        UsageRecord.cpu_seconds,
        UsageRecord.lost_gpu_seconds,
        UsageRecord.outcome,
    ).where(UsageRecord.ended_at > since, UsageRecord.started_at < until)
    if teams is not None:
        query = query.where(UsageRecord.team_id.in_(teams))
    for user_id, team_id, method, start, end, gpu, cpu, lost, outcome in session.execute(query):
        inside, whole = _overlap(start, end, since, until)
        share = 1.0 if whole <= 0 or inside >= whole else inside / whole
        if share <= 0 and whole > 0:
            continue
        # the lost part is the attempt's end, [end - lost / rate, end): prorated the same way
        lost_inside = lost * share
        if lost > 0 and whole > 0 and gpu > 0:
            rate = gpu / whole
            inside_lost, _ = _overlap(end - timedelta(seconds=lost / rate), end, since, until)
            lost_inside = min(lost, inside_lost * rate)
        out.append(Attempt(user_id, team_id, method, gpu * share, cpu * share, lost_inside, outcome))
    running = select(
        Experiment.owner_id,
        Experiment.team_id,
        Experiment.method,
        Experiment.started_at,
        Experiment.charge_rate,
        Experiment.cpus,
    ).where(
        Experiment.state == JobState.running.value,
        Experiment.started_at.is_not(None),
        Experiment.started_at < until,
    )
    if teams is not None:
        running = running.where(Experiment.team_id.in_(teams))
    end = min(now, until)
    for user_id, team_id, method, start, rate, cpus in session.execute(running):
        if end <= since:
            continue
        inside, _ = _overlap(start, end, since, until)
        out.append(Attempt(user_id, team_id, method, inside * rate, inside * cpus, 0.0, None))
    return out


def usage_by(
    session: Session,
    *,
    group_by: str,
    since: datetime,
    until: datetime,
    team_ids: Iterable[int] | None = None,
    now: datetime | None = None,
) -> tuple[dict[Any, Usage], Usage]:
    """Usage per user id, team id or method (`group_by`), and the total."""
    groups: dict[Any, Usage] = {}
    total = Usage()
    field = {"user": "user_id", "team": "team_id", "method": "method"}[group_by]
    for a in attempts_in(session, since=since, until=until, team_ids=team_ids, now=now):
        key = getattr(a, field)
        groups.setdefault(key, Usage()).add(a.gpu, a.cpu, a.lost, a.outcome)
        total.add(a.gpu, a.cpu, a.lost, a.outcome)
    return groups, total


# -- budgets -----------------------------------------------------------------------------------------


def period_bounds(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar day, week (from Monday) or month holding `now`: [start, end)."""
    now = now.astimezone(timezone.utc)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if period == "month":
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
        return start, end
    raise ValueError(f"unknown budget period {period!r}: day, week or month")


@dataclass(frozen=True)
class BudgetState:
    team_id: int
    team: str
    period: str
    period_start: datetime
    period_end: datetime
    used: float  # GPU-hours in the current period
    budget: float  # GPU-hours per period
    fraction: float
    action: str
    warning: bool
    exceeded: bool
    updated_at: datetime

    @property
    def hold_reason(self) -> str:
        return (
            f"team {self.team} spent its budget: {self.used:.1f} of {self.budget:g} GPU-hours this "
            f"{self.period} (held until {self.period_end:%Y-%m-%d %H:%M} UTC)"
        )


def budget_states(
    session: Session,
    now: datetime | None = None,
    *,
    warning_fraction: float = 0.8,
    team_ids: Iterable[int] | None = None,
) -> dict[int, BudgetState]:
    """Every budgeted team's standing in its current period: {team_id: BudgetState}."""
    now = now or utcnow()
    query = select(TeamBudget, Team.name).join(Team, Team.id == TeamBudget.team_id)
    if team_ids is not None:
        query = query.where(TeamBudget.team_id.in_(list(team_ids)))
    budgets = session.execute(query).all()
    if not budgets:
        return {}
    by_period: dict[str, list[tuple[TeamBudget, str]]] = {}
    for budget, name in budgets:
        by_period.setdefault(budget.period, []).append((budget, name))
    states: dict[int, BudgetState] = {}
    for period, rows in by_period.items():
        start, end = period_bounds(period, now)
        used, _ = usage_by(
            session, group_by="team", since=start, until=now, team_ids=[b.team_id for b, _ in rows], now=now
        )
        for budget, name in rows:
            hours = used[budget.team_id].gpu_seconds / 3600 if budget.team_id in used else 0.0
            fraction = hours / budget.gpu_hours if budget.gpu_hours > 0 else float("inf")
            states[budget.team_id] = BudgetState(
                team_id=budget.team_id,
                team=name,
                period=period,
                period_start=start,
                period_end=end,
                used=hours,
                budget=budget.gpu_hours,
                fraction=fraction,
                action=budget.action,
                warning=fraction >= warning_fraction,
                exceeded=fraction >= 1.0,
                updated_at=budget.updated_at,
            )
    return states


# (team, period start, what) already logged by this process: the log says each once per period
_logged: set[tuple[str, datetime, str]] = set()
_logged_lock = threading.Lock()


def _log_once(state: BudgetState, what: str, message: str) -> None:
    key = (state.team, state.period_start, what)
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.warning(message)


def notify_budgets(session: Session, states: dict[int, BudgetState]) -> None:
    """Log each warning and each spent budget once per period, and queue the `budget.warning`
    webhook event (once per period and webhook) in the caller's transaction."""
    from service import webhooks

    for state in states.values():
        if not state.warning:
            continue
        _log_once(
            state,
            "warning",
            f"team {state.team} has used {state.used:.1f} of its {state.budget:g} GPU-hours this "
            f"{state.period} ({100 * state.fraction:.0f}%)",
        )
        if state.exceeded:
            _log_once(
                state,
                "exceeded",
                f"{state.hold_reason if state.action == 'hold' else 'team ' + state.team + ' spent its budget'}; "
                f"its waiting jobs: {state.action.replace('_', ' ')}",
            )
        webhooks.enqueue_budget_warning(session, state)


def apply_budgets(
    session: Session,
    candidates: Sequence[Any],
    active: Sequence[Any] = (),
    *,
    settings: ServiceSettings,
    notify: bool = False,
    now: datetime | None = None,
) -> tuple[list[Any], list[Any]]:
    """The scheduler's waiting candidates and running holders (service.scheduler's Candidate and
    Holder) with spent budgets applied. `lower_priority`: both get their priority lowered by
    LBGAT_BUDGET_PRIORITY_PENALTY (a running job of the team is then a likelier victim of preemption);
    `hold`: the candidates get the hold reason (plan() keeps them waiting; they hold up no one).
    `notify`: also warn (see notify_budgets), in the scheduler's claiming transaction."""
    states = budget_states(session, now, warning_fraction=settings.budget_warning_fraction)
    if not states:
        return list(candidates), list(active)
    if notify:
        notify_budgets(session, states)
    penalty = settings.budget_priority_penalty

    def spent(job: Any) -> BudgetState | None:
        state = states.get(job.team_id)
        return state if state is not None and state.exceeded else None

    waiting = []
    for job in candidates:
        state = spent(job)
        if state is None:
            waiting.append(job)
        elif state.action == "hold":
            waiting.append(dataclasses.replace(job, held=state.hold_reason))
        else:
            waiting.append(dataclasses.replace(job, priority=job.priority - penalty))
    holders = []
    for holder in active:
        state = spent(holder)
        lower = state is not None and state.action == "lower_priority" and hasattr(holder, "priority")
        holders.append(dataclasses.replace(holder, priority=holder.priority - penalty) if lower else holder)
    return waiting, holders


def team_ids_named(session: Session, names: Iterable[str]) -> dict[str, int]:
    names = list(names)
    if not names:
        return {}
    return dict(session.execute(select(Team.name, Team.id).where(Team.name.in_(names))).all())


def names_of(session: Session, *, users: Iterable[int] = (), teams: Iterable[int] = ()) -> tuple[dict, dict]:
    """({user id: (name, team name)}, {team id: name}) for a report's rows."""
    users, teams = list(users), list(teams)
    user_names: dict[int, tuple[str, str]] = {}
    if users:
        rows = session.execute(
            select(User.id, User.name, Team.name)
            .join(Team, Team.id == User.team_id)
            .where(and_(User.id.in_(users)))
        )
        user_names = {uid: (name, team) for uid, name, team in rows}
    team_names = (
        dict(session.execute(select(Team.id, Team.name).where(Team.id.in_(teams))).all()) if teams else {}
    )
    return user_names, team_names
