"""The queue as a table (GET /v1/queue, `lbgat queue`): running jobs with their expected end, then the
waiting ones in queue order with their position, reason and estimated start, each with its priority
(and the priority the scheduler uses), owner, team and fair-share standing."""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, load_only, selectinload

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


def current_view(
    scheduler: SchedulerLike, ids: Iterable[str] | Callable[[], Iterable[str]] = ()
) -> dict[str, tuple[Any, ...]]:
    """Waiting jobs' (position, reason, estimated start) for a listing: the scheduler's latest view.

    A plan covers the whole queue (fair share orders every job), so with 100,000 queued jobs it takes
    seconds, and `Scheduler.queue_view` makes a new one whenever its view is over 2 s old or lacks one
    of `ids`: every listing paid for a plan (16 s for 50 rows beside the dispatcher's own rounds). Once
    a plan made here took SLOW_PLAN_S or more, a view is used until it is PLAN_SHARE times that old
    (the dispatcher's rounds renew it meanwhile where they run), so listings spend at most about a
    fifth of the time planning; jobs submitted since have no position until the next plan. Below that
    this is `queue_view(ids)` itself. One listing re-plans at a time; the others wait for its view.
    `ids` may be a function that reads them: it is called only where they are used (plans cheap).
    """
    return _read(scheduler, ids, ends=False)[0]


def current_view_and_ends(
    scheduler: SchedulerLike, ids: Iterable[str] | Callable[[], Iterable[str]] = ()
) -> tuple[dict[str, tuple[Any, ...]], dict[str, datetime]]:
    """`current_view` and the running jobs' expected ends, of one plan (the same reuse rule: the ends
    are the view's plan's, never a plan of their own). `ids` may be a function that reads them: it is
    called only where they are used (while plans are cheap)."""
    return _read(scheduler, ids, ends=True)


def _read(
    scheduler: SchedulerLike, ids: Iterable[str] | Callable[[], Iterable[str]], *, ends: bool
) -> tuple[dict[str, tuple[Any, ...]], dict[str, datetime]]:
    with _planned_lock:
        planned = _planned.get(scheduler)
        if planned is None:
            planned = _planned[scheduler] = _Planned()
    with planned.lock:
        before = scheduler.queue_view((), max_age_s=math.inf)  # the view as it is: never a plan
        started = time.monotonic()
        if planned.plan_s < SLOW_PLAN_S:
            view = scheduler.queue_view(ids() if callable(ids) else ids)
        else:
            view = scheduler.queue_view((), max_age_s=PLAN_SHARE * planned.plan_s)
        expected = {}
        if ends:
            expected = scheduler.expected_ends(max_age_s=math.inf)  # the latest plan's: never a plan
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


#: waiting jobs' ids looked up per query while the page follows the view's order
PAGE_CHUNK = 1000


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
    """The queue the viewer may see (their team's jobs; an admin's: everyone's): the running jobs, and
    the first `limit` waiting ones in the view's order (jobs the view does not know yet, submitted
    since its plan, after them in submission order); `more_waiting` counts the others.

    `view` lists the waiting jobs in queue order (Scheduler.queue_view: position 1 first). With
    100,000 queued, reading every waiting job's sort key to order them took seconds a request; the page
    now follows the view, looking its ids up PAGE_CHUNK at a time until `limit` match the filters, and
    counts the rest. Where few jobs match (a team's tenth of the queue: walking the view would look up
    more ids than match), their keys are read and ordered instead."""
    conditions = []
    if not viewer.is_admin:
        conditions.append(Experiment.team_id == viewer.team_id)
    if team:
        conditions.append(Experiment.team_id == session.scalar(select(Team.id).where(Team.name == team)))
    if user:
        conditions.append(Experiment.owner_id == session.scalar(select(User.id).where(User.name == user)))
    if kind:
        conditions.append(Experiment.kind == kind)
    waiting = [Experiment.state.in_(jobs.WAITING_STATES), *conditions]
    view = view or {}
    ends = ends or {}

    total = session.scalar(select(func.count()).select_from(Experiment).where(*waiting)) or 0
    if total * total <= limit * len(view):  # walking the view would look up more ids than match
        keys = session.execute(select(Experiment.id, Experiment.created_at).where(*waiting)).all()
        in_view = sorted((k.id for k in keys if k.id in view), key=lambda i: view[i][0])
        page = in_view[:limit]
        if len(page) < limit:
            rest = sorted((k.created_at, k.id) for k in keys if k.id not in view)
            page += [i for _, i in rest[: limit - len(page)]]
    else:
        page = _page_from_view(session, view, waiting, limit)

    columns = (
        Experiment.id,
        Experiment.name,
        Experiment.kind,
        Experiment.state,
        Experiment.priority,
        Experiment.owner_id,
        Experiment.team_id,
        Experiment.gpus,
        Experiment.cpus,
        Experiment.created_at,
        Experiment.started_at,
        Experiment.preempt_requested_at,
        Experiment.preempted_by,
        Experiment.preemptions,
    )
    shown = select(Experiment).options(
        load_only(*columns), selectinload(Experiment.owner), selectinload(Experiment.team)
    )
    active = list(
        session.scalars(
            shown.where(Experiment.state.in_(jobs.ACTIVE_STATES), *conditions).order_by(
                Experiment.created_at, Experiment.id
            )
        )
    )
    loaded: dict[str, Experiment] = {}
    for chunk in range(0, len(page), PAGE_CHUNK):
        part = page[chunk : chunk + PAGE_CHUNK]
        loaded.update((e.id, e) for e in session.scalars(shown.where(Experiment.id.in_(part))))
    listed = [loaded[i] for i in page if i in loaded]

    user_hours, team_hours = jobs.usage_gpu_hours(session, settings=settings)
    total_user = sum(user_hours.values())
    total_team = sum(team_hours.values())
    penalties = _effective_priorities(session, settings, {e.team_id for e in (*active, *listed)})

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
        more_waiting=total - len(listed),
    )


def _page_from_view(
    session: Session, view: dict[str, tuple[Any, ...]], waiting: list[Any], limit: int
) -> list[str]:
    """The first `limit` ids of waiting jobs that match `waiting` (the state and the listing's filters),
    in the view's order, then the view's unknown ones by (created_at, id)."""
    page: list[str] = []
    ids = iter(view)
    while len(page) < limit:
        chunk = list(islice(ids, PAGE_CHUNK))
        if not chunk:
            break
        found = set(session.scalars(select(Experiment.id).where(Experiment.id.in_(chunk), *waiting)))
        page += [i for i in chunk if i in found]
    del page[limit:]
    if len(page) < limit:  # submitted since the view's plan: after it, first come first
        newer = session.scalars(
            select(Experiment.id)
            .where(*waiting)
            .order_by(Experiment.created_at, Experiment.id)
            .execution_options(yield_per=PAGE_CHUNK)
        )
        for exp_id in newer:
            if exp_id not in view:
                page.append(exp_id)
                if len(page) == limit:
                    break
        newer.close()
    return page
