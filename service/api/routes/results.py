"""Results across the team's finished work: the leaderboards, comparisons, exports, transfer matrices.

Two leaderboards share `GET /v1/results/leaderboard`. Without `protocol` (and without
`evaluations=true`) it is the experiments' board, as it always was: finished training runs and their
final (or best) model, `ResultRow`s. With `protocol` (an id, `id@version`, or `custom[@version]`), or
with `evaluations=true`, it is the board of (checkpoint, protocol) results (`EvaluationResultRow`s of
service.leaderboard): one protocol version at a time, the dataset's default protocol when only a
dataset is named, every protocol grouped (ranked within each) when neither is.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query

from api_schemas.evaluation_views import RobustBenchModelInfo
from api_schemas.evaluations import EvaluationResultRow, TransferMatrix
from api_schemas.jobs import Comparison, ResultRow
from service import jobs, leaderboard
from service.api.deps import NO_NUL, CurrentUser, NoNulStr, SessionDep
from service.api.responses import errors
from service.db.models import Experiment

# a protocol id, `id@version`, or `custom@<suite hash>`
PROTOCOL_QUERY = r"^[a-z0-9][a-z0-9-]{0,63}(@[0-9a-f]{1,32})?$"
# 1 to 20 experiment ids, comma-separated
EXPERIMENT_LIST = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}(,[A-Za-z0-9][A-Za-z0-9._-]{0,63}){0,19}$"

router = APIRouter(prefix="/results", tags=["results"])


def _row(exp: Experiment) -> ResultRow:
    """The experiment's result row; one without accuracies while it has no results yet."""
    row = jobs.result_row(exp, require_results=False)
    assert row is not None
    return row


@router.get(
    "/leaderboard",
    response_model=list[EvaluationResultRow] | list[ResultRow],
    summary="Rank results: per protocol ((checkpoint, protocol) rows) or, without one, finished experiments",
    responses=errors(
        401, 422, descriptions={422: "invalid parameters, or an unknown protocol (query.protocol)"}
    ),
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
    protocol: Annotated[
        str | None,
        Query(
            max_length=97,
            pattern=PROTOCOL_QUERY,
            description="rank (checkpoint, protocol) results of this protocol: 'robustbench-linf' (its "
            "latest version), 'lbgat@1', 'custom@<hash>'",
        ),
    ] = None,
    evaluations: Annotated[
        bool,
        Query(
            description="(checkpoint, protocol) results without naming a protocol: the dataset's default "
            "protocol, or every protocol grouped"
        ),
    ] = False,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[EvaluationResultRow] | list[ResultRow]:
    """Experiments (no `protocol`, no `evaluations`): ranked by AutoAttack accuracy, then the worst
    attack, then clean. Per protocol: partial rows below full ones, then AutoAttack (else the worst
    case), the worst case and clean; `rank` counts within the protocol; test-set selection is marked."""
    if protocol is not None or evaluations:
        return leaderboard.protocol_leaderboard(
            session,
            viewer=current_user,
            protocol=protocol,
            dataset=dataset,
            norm=norm,
            eps=eps,
            method=method,
            limit=limit,
        )
    return jobs.leaderboard(
        session, viewer=current_user, dataset=dataset, norm=norm, eps=eps, method=method, limit=limit
    )


@router.get(
    "/transfer-matrix",
    response_model=TransferMatrix,
    summary="Black-box transfer between experiments: robust accuracy of each target (column) under "
    "attacks made on each source (row)",
    responses=errors(
        401,
        404,
        422,
        descriptions={404: "an id not in your team", 422: "invalid parameters, or an unknown protocol"},
    ),
)
def read_transfer_matrix(
    current_user: CurrentUser,
    session: SessionDep,
    experiments: Annotated[
        str,
        Query(
            max_length=20 * 65, pattern=EXPERIMENT_LIST, description="1 to 20 experiment ids, comma-separated"
        ),
    ],
    protocol: Annotated[str | None, Query(max_length=97, pattern=PROTOCOL_QUERY)] = None,
) -> TransferMatrix:
    return leaderboard.transfer_matrix(
        session, experiments.split(","), viewer=current_user, protocol=protocol
    )


@router.get(
    "/{evaluation_id}/export",
    response_model=RobustBenchModelInfo,
    response_model_exclude_none=True,
    summary="One result as RobustBench's model_info JSON, with the numbers this service measured",
    responses=errors(
        401,
        404,
        422,
        descriptions={
            404: "no result of that id in your team (an evaluation, or a training run, that finished)",
            422: "invalid parameters, or a result without AutoAttack accuracy",
        },
    ),
)
def read_export(
    evaluation_id: Annotated[str, Path(pattern=NO_NUL, description="an evaluation's (or training run's) id")],
    current_user: CurrentUser,
    session: SessionDep,
    format: Annotated[
        Literal["robustbench"], Query(description="the export format (RobustBench's model_info JSON)")
    ] = "robustbench",
) -> RobustBenchModelInfo:
    return leaderboard.robustbench_export(session, evaluation_id, viewer=current_user)


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
