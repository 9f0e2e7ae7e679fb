"""Experiments: submit, list, read, cancel, retry, delete; their metrics, live events and Ray logs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import yaml
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, ValidationError
from pydantic_core import PydanticCustomError
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api_schemas import ExperimentSpec, SpecError, parse_spec
from api_schemas.jobs import (
    DB_INT_MAX,
    MAX_ATTEMPTS_MAX,
    MAX_TAGS,
    PRIORITY_MAX,
    PRIORITY_MIN,
    ExperimentCreate,
    ExperimentDetail,
    ExperimentOut,
    ExperimentPage,
    JobState,
    Tag,
    TrialOut,
)
from api_schemas.yaml_safe import YAMLLimitError, load_yaml
from service import jobs, queue_report
from service.api import sse
from service.api.deps import (
    NO_NUL,
    CurrentUser,
    ExperimentId,
    RayDep,
    SchedulerDep,
    SchedulerLike,
    SessionDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
    wake,
)
from service.api.responses import errors
from service.db.engine import run_tx
from service.db.models import Event, Experiment, Trial, User
from service.ray_jobs import RayUnavailable
from service.settings import ServiceSettings
from workers.storage import StoreError, experiment_prefix

log = logging.getLogger("service.api")

router = APIRouter(prefix="/experiments", tags=["experiments"])

JSON_TYPES = frozenset({"application/json", ""})
YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})

_NO_SUCH = {404: "no such experiment in your team"}
_NOT_OWNER = {403: "not the experiment's owner (nor an admin)"}
# Ray's own messages name the dashboard's internal address: they go to the log, this to the client.
RAY_UNAVAILABLE = "the Ray cluster is unreachable or refused the request (the service log says why)"
# One event of the stream (sse.py), as OpenAPI 3.1 documents a text/event-stream: per event.
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"enum": ["state", "metric", "end"]},
        "id": {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "the event's id; a reconnecting client sends the last one as Last-Event-ID",
        },
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"type": "object"},
            "description": "state: {from, to, reason, at}; metric: {trial, <metrics>, at}; end: {state}",
        },
        "retry": {"type": "integer", "description": "milliseconds a browser waits before reconnecting"},
    },
}


# -- submission body ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    spec: ExperimentSpec
    priority: int
    max_attempts: int | None
    tags: list[str]


def _invalid(loc: tuple[str | int, ...], msg: str, kind: str = "value_error") -> RequestValidationError:
    return RequestValidationError([{"loc": loc, "msg": msg, "type": kind}])


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes: by its Content-Length before reading, and by what
    actually arrives (a chunked body, or a Content-Length that lies)."""
    too_large = HTTPException(
        status.HTTP_413_CONTENT_TOO_LARGE, f"request body larger than {limit} bytes (LBGAT_MAX_SPEC_BYTES)"
    )
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HTTPException(status.HTTP_400_BAD_REQUEST, "Content-Length: not a number of bytes")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def read_submission(
    request: Request,
    settings: SettingsDep,
    priority: Annotated[
        int, Query(ge=PRIORITY_MIN, le=PRIORITY_MAX, description="YAML uploads only (JSON: in the body)")
    ] = 0,
    max_attempts: Annotated[
        int | None, Query(ge=1, le=MAX_ATTEMPTS_MAX, description="YAML uploads only (JSON: in the body)")
    ] = None,
    tags: Annotated[
        list[Tag] | None, Query(max_length=MAX_TAGS, description="YAML uploads only (JSON: in the body)")
    ] = None,
) -> Submission:
    """An ExperimentCreate (JSON) or a spec file (YAML, options as query parameters), validated."""
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type not in JSON_TYPES and content_type not in YAML_TYPES:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            f"Content-Type {content_type!r}: send application/json (an ExperimentCreate) or "
            "application/yaml (a spec file)",
        )
    body = await _read_body(request, settings.max_spec_bytes)
    if content_type in YAML_TYPES:
        try:
            data = load_yaml(body) if body.strip() else {}
        except YAMLLimitError as exc:  # past the loader's bounds: named where, and nothing expanded
            raise SpecError([{"loc": exc.path, "msg": exc.problem}], too_large=exc.too_large) from None
        except (yaml.YAMLError, RecursionError) as exc:
            raise _invalid(("body",), f"not valid YAML: {exc}", "yaml_invalid") from None
        try:
            options = ExperimentCreate(spec={}, priority=priority, max_attempts=max_attempts, tags=tags or [])
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("query", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        spec_data = data
    else:
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise _invalid(("body",), f"not valid JSON: {exc}", "json_invalid") from None
        try:
            options = ExperimentCreate.model_validate(payload)
        except ValidationError as exc:
            raise RequestValidationError(
                [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            ) from None
        spec_data = options.spec
    spec = parse_spec(spec_data)  # SpecError -> 422 with the spec's field paths (app's handler)
    check_stored_size(spec, settings.max_stored_spec_bytes)
    return Submission(spec, options.priority, options.max_attempts, list(options.tags))


def check_stored_size(spec: ExperimentSpec, limit: int) -> None:
    """Refuse (413) a spec whose stored form, the JSON of the resolved spec, is over `limit` bytes.

    The body limit bounds what a client sends, not what is stored: defaults are filled in, and YAML
    aliases (within the loader's bounds) still multiply what they point to. Measured the way the
    database's JSON column writes it (json.dumps), and reported at the largest top-level section.
    """
    data = spec.model_dump(mode="json")
    size = len(json.dumps(data).encode())
    if size <= limit:
        return
    sizes = {key: len(json.dumps(value).encode()) for key, value in data.items()}
    largest = max(sizes, key=sizes.__getitem__)
    raise SpecError(
        [
            {
                "loc": largest,
                "msg": f"the spec as stored would be {size} bytes, over LBGAT_MAX_STORED_SPEC_BYTES "
                f"({limit}); {largest} alone is {sizes[largest]} bytes",
            }
        ],
        too_large=True,
    )


def _printable_ascii(value: str | None) -> str | None:
    # A key is echoed in 409 answers and logs and compared byte for byte: control characters and
    # bytes past ASCII (which Starlette decodes as Latin-1) would make it unreadable or ambiguous.
    if value is not None and not all(" " <= char <= "~" for char in value):
        raise PydanticCustomError(
            "idempotency_key", "printable ASCII only (no control characters or non-ASCII bytes)"
        )
    return value


SubmissionDep = Annotated[Submission, Depends(read_submission)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=128,
        description="a retried submission with the same key returns the first experiment (200); "
        "1-128 printable ASCII characters",
    ),
    AfterValidator(_printable_ascii),
]

_SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/ExperimentCreate"}},
            "application/yaml": {
                "schema": {"type": "object", "description": "an ExperimentSpec as a YAML (or JSON) file"}
            },
        },
    }
}


