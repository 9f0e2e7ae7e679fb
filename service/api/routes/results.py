"""Results across the team's finished experiments: the leaderboard and side-by-side comparisons."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api_schemas.jobs import Comparison, ResultRow
from service import jobs
from service.api.deps import NO_NUL, CurrentUser, NoNulStr, SessionDep
from service.api.responses import errors
from service.db.models import Experiment

router = APIRouter(prefix="/results", tags=["results"])


def _row(exp: Experiment) -> ResultRow:
    """The experiment's result row; one without accuracies while it has no results yet."""
    row = jobs.result_row(exp, require_results=False)
    assert row is not None
    return row


@router.get(
    "/leaderboard",
    response_model=list[ResultRow],
    summary="Finished experiments ranked by AutoAttack accuracy, then the worst attack, then clean",
    responses=errors(401, 422),
)
def read_leaderboard(
    current_user: CurrentUser,
    session: SessionDep,
    dataset: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    norm: Annotated[str | None, Query(max_length=8, pattern=NO_NUL, description="linf or l2")] = None,
    eps: Annotated[
        float | None, Query(ge=0, allow_inf_nan=False, description="threat model radius (as in the spec)")
    ] = None,
    method: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[ResultRow]:
    return jobs.leaderboard(
        session, viewer=current_user, dataset=dataset, norm=norm, eps=eps, method=method, limit=limit
    )


@router.get(
    "/compare",
    response_model=Comparison,
    summary="Chosen experiments side by side, with the union of their attacks",
    responses=errors(401, 404, 422, descriptions={404: "an id not in your team"}),
)
def read_comparison(
    current_user: CurrentUser,
    session: SessionDep,
    ids: Annotated[list[NoNulStr], Query(min_length=2, max_length=20, description="2 to 20 experiment ids")],
) -> Comparison:
    unique = list(dict.fromkeys(ids))
    rows = [_row(jobs.get_experiment(session, exp_id, viewer=current_user)) for exp_id in unique]
    attacks: dict[str, None] = {}
    for row in rows:
        attacks.update(dict.fromkeys(row.attacks))
    return Comparison(rows=rows, attacks=list(attacks))
