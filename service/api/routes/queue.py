"""GET /v1/queue: the whole queue as a table (service.queue_report). Users see their team's jobs,
admins everyone's; positions, reasons and estimated starts are the scheduler's (Scheduler.queue_view)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query
from sqlalchemy import select

from api_schemas.jobs import QueueOut
from service import jobs, queue_report
from service.api.deps import NO_NUL, CurrentUser, SchedulerDep, SessionDep, SettingsDep
from service.api.responses import errors
from service.db.models import Experiment

router = APIRouter(prefix="/queue", tags=["queue"])

MAX_QUEUE_ROWS = 10_000


@router.get(
    "",
    response_model=QueueOut,
    summary="The queue: running jobs with their expected end, waiting jobs in order with reason and estimated start",
    responses=errors(401, 422),
)
def read_queue(
    current_user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
    team: Annotated[str | None, Query(max_length=64, pattern=NO_NUL, description="one team's jobs")] = None,
    user: Annotated[str | None, Query(max_length=64, pattern=NO_NUL, description="owner's name")] = None,
    kind: Annotated[
        Literal["training", "evaluation"] | None, Query(description="training runs or evaluations only")
    ] = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_QUEUE_ROWS, description="waiting jobs listed, in queue order")
    ] = 1000,
) -> QueueOut:
    view = ends = None
    if scheduler is not None:

        def waiting_ids() -> list[str]:  # read only while plans are cheap (queue_report.current_view)
            query = select(Experiment.id).where(Experiment.state.in_(jobs.WAITING_STATES))
            if not current_user.is_admin:
                query = query.where(Experiment.team_id == current_user.team_id)
            return list(session.scalars(query.limit(MAX_QUEUE_ROWS)))

        view, ends = queue_report.current_view_and_ends(scheduler, waiting_ids)
    return queue_report.read_queue(
        session,
        viewer=current_user,
        settings=settings,
        view=view,
        ends=ends,
        team=team,
        user=user,
        kind=kind,
        limit=limit,
    )