# -- helpers -----------------------------------------------------------------------------------------


def _queue(
    scheduler: SchedulerLike | None, experiments: Iterable[Experiment]
) -> dict[str, tuple[int, str, datetime | None]] | None:
    """Waiting jobs' (position, reason, estimated start): the scheduler's latest plan (queue_report)."""
    if scheduler is None:
        return None
    return queue_report.current_view(scheduler, [e.id for e in experiments if e.state in jobs.WAITING_STATES])


def _visible(sessions: sessionmaker[Session], experiment_id: str, user: User) -> Experiment:
    with sessions() as session:
        return jobs.get_experiment(session, experiment_id, viewer=user)


def _out(exp: Experiment, settings: ServiceSettings) -> ExperimentOut:
    return jobs.to_out(exp, settings=settings)


def _change(
    operation: Callable[..., Experiment],
    experiment_id: str,
    user: User,
    sessions: sessionmaker[Session],
    settings: ServiceSettings,
    scheduler: SchedulerLike | None,
) -> ExperimentOut:
    """Apply a lifecycle operation (cancel, retry) in one transaction, then start a scheduler round."""

    def change(session: Session) -> ExperimentOut:
        exp = jobs.get_experiment(session, experiment_id, viewer=user)
        return _out(operation(session, exp, user=user), settings)

    out = run_tx(sessions, change)
    wake(scheduler)
    return out


