"""The queue as a table (GET /v1/queue, `lbgat queue`): running jobs with their expected end, then the
waiting ones in queue order with their position, reason and estimated start, each with its priority
(and the priority the scheduler uses), owner, team and fair-share standing."""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from api_schemas.jobs import FairShareStanding, JobState, QueueEntry, QueueOut
from service import jobs
from service.db.models import Experiment, Team, User, utcnow
from service.settings import ServiceSettings

if TYPE_CHECKING:
    from service.api.deps import SchedulerLike

# -- the scheduler's view, as the listings read it ---------------------------------------------------

SLOW_PLAN_S = 1.0  # a plan this long (a queue of tens of thousands) makes the view's reuse bounded by time
PLAN_SHARE = 4.0  # ... then a view as old as this many times the last plan's duration is used as it is


class _Planned:
    """Per scheduler: one listing re-plans at a time; how long the last plan made for one took."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.plan_s = 0.0


_planned: weakref.WeakKeyDictionary[Any, _Planned] = weakref.WeakKeyDictionary()
_planned_lock = threading.Lock()


def current_view(scheduler: SchedulerLike, ids: Iterable[str] = ()) -> dict[str, tuple[Any, ...]]:
    """Waiting jobs' (position, reason, estimated start) for a listing: the scheduler's latest view.

    A plan covers the whole queue (fair share orders every job), so with 100,000 queued jobs it takes
    seconds, and `Scheduler.queue_view` makes a new one whenever its view is over 2 s old or lacks one
    of `ids`: every listing paid for a plan (16 s for 50 rows beside the dispatcher's own rounds). Once
    a plan made here took SLOW_PLAN_S or more, a view is used until it is PLAN_SHARE times that old
    (the dispatcher's rounds renew it meanwhile where they run), so listings spend at most about a
    fifth of the time planning; jobs submitted since have no position until the next plan. Below that
    this is `queue_view(ids)` itself. One listing re-plans at a time; the others wait for its view.
    """
    return _read(scheduler, ids, ends=False)[0]


def current_view_and_ends(
    scheduler: SchedulerLike, ids: Iterable[str] = ()
) -> tuple[dict[str, tuple[Any, ...]], dict[str, datetime]]:
    """`current_view` and the running jobs' expected ends, of one plan. `Scheduler.expected_ends`
    re-plans when the view is over 2 s old whatever its cost (GET /v1/queue still pays for that)."""
    return _read(scheduler, ids, ends=True)


def _read(
    scheduler: SchedulerLike, ids: Iterable[str], *, ends: bool
) -> tuple[dict[str, tuple[Any, ...]], dict[str, datetime]]:
    with _planned_lock:
        planned = _planned.get(scheduler)
        if planned is None:
            planned = _planned[scheduler] = _Planned()
    with planned.lock:
        before = scheduler.queue_view((), max_age_s=math.inf)  # the view as it is: never a plan
        started = time.monotonic()
        if planned.plan_s < SLOW_PLAN_S:
            view = scheduler.queue_view(ids)
        else:
            view = scheduler.queue_view((), max_age_s=PLAN_SHARE * planned.plan_s)
        expected = {}
        if ends:
            expected = scheduler.expected_ends()
            view = scheduler.queue_view((), max_age_s=math.inf)  # the plan those ends are of
        if view is not before:  # planned here (a round ending in these microseconds is as good)
            planned.plan_s = time.monotonic() - started
    return view, expected


def _effective_priorities(session: Session, settings: ServiceSettings, team_ids: set[int]) -> dict[int, int]:
    """Priority penalty per team whose budget is spent with the `lower_priority` action."""
    try:
        from service import accounting
    except ImportError:  # pragma: no cover - accounting is part of the service
        return {}
    if not team_ids or not hasattr(accounting, "budget_states"):
        return {}
    penalty = int(getattr(settings, "budget_priority_penalty", 0) or 0)
    states = accounting.budget_states(session, team_ids=team_ids)
    return {
        team_id: penalty
        for team_id, state in states.items()
        if state.exceeded and state.action == "lower_priority"
    }


def read_queue(
    session: Session,
    *,
    viewer: User,
    settings: ServiceSettings,
    view: dict[str, tuple[Any, ...]] | None,
    ends: dict[str, datetime] | None,
    team: str | None = None,
    user: str | None = None,
    kind: str | None = None,
    limit: int = 1000,
) -> QueueOut:
    """The queue the viewer may see (their team's jobs; an admin's: everyone's)."""
    states = [JobState.running, JobState.dispatching, JobState.queued, JobState.retrying]
    query = select(Experiment).where(Experiment.state.in_([s.value for s in states]))
    if not viewer.is_admin:
        query = query.where(Experiment.team_id == viewer.team_id)
    if team:
        query = query.join(Team, Experiment.team_id == Team.id).where(Team.name == team)
    if user:
        query = query.join(User, Experiment.owner_id == User.id).where(User.name == user)
    if kind:
        query = query.where(Experiment.kind == kind)
    # Every row's sort key first, whole rows (spec and all) only for those listed: with 100,000 queued
    # jobs, loading them all took 2 GB and two minutes.
    keys = session.execute(
        query.with_only_columns(Experiment.id, Experiment.state, Experiment.created_at, Experiment.team_id)
    ).all()
    view = view or {}
    ends = ends or {}
    far = 1 << 62
    waiting_keys = sorted(
        (k for k in keys if k.state in jobs.WAITING_STATES),
        key=lambda k: (view[k.id][0] if k.id in view else far, k.created_at, k.id),
    )
    shown = [k.id for k in keys if k.state not in jobs.WAITING_STATES] + [k.id for k in waiting_keys[:limit]]
    loaded = (
        {e.id: e for e in session.scalars(select(Experiment).where(Experiment.id.in_(shown)))}
        if shown
        else {}
    )
    active = [
        loaded[k.id]
        for k in sorted(keys, key=lambda k: (k.created_at, k.id))
        if k.id in loaded and k.state not in jobs.WAITING_STATES
    ]
    listed = [loaded[k.id] for k in waiting_keys[:limit] if k.id in loaded]

    user_hours, team_hours = jobs.usage_gpu_hours(session, settings=settings)
    total_user = sum(user_hours.values())
    total_team = sum(team_hours.values())
    penalties = _effective_priorities(session, settings, {k.team_id for k in keys})

    def entry(exp: Experiment) -> QueueEntry:
        position = reason = estimate = None
        if exp.state in jobs.WAITING_STATES and exp.id in view:
            position, reason, *rest = view[exp.id]
            estimate = rest[0] if rest else None
        uh, th = user_hours.get(exp.owner_id, 0.0), team_hours.get(exp.team_id, 0.0)
        stopping = exp.preempt_requested_at is not None and exp.state not in jobs.WAITING_STATES
        return QueueEntry(
            position=position,
            id=exp.id,
            name=exp.name,
            kind=exp.kind,
            state=JobState(exp.state),
            priority=exp.priority,
            effective_priority=exp.priority - penalties.get(exp.team_id, 0),
            owner=exp.owner.name,
            team=exp.team.name,
            fair_share=FairShareStanding(
                user_gpu_hours=round(uh, 6),
                user_share=round(uh / total_user, 6) if total_user > 0 else 0.0,
                team_gpu_hours=round(th, 6),
                team_share=round(th / total_team, 6) if total_team > 0 else 0.0,
            ),
            gpus=exp.gpus,
            cpus=exp.cpus,
            reason=reason,
            estimated_start=estimate,
            started_at=exp.started_at,
            expected_end=ends.get(exp.id) if exp.state not in jobs.WAITING_STATES else None,
            preempted_by=exp.preempted_by if stopping else None,
            preemptions=exp.preemptions or 0,
        )

    return QueueOut(
        generated_at=utcnow(),
        fair_share_window_h=settings.fair_share_window_h,
        running=[entry(e) for e in active],
        waiting=[entry(e) for e in listed],
        more_waiting=len(waiting_keys) - len(listed),
    )
