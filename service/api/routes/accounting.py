"""Accounting: GPU-/CPU-hour usage (`GET /v1/usage`) and team budgets (`/v1/teams/{team}/budget`)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api_schemas.accounting import NAME_PATTERN, BudgetIn, BudgetOut, GroupBy, UsageReport, UsageRow
from service import accounting
from service.api.deps import AdminUser, CurrentUser, SessionDep, SessionsDep, SettingsDep
from service.api.responses import errors
from service.db.engine import run_tx
from service.db.models import Team, TeamBudget, User, utcnow
from service.jobs import JobError

router = APIRouter(tags=["accounting"])

# the window a usage report may cover, and where its ends may lie
EARLIEST = datetime(2000, 1, 1, tzinfo=timezone.utc)
LATEST = datetime(2200, 1, 1, tzinfo=timezone.utc)
MAX_WINDOW = timedelta(days=3660)

TeamName = Annotated[
    str, Path(min_length=1, max_length=64, pattern=NAME_PATTERN, description="a team's name")
]
_NOT_ADMIN = {403: "the token's user is not an admin"}


class Invalid(JobError):
    """A 422 naming the query parameter (as a validation error would)."""

    def __init__(self, loc: str, msg: str) -> None:
        super().__init__(f"invalid request: {loc}: {msg}", status=422)
        self.errors = [{"loc": loc, "msg": msg, "type": "value_error"}]


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _team(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        raise JobError(f"team {name!r} not found", status=404)
    return team


def _visible_team(session: Session, name: str, viewer: User) -> Team:
    if not viewer.is_admin and name != viewer.team.name:
        raise JobError(
            f"you may read your own team's usage and budget ({viewer.team.name}), not {name}'s", 403
        )
    return _team(session, name)


def budget_out(state: accounting.BudgetState) -> BudgetOut:
    return BudgetOut(
        team=state.team,
        period=state.period,  # type: ignore[arg-type]
        gpu_hours=state.budget,
        action=state.action,  # type: ignore[arg-type]
        used_gpu_hours=state.used,
        fraction=state.fraction,
        warning=state.warning,
        exceeded=state.exceeded,
        period_start=state.period_start,
        period_end=state.period_end,
        updated_at=state.updated_at,
    )


@router.get(
    "/usage",
    response_model=UsageReport,
    summary="GPU- and CPU-hours per user, team or method over a window, with hours lost apart",
    responses=errors(
        401,
        403,
        404,
        422,
        descriptions={
            403: "another team's usage (only admins may read other teams')",
            404: "no such team",
            422: "invalid parameters: `since` not before `until`, outside 2000-2200, a window over 10 "
            "years, or an undeclared parameter; `errors` names the field",
        },
    ),
)
def read_usage(
    current_user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    since: Annotated[
        datetime | None,
        Query(
            description="start (inclusive; default: the team's budget period, else LBGAT_USAGE_DEFAULT_DAYS back)"
        ),
    ] = None,
    until: Annotated[datetime | None, Query(description="end (exclusive; default: now)")] = None,
    group_by: Annotated[GroupBy, Query(description="one row per user, team or method")] = "user",
    team: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            pattern=NAME_PATTERN,
            description="only this team (users: their own team, always; admins: any, default all)",
        ),
    ] = None,
) -> UsageReport:
    """Running attempts count up to now. Times without a zone are UTC."""
    now = utcnow()
    for loc, value in (("query.since", since), ("query.until", until)):
        try:
            value = _utc(value)
        except OverflowError:  # a zone offset past the ends of time
            value = EARLIEST - timedelta(days=1)
        if value is not None and not EARLIEST <= value <= LATEST:
            raise Invalid(loc, "must lie between 2000-01-01 and 2200-01-01")
    since, until = _utc(since), _utc(until)
    if team is None and not current_user.is_admin:
        team = current_user.team.name
    team_row = _visible_team(session, team, current_user) if team is not None else None
    team_ids = [team_row.id] if team_row is not None else None
    until = until or now
    if since is None:
        states = accounting.budget_states(session, now, team_ids=team_ids) if team_ids else {}
        since = (
            states[team_row.id].period_start
            if team_row is not None and team_row.id in states and until >= now
            else until - timedelta(days=settings.usage_default_days)
        )
    if since >= until:
        raise Invalid("query.since", "must be before `until`")
    if until - since > MAX_WINDOW:
        raise Invalid("query.since", "the window may span at most 3660 days")

    groups, total = accounting.usage_by(
        session, group_by=group_by, since=since, until=until, team_ids=team_ids, now=now
    )
    users, teams = accounting.names_of(
        session,
        users=groups if group_by == "user" else (),
        teams=groups if group_by == "team" else (),
    )
    rows = []
    for key, usage in groups.items():
        if group_by == "user":
            name, team_name = users.get(key, (str(key), None))
            rows.append(UsageRow(key=name, team=team_name, **usage.hours()))
        elif group_by == "team":
            rows.append(UsageRow(key=teams.get(key, str(key)), **usage.hours()))
        else:
            rows.append(UsageRow(key=str(key), **usage.hours()))
    rows.sort(key=lambda r: (-r.gpu_hours, r.key))
    states = accounting.budget_states(
        session, now, warning_fraction=settings.budget_warning_fraction, team_ids=team_ids
    )
    return UsageReport(
        since=since,
        until=until,
        group_by=group_by,
        team=team,
        rows=rows,
        total=UsageRow(key="total", **total.hours()),
        budgets=[budget_out(s) for s in sorted(states.values(), key=lambda s: s.team)],
    )


# -- budgets -----------------------------------------------------------------------------------------


def _state(session: Session, team: Team, settings: SettingsDep) -> BudgetOut:
    states = accounting.budget_states(
        session, utcnow(), warning_fraction=settings.budget_warning_fraction, team_ids=[team.id]
    )
    if team.id not in states:
        raise JobError(f"team {team.name} has no budget", status=404)
    return budget_out(states[team.id])


@router.get(
    "/teams/{team}/budget",
    response_model=BudgetOut,
    summary="A team's budget and its use in the current period (your team, or any for an admin)",
    responses=errors(
        401,
        403,
        404,
        422,
        descriptions={403: "another team's budget (admins only)", 404: "no such team, or no budget"},
    ),
)
def read_budget(
    team: TeamName, current_user: CurrentUser, session: SessionDep, settings: SettingsDep
) -> BudgetOut:
    return _state(session, _visible_team(session, team, current_user), settings)


@router.put(
    "/teams/{team}/budget",
    response_model=BudgetOut,
    summary="Set a team's GPU-hour budget per period (admin)",
    responses=errors(
        400,
        401,
        403,
        404,
        422,
        descriptions={
            400: "the body is not readable JSON (not UTF-8, or nested too deep)",
            **_NOT_ADMIN,
            404: "no such team",
        },
    ),
)
def update_budget(
    team: TeamName, body: BudgetIn, admin: AdminUser, sessions: SessionsDep, settings: SettingsDep
) -> BudgetOut:
    """Periods are UTC calendar days, weeks (from Monday) and months; the action applies once the
    period's GPU-hours reach the budget (a warning at LBGAT_BUDGET_WARNING_FRACTION)."""

    def put(session: Session) -> BudgetOut:
        row = _team(session, team)
        budget = session.get(TeamBudget, row.id)
        action = body.action or settings.budget_default_action
        if budget is None:
            session.add(
                TeamBudget(team_id=row.id, period=body.period, gpu_hours=body.gpu_hours, action=action)
            )
        else:
            budget.period, budget.gpu_hours, budget.action = body.period, body.gpu_hours, action
            budget.updated_at = utcnow()
        session.flush()
        return _state(session, row, settings)

    return run_tx(sessions, put)


@router.delete(
    "/teams/{team}/budget",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Remove a team's budget (admin)",
    responses=errors(401, 403, 404, 422, descriptions={**_NOT_ADMIN, 404: "no such team, or no budget"}),
)
def delete_budget(team: TeamName, admin: AdminUser, sessions: SessionsDep) -> Response:
    def remove(session: Session) -> bool:
        row = _team(session, team)
        budget = session.get(TeamBudget, row.id)
        if budget is None:
            return False
        session.delete(budget)
        return True

    if not run_tx(sessions, remove):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"team {team} has no budget")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