# -- routes ------------------------------------------------------------------------------------------


@router.post(
    "",
    response_model=ExperimentOut,
    status_code=status.HTTP_201_CREATED,
    summary="Submit an experiment (JSON ExperimentCreate, or a YAML spec upload)",
    openapi_extra=_SUBMIT_BODY,
    responses={
        200: {"model": ExperimentOut, "description": "a repeated Idempotency-Key: the first experiment"},
        **errors(
            400,
            401,
            409,
            413,
            415,
            422,
            descriptions={
                400: "Content-Length is not a number of bytes",
                409: "Idempotency-Key already used for another spec",
                413: "body larger than LBGAT_MAX_SPEC_BYTES, a YAML body that expands past the loader's "
                "node limit, or a spec larger than LBGAT_MAX_STORED_SPEC_BYTES as stored",
                415: "neither JSON nor YAML",
                422: "invalid spec, options or headers; `errors` name the field paths",
            },
        ),
    },
)
def create_experiment(
    current_user: CurrentUser,
    submission: SubmissionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
    response: Response,
    idempotency_key: IdempotencyKey = None,
) -> ExperimentOut:
    """The job is in the database before this answers; the scheduler is woken to consider it at once."""

    def submit(session: Session) -> tuple[ExperimentOut, bool]:
        exp, created = jobs.create_experiment(
            session,
            owner=current_user,
            spec=submission.spec,
            settings=settings,
            priority=submission.priority,
            max_attempts=submission.max_attempts,
            tags=submission.tags,
            idempotency_key=idempotency_key,
            cluster_has_gpus=None,
        )
        session.flush()
        return _out(exp, settings), created

    try:
        out, created = run_tx(sessions, submit)
    except IntegrityError:
        if idempotency_key is None:
            raise
        out, created = run_tx(sessions, submit)  # a concurrent request with our key won: return its job
    if created:
        wake(scheduler)
    else:
        response.status_code = status.HTTP_200_OK
    return out


@router.get(
    "",
    response_model=ExperimentPage,
    summary="List your team's experiments, newest first (cursor pagination)",
    responses=errors(401, 422),
)
def read_experiments(
    current_user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
    user: Annotated[str | None, Query(max_length=64, pattern=NO_NUL, description="owner's name")] = None,
    team: Annotated[str | None, Query(max_length=64, pattern=NO_NUL)] = None,
    state: Annotated[list[JobState] | None, Query(description="repeat for several states")] = None,
    method: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    dataset: Annotated[str | None, Query(max_length=32, pattern=NO_NUL)] = None,
    kind: Annotated[
        Literal["training", "evaluation"] | None,
        Query(description="training runs or evaluations only (default: both, the whole queue)"),
    ] = None,
    limit: Annotated[int, Query(ge=1, description="at most LBGAT_MAX_PAGE_SIZE")] = 50,
    cursor: Annotated[
        str | None, Query(max_length=512, description="a page's `next_cursor`, as it was answered")
    ] = None,
) -> ExperimentPage:
    if limit > settings.max_page_size:
        raise _invalid(("query", "limit"), f"at most {settings.max_page_size} items per page")
    rows, next_cursor = jobs.list_experiments(
        session,
        viewer=current_user,
        user=user,
        team=team,
        state=state,
        method=method,
        dataset=dataset,
        kind=kind,
        limit=limit,
        cursor=cursor,
    )
    queue = _queue(scheduler, rows)
    return ExperimentPage(
        items=[jobs.to_out(e, settings=settings, queue=queue) for e in rows], next_cursor=next_cursor
    )


