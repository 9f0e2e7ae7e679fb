"""Evaluation jobs: submit (one, or every finished experiment lacking a protocol), list, read.

An evaluation is a job of the same queue as training: cancel, retry, events, logs and artifacts are
the experiment routes (`/v1/experiments/{id}/...`), which take evaluation ids as well.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api_schemas.evaluation_views import EvaluationDetail, EvaluationOut, EvaluationPage
from api_schemas.evaluations import BulkEvaluation, BulkResult, EvaluationCreate
from api_schemas.jobs import JobState
from service import evaluations, jobs
from service.api.deps import (
    NO_NUL,
    CurrentUser,
    EvaluationId,
    SchedulerDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
    wake,
)
from service.api.responses import errors
from service.api.routes.experiments import JSON_TYPES, IdempotencyKey, _queue, _read_body
from service.db.engine import run_tx
from service.settings import ServiceSettings

router = APIRouter(prefix="/evaluations", tags=["evaluations"])

_422 = (
    "invalid body, or a reference that does not resolve: an unknown experiment, checkpoint or "
    "evaluation (another team's is unknown too), weights that do not exist, a protocol that is unknown, "
    "not defined for the dataset or in another norm than the weights were trained against, a checkpoint "
    "whose class count does not fit; `errors` name the field (body.target.experiment, body.protocol, ...)"
)


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


async def _read_json(request: Request, settings: ServiceSettings, model: type[BaseModel]) -> BaseModel:
    """The body as `model`, read within LBGAT_MAX_SPEC_BYTES (413 past it) and validated (422 with
    body.* field paths)."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in JSON_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"Content-Type {content_type!r}: send application/json"
        )
    raw = await _read_body(request, settings.max_spec_bytes)
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": f"not valid JSON: {exc}", "type": "json_invalid"}]
        ) from None
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise RequestValidationError(
            [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        ) from None
    except RecursionError:
        raise RequestValidationError(
            [{"loc": ("body",), "msg": "nested too deeply", "type": "value_error"}]
        ) from None


@router.post(
    "",
    response_model=EvaluationOut,
    status_code=status.HTTP_201_CREATED,
    summary="Queue an evaluation: an experiment's weights or an uploaded checkpoint, under a protocol",
    openapi_extra=_body(EvaluationCreate),
    responses={
        200: {"model": EvaluationOut, "description": "a repeated Idempotency-Key: the first evaluation"},
        **errors(
            400,
            401,
            409,
            413,
            415,
            422,
            503,
            descriptions={
                400: "Content-Length is not a number of bytes",
                409: "Idempotency-Key already used for another request",
                413: "body larger than LBGAT_MAX_SPEC_BYTES",
                415: "not JSON",
                422: _422,
                503: "the artifact store, asked whether the weights exist, did not answer",
            },
        ),
    },
)
async def create_evaluation(
    request: Request,
    current_user: CurrentUser,
    sessions: SessionsDep,
    settings: SettingsDep,
    store: StoreDep,
    scheduler: SchedulerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> EvaluationOut:
    """Everything is resolved and checked before the job is queued; the scheduler is woken at once."""
    body = await _read_json(request, settings, EvaluationCreate)
    assert isinstance(body, EvaluationCreate)

    def submit(session: Session) -> tuple[EvaluationOut, bool]:
        exp, created = evaluations.create_evaluation(
            session, store, owner=current_user, body=body, settings=settings, idempotency_key=idempotency_key
        )
        session.flush()
        return evaluations.to_evaluation_out(exp, settings=settings), created

    def run() -> tuple[EvaluationOut, bool]:
        try:
            return run_tx(sessions, submit)
        except IntegrityError:
            if idempotency_key is None:
                raise
            return run_tx(sessions, submit)  # a concurrent request with our key won: return its job

    out, created = await run_in_threadpool(run)
    if created:
        wake(scheduler)
    else:
        response.status_code = status.HTTP_200_OK
    return out


@router.post(
    "/bulk",
    response_model=BulkResult,
    summary="Queue a protocol for every finished experiment of your team that lacks a result under it",
    openapi_extra=_body(BulkEvaluation),
    responses=errors(
        400,
        401,
        413,
        415,
        422,
        503,
        descriptions={
            400: "Content-Length is not a number of bytes",
            413: "body larger than LBGAT_MAX_SPEC_BYTES",
            415: "not JSON",
            422: "invalid body, an unknown protocol, or a dataset the protocol is not defined for",
            503: "the artifact store, asked whether the weights exist, did not answer",
        },
    ),
)
async def create_bulk_evaluations(
    request: Request,
    current_user: CurrentUser,
    sessions: SessionsDep,
    settings: SettingsDep,
    store: StoreDep,
    scheduler: SchedulerDep,
) -> BulkResult:
    """`skipped` says why each other experiment got no evaluation; `dry_run` queues nothing and lists
    in `queued` the experiments that would be evaluated."""
    body = await _read_json(request, settings, BulkEvaluation)
    assert isinstance(body, BulkEvaluation)

    def bulk(session: Session) -> BulkResult:
        return evaluations.bulk_evaluate(session, store, owner=current_user, body=body, settings=settings)

    result = await run_in_threadpool(run_tx, sessions, bulk)
    if result.queued and not body.dry_run:
        wake(scheduler)
    return result


@router.get(
    "",
    response_model=EvaluationPage,
    summary="List your team's evaluations, newest first (cursor pagination)",
    responses=errors(401, 422),
)
def read_evaluations(
    current_user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
    user: Annotated[str | None, Query(max_length=64, pattern=NO_NUL, description="owner's name")] = None,
    state: Annotated[list[JobState] | None, Query(description="repeat for several states")] = None,
    dataset: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, description="at most LBGAT_MAX_PAGE_SIZE")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="a page's `next_cursor`, as it was answered")
    ] = None,
) -> EvaluationPage:
    if limit > settings.max_page_size:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", "limit"),
                    "msg": f"at most {settings.max_page_size} items per page",
                    "type": "value_error",
                }
            ]
        )
    rows, next_cursor = jobs.list_experiments(
        session,
        viewer=current_user,
        user=user,
        state=state,
        dataset=dataset,
        kind="evaluation",
        limit=limit,
        cursor=cursor,
    )
    queue = _queue(scheduler, rows)
    return EvaluationPage(
        items=[evaluations.to_evaluation_out(e, settings=settings, queue=queue) for e in rows],
        next_cursor=next_cursor,
    )


@router.get(
    "/{evaluation_id}",
    response_model=EvaluationDetail,
    summary="One evaluation: job spec, state history, progress (shards done, running accuracies), summary",
    responses=errors(401, 404, 422, descriptions={404: "no such evaluation in your team"}),
)
def read_evaluation(
    evaluation_id: EvaluationId,
    current_user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
) -> EvaluationDetail:
    exp = evaluations.get_evaluation(session, evaluation_id, viewer=current_user)
    return evaluations.evaluation_detail(session, exp, settings=settings, queue=_queue(scheduler, [exp]))