@router.get(
    "/{experiment_id}",
    response_model=ExperimentDetail,
    summary="One experiment: spec, state history, trials, metrics of the main trial, results, queue place",
    responses=errors(401, 404, 422, descriptions=_NO_SUCH),
)
def read_experiment(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    session: SessionDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
) -> ExperimentDetail:
    exp = jobs.get_experiment(session, experiment_id, viewer=current_user)
    out = jobs.to_out(exp, settings=settings, queue=_queue(scheduler, [exp]))
    return ExperimentDetail(
        **out.model_dump(),
        spec=exp.spec,
        error_log_tail=exp.error_log_tail,
        history=jobs.history(session, exp.id),
        trials=[TrialOut.model_validate(t) for t in jobs.trials(session, exp.id)],
        metrics=jobs.metric_rows(session, exp.id, "main"),
        results=jobs.result_row(exp),
    )


@router.post(
    "/{experiment_id}/cancel",
    response_model=ExperimentOut,
    status_code=status.HTTP_202_ACCEPTED,
    summary="Cancel: a waiting job at once; a dispatched one once the scheduler has stopped its Ray job",
    responses=errors(
        401, 403, 404, 409, 422, descriptions={**_NO_SUCH, **_NOT_OWNER, 409: "the job is already finished"}
    ),
)
def cancel_experiment(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    sessions: SessionsDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
) -> ExperimentOut:
    return _change(jobs.cancel_experiment, experiment_id, current_user, sessions, settings, scheduler)


@router.post(
    "/{experiment_id}/retry",
    response_model=ExperimentOut,
    summary="Queue a failed or cancelled experiment again; it resumes from its last checkpoint",
    responses=errors(
        401,
        403,
        404,
        409,
        422,
        descriptions={**_NO_SUCH, **_NOT_OWNER, 409: "the job is neither failed nor cancelled"},
    ),
)
def retry_experiment(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    sessions: SessionsDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
) -> ExperimentOut:
    return _change(jobs.retry_experiment, experiment_id, current_user, sessions, settings, scheduler)


@router.delete(
    "/{experiment_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Delete an experiment and its artifacts (owner or admin; cancel an active job first)",
    responses=errors(
        401,
        403,
        404,
        409,
        422,
        503,
        descriptions={
            **_NO_SUCH,
            **_NOT_OWNER,
            409: "the job is dispatching or running",
            503: "rows deleted, but the artifact store could not remove the artifacts",
        },
    ),
)
def delete_experiment(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    sessions: SessionsDep,
    store: StoreDep,
) -> Response:
    """Rows first, in one transaction whose DELETE is conditional on the job not being active (so a
    scheduler dispatching it meanwhile wins and the delete is refused); then the store's objects."""

    def remove(session: Session) -> None:
        exp = jobs.get_experiment(session, experiment_id, viewer=current_user)
        jobs.require_owner(exp, current_user)
        active = f"experiment {exp.id} is {exp.state}; cancel it first"
        if JobState(exp.state).active:
            raise jobs.JobError(active, status=409)
        session.execute(delete(Event).where(Event.experiment_id == exp.id))
        session.execute(delete(Trial).where(Trial.experiment_id == exp.id))
        result = session.execute(
            delete(Experiment)
            .where(Experiment.id == exp.id, Experiment.state.not_in(jobs.ACTIVE_STATES))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:
            raise jobs.JobError(f"experiment {exp.id} was dispatched meanwhile; cancel it first", status=409)

    run_tx(sessions, remove)
    try:
        removed = store.delete_prefix(experiment_prefix(experiment_id))
    except (StoreError, ValueError) as exc:
        # The store's message names its location (a local path, an internal endpoint): the log only.
        log.error("experiment %s deleted, but not its artifacts in %s: %s", experiment_id, store.url, exc)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            f"experiment {experiment_id} was deleted, but the artifact store could not remove its "
            "artifacts (the service log says why); delete them again later",
        ) from None
    log.info("experiment %s deleted by %s (%d artifacts)", experiment_id, current_user.name, removed)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get(
    "/{experiment_id}/metrics",
    response_model=list[dict[str, Any]],
    summary="Metric rows (one per epoch and trial) as the workers reported them",
    responses=errors(401, 404, 422, descriptions=_NO_SUCH),
)
def read_experiment_metrics(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    session: SessionDep,
    trial: Annotated[
        str | None, Query(max_length=128, pattern=NO_NUL, description="one trial (default: all)")
    ] = None,
) -> list[dict[str, Any]]:
    exp = jobs.get_experiment(session, experiment_id, viewer=current_user)
    return jobs.metric_rows(session, exp.id, trial)


@router.get(
    "/{experiment_id}/events",
    response_class=StreamingResponse,
    summary="Server-sent events: `state` and `metric` updates, then `end` once the job is terminal",
    responses={
        200: {
            # For an event stream, the schema describes each event (OpenAPI 3.1 has no `itemSchema`).
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
            "description": "the event stream: `state` and `metric` events, then one `end`",
        },
        **errors(401, 404, 422, descriptions=_NO_SUCH),
    },
)
async def read_experiment_events(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    sessions: SessionsDep,
    after: Annotated[
        int | None, Query(ge=0, le=DB_INT_MAX, description="send events with a larger id only")
    ] = None,
    last_event_id: Annotated[
        int | None,
        Header(ge=0, le=DB_INT_MAX, description="set by reconnecting clients; wins over `after`"),
    ] = None,
) -> StreamingResponse:
    """Both resume points are event ids, bounded by the events table's integer key: a larger one is a
    422 here, where it would otherwise break the stream after its 200 had been sent."""
    await run_in_threadpool(_visible, sessions, experiment_id, current_user)
    start = last_event_id if last_event_id is not None else (after or 0)
    return StreamingResponse(
        sse.experiment_events(sessions, experiment_id, after=start),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@router.get(
    "/{experiment_id}/logs",
    # Response, not PlainTextResponse: FastAPI documents a route's error models under the route's
    # media type, and the errors are JSON (ErrorDetail); the 200's text/plain is declared here.
    response_class=Response,
    summary="The Ray job's log ('' before the job reached Ray); follow=true streams until it ends",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "the log"},
        **errors(401, 404, 422, 503, descriptions={**_NO_SUCH, 503: "no Ray configured, or Ray unreachable"}),
    },
)
async def read_experiment_logs(
    experiment_id: ExperimentId,
    current_user: CurrentUser,
    sessions: SessionsDep,
    ray: RayDep,
    follow: bool = False,
) -> Response:
    exp = await run_in_threadpool(_visible, sessions, experiment_id, current_user)
    if ray is None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "no Ray cluster is configured for this service (LBGAT_RAY_ADDRESS); logs come from Ray",
        )
    if not exp.ray_job_id:
        return PlainTextResponse("")
    submission_id = exp.ray_job_id
    try:
        if not follow:
            return PlainTextResponse(await run_in_threadpool(ray.logs, submission_id))
        await run_in_threadpool(ray.check)
    except RayUnavailable as exc:
        # Ray's messages name the dashboard's internal address: the log only.
        log.warning("logs of %s (%s): Ray unavailable: %s", experiment_id, submission_id, exc)
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, RAY_UNAVAILABLE) from None

    async def follow_logs() -> Any:
        try:
            async for chunk in ray.tail_logs(submission_id):
                yield chunk
        except RayUnavailable as exc:
            log.warning("following logs of %s (%s) stopped: %s", experiment_id, submission_id, exc)
            yield f"\n[lbgat] the log stream stopped: {RAY_UNAVAILABLE}\n"

    return StreamingResponse(follow_logs(), media_type="text/plain; charset=utf-8")
