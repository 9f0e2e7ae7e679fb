"""The team's pages, served by the control plane itself: `/` (sign in, or the queue), `/queue`,
`/experiments/{id}`, `/leaderboard`, and what they need (their live streams, artifact downloads, the
cancel/retry forms, static files).

Server-rendered (Jinja2 templates in service/web/templates, plots as inline SVG from service/web/svg),
no build step and nothing fetched from elsewhere. Every page renders its content without JavaScript;
with it, web.js follows the live streams (state changes, metrics, the log) and sorts tables in place.
A browser signs in once with an API token and gets a session of its own (service/web/sessions).
Access follows the API's rules through service.jobs: a user sees their team's experiments (an admin
sees all) and changes only their own (an admin, anyone's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime, timezone
from functools import cache
from importlib import resources
from itertools import chain
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api_schemas.protocols import Protocol, UnknownProtocol, get_protocol
from service import auth, jobs, queue_report
from service.api import sse
from service.api.deps import SchedulerLike, get_ray, get_scheduler, get_sessions, get_settings, get_store
from service.api.routes.artifacts import CHUNK, _disposition, _media_type, artifact_key
from service.db.engine import run_tx
from service.db.models import Event, Experiment, User
from service.ray_jobs import RayJobs, RayUnavailable
from service.settings import ServiceSettings
from service.web import sessions as websession
from service.web import views
from workers.storage import ArtifactStore, KeyNotFound, StoreError, experiment_prefix

log = logging.getLogger("service.web")

router = APIRouter(include_in_schema=False)

SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
RayDep = Annotated[RayJobs | None, Depends(get_ray)]
SchedulerDep = Annotated[SchedulerLike | None, Depends(get_scheduler)]

STATIC = {"web.css": "text/css; charset=utf-8", "web.js": "text/javascript; charset=utf-8"}
CSP = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'; object-src 'none'"
)
QUEUE_POLL_S = 0.5
HEARTBEAT_S = 15.0


# -- errors and sign-in redirects --------------------------------------------------------------------


class SignInRequired(Exception):
    """No live session: the page sends the browser to the sign-in form (and back afterwards)."""


class PageError(Exception):
    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code


@contextlib.contextmanager
def page_errors() -> Iterator[None]:
    """The queue's refusals (service.jobs.JobError: 403, 404, 409) as error pages, not JSON."""
    try:
        yield
    except jobs.JobError as exc:
        raise PageError(exc.status, str(exc)) from None


def _safe_next(target: str | None) -> str:
    """Only a path of this site (no scheme, no host, no `//`): never an open redirect."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/queue"
    return target


# -- templates ---------------------------------------------------------------------------------------


@cache
def _env() -> Environment:
    env = Environment(
        loader=PackageLoader("service.web", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda v: "–" if v is None else f"{v * 100:.1f}%"
    env.filters["num"] = lambda v, d=3: "–" if v is None else f"{v:.{d}g}"
    env.filters["when"] = _when
    env.filters["size"] = _size
    env.filters["urlpath"] = lambda v: quote(v, safe="/")
    env.globals["static"] = _static_url
    return env


def _when(value: datetime | None) -> str:
    if value is None:
        return "–"
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@cache
def _static_bytes(name: str) -> bytes:
    return resources.files("service.web").joinpath("static", name).read_bytes()


@cache
def _static_url(name: str) -> str:
    return f"/static/{name}?v={hashlib.sha256(_static_bytes(name)).hexdigest()[:12]}"


def _headers(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "Content-Security-Policy": CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
        **(extra or {}),
    }


def render(
    request: Request,
    template: str,
    *,
    web: websession.WebSession | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    html = (
        _env()
        .get_template(template)
        .render(request_path=request.url.path, web=web, user=web.user if web else None, **context)
    )
    return HTMLResponse(html, status_code=status_code, headers=_headers())


# -- the session -------------------------------------------------------------------------------------


def _read_session(request: Request) -> websession.WebSession | None:
    token = request.cookies.get(websession.SESSION_COOKIE)
    if not token:
        return None
    settings: ServiceSettings = request.app.state.settings
    with request.app.state.sessions() as session:
        found = websession.lookup(session, token, settings)
        if found is None:
            return None
        user, row = found
        if auth.touch_token(session, token):
            try:
                session.commit()
            except OperationalError:  # best effort, as for API tokens: a busy SQLite writer
                session.rollback()
        return websession.WebSession(user=user, token_id=row.id, csrf=websession.csrf_token(settings, token))


def optional_session(request: Request) -> websession.WebSession | None:
    return _read_session(request)


def required_session(request: Request) -> websession.WebSession:
    web = _read_session(request)
    if web is None:
        raise SignInRequired()
    return web


async def checked_form(request: Request) -> dict[str, str]:
    """The POSTed form, refused (403) unless it carries the session's CSRF token."""
    form = await request.form()
    sent = form.get(websession.CSRF_FIELD)
    token = request.cookies.get(websession.SESSION_COOKIE)
    if not websession.csrf_ok(request.app.state.settings, token, sent if isinstance(sent, str) else None):
        raise PageError(
            status.HTTP_403_FORBIDDEN,
            "this form is missing its CSRF token or it is stale: reload the page and try again",
        )
    return {k: v for k, v in form.items() if isinstance(v, str)}


WebSessionDep = Annotated[websession.WebSession, Depends(required_session)]
MaybeSessionDep = Annotated[websession.WebSession | None, Depends(optional_session)]


# -- sign in / out -----------------------------------------------------------------------------------


def _signin_page(
    request: Request, settings: ServiceSettings, *, next_path: str, error: str | None = None, code: int = 200
) -> HTMLResponse:
    nonce, fresh = websession.signin_nonce(request)
    response = render(
        request,
        "signin.html",
        web=None,
        title="Sign in",
        next_path=next_path,
        signin_csrf=websession.csrf_token(settings, nonce),
        error=error,
        status_code=code,
    )
    if fresh:
        websession.set_signin_cookie(response, request, settings, nonce)
    return response


@router.get("/", response_class=HTMLResponse)
def read_home(
    request: Request,
    web: MaybeSessionDep,
    settings: SettingsDep,
    sessions: SessionsDep,
    scheduler: SchedulerDep,
    next: Annotated[str | None, Query(max_length=2048)] = None,
) -> Response:
    if web is None:
        return _signin_page(request, settings, next_path=_safe_next(next))
    if next:
        return RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    return _queue_page(request, web, sessions, scheduler)


@router.post("/sign-in")
def create_session(
    request: Request,
    settings: SettingsDep,
    sessions: SessionsDep,
    token: Annotated[str, Form(max_length=256)] = "",
    csrf: Annotated[str, Form(max_length=256)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/queue",
) -> Response:
    nonce = request.cookies.get(websession.SIGNIN_COOKIE)
    if not websession.csrf_ok(settings, nonce, csrf):
        raise PageError(
            status.HTTP_403_FORBIDDEN,
            "the sign-in form is missing its CSRF token or it is stale: reload the page and try again",
        )
    token = token.strip()

    def sign_in(session: Session) -> str | None:
        if not token or websession.is_session_token(token):
            return None
        user = auth.authenticate(session, token)
        if user is None:
            return None
        return websession.start_session(session, user)

    session_token = run_tx(sessions, sign_in)
    if session_token is None:
        return _signin_page(
            request,
            settings,
            next_path=_safe_next(next),
            error="That is not a valid API token (`lbgat login` stores yours; an admin can create one).",
            code=status.HTTP_401_UNAUTHORIZED,
        )
    response = RedirectResponse(_safe_next(next), status_code=status.HTTP_303_SEE_OTHER)
    websession.set_session_cookie(response, request, settings, session_token)
    response.delete_cookie(websession.SIGNIN_COOKIE, path="/")
    return response


@router.post("/sign-out")
async def delete_session(request: Request, settings: SettingsDep, sessions: SessionsDep) -> Response:
    await checked_form(request)
    token = request.cookies.get(websession.SESSION_COOKIE, "")
    await run_in_threadpool(run_tx, sessions, lambda s: websession.end_session(s, token))
    response = RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    websession.clear_session_cookie(response, request, settings)
    return response


# -- queue -------------------------------------------------------------------------------------------


def _queue_context(
    web: websession.WebSession,
    sessions: sessionmaker[Session],
    scheduler: SchedulerLike | None,
    settings: ServiceSettings,
) -> dict[str, Any]:
    with sessions() as session:

        def waiting() -> list[str]:  # read only while plans are cheap (queue_report.current_view)
            query = select(Experiment.id).where(Experiment.state.in_(jobs.WAITING_STATES))
            return list(session.scalars(query.limit(views.MAX_QUEUE_ROWS)))

        view = queue_report.current_view(scheduler, waiting) if scheduler is not None else None
        rows = views.queue_rows(session, web.user, view)
        recent = [
            (jobs.to_out(e, settings=settings), views.may_change(e, web.user))
            for e in views.recent_rows(session, web.user)
        ]
        last_event = session.scalar(
            select(Event.id).where(Event.kind == "state").order_by(Event.id.desc()).limit(1)
        )
    return {
        "rows": rows,
        "recent": recent,
        "scheduler_on": scheduler is not None,
        "last_event": last_event or 0,
    }


def _queue_page(
    request: Request,
    web: websession.WebSession,
    sessions: sessionmaker[Session],
    scheduler: SchedulerLike | None,
) -> HTMLResponse:
    context = _queue_context(web, sessions, scheduler, request.app.state.settings)
    return render(request, "queue.html", web=web, title="Queue", **context)


@router.get("/queue", response_class=HTMLResponse)
def read_queue(
    request: Request, web: WebSessionDep, sessions: SessionsDep, scheduler: SchedulerDep
) -> HTMLResponse:
    return _queue_page(request, web, sessions, scheduler)


@router.get("/queue/table", response_class=HTMLResponse)
def read_queue_table(
    request: Request, web: WebSessionDep, sessions: SessionsDep, scheduler: SchedulerDep
) -> HTMLResponse:
    """The queue's tables alone, for web.js to swap in when the live stream says something changed."""
    context = _queue_context(web, sessions, scheduler, request.app.state.settings)
    return render(request, "_queue_tables.html", web=web, **context)


def _queue_poll(
    sessions: sessionmaker[Session], user: User, after: int
) -> list[tuple[int, str, dict[str, Any], str]]:
    with sessions() as session:
        query = (
            select(Event.id, Event.experiment_id, Event.data, Event.at)
            .join(Experiment, Experiment.id == Event.experiment_id)
            .where(Event.kind == "state", Event.id > after)
            .order_by(Event.id)
            .limit(sse.BATCH)
        )
        if not user.is_admin:
            query = query.where(Experiment.team_id == user.team_id)
        rows = session.execute(query).all()
        if not rows:
            # events of other teams move the shared queue too: report how far the stream has read
            newest = session.scalar(
                select(Event.id)
                .where(Event.kind == "state", Event.id > after)
                .order_by(Event.id.desc())
                .limit(1)
            )
            if newest is not None:
                return [(newest, "", {}, "")]
    return [(r.id, r.experiment_id, r.data, r.at.isoformat()) for r in rows]


async def queue_events(
    sessions: sessionmaker[Session], user: User, *, after: int, poll_s: float = QUEUE_POLL_S
) -> AsyncIterator[str]:
    """`state` events of the user's visible experiments (the API's event format plus `experiment`),
    and `moved` when only other teams' jobs changed (positions in the shared queue may have)."""
    yield f"retry: {sse.RETRY_MS}\n\n"
    last_write = time.monotonic()
    while True:
        events = await run_in_threadpool(_queue_poll, sessions, user, after)
        for event_id, exp_id, data, at in events:
            if exp_id:
                yield sse.format_event("state", {"experiment": exp_id, **data, "at": at}, event_id)
            else:
                yield sse.format_event("moved", {}, event_id)
            after = event_id
        if events:
            last_write = time.monotonic()
            if len(events) == sse.BATCH:
                continue
        elif time.monotonic() - last_write >= HEARTBEAT_S:
            yield ": keep-alive\n\n"
            last_write = time.monotonic()
        await asyncio.sleep(poll_s)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@router.get("/queue/events")
def read_queue_events(
    request: Request,
    web: WebSessionDep,
    sessions: SessionsDep,
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> StreamingResponse:
    last = request.headers.get("last-event-id", "")
    start = int(last) if last.isdigit() and int(last) < 2**31 else after
    return StreamingResponse(
        queue_events(sessions, web.user, after=start), media_type="text/event-stream", headers=_SSE_HEADERS
    )


# -- cancel / retry ----------------------------------------------------------------------------------


def _change(
    request: Request, web: websession.WebSession, experiment_id: str, form: dict[str, str], operation: Any
) -> Response:
    sessions = request.app.state.sessions

    def change(session: Session) -> None:
        exp = jobs.get_experiment(session, experiment_id, viewer=web.user)
        operation(session, exp, user=web.user)

    with page_errors():
        run_tx(sessions, change)
    scheduler = request.app.state.scheduler
    if scheduler is not None:
        scheduler.wake()
    back = _safe_next(form.get("next") or f"/experiments/{experiment_id}")
    return RedirectResponse(back, status_code=status.HTTP_303_SEE_OTHER)


@router.post("/experiments/{experiment_id}/cancel")
async def cancel_experiment(request: Request, experiment_id: str, web: WebSessionDep) -> Response:
    form = await checked_form(request)
    return await run_in_threadpool(_change, request, web, experiment_id, form, jobs.cancel_experiment)


@router.post("/experiments/{experiment_id}/retry")
async def retry_experiment(request: Request, experiment_id: str, web: WebSessionDep) -> Response:
    form = await checked_form(request)
    return await run_in_threadpool(_change, request, web, experiment_id, form, jobs.retry_experiment)


# -- one experiment ----------------------------------------------------------------------------------


def _artifacts(store: ArtifactStore, exp_id: str) -> tuple[list[tuple[str, int]], str | None]:
    prefix = experiment_prefix(exp_id)
    try:
        return [(o.key[len(prefix) :], o.size) for o in store.list(prefix)], None
    except StoreError as exc:
        log.warning("artifacts of %s: %s", exp_id, exc)  # names the store's location: the log only
        return [], "the artifact store did not answer; the list comes back when it does"


def _log(ray: RayJobs | None, submission_id: str | None) -> tuple[str, str | None]:
    if ray is None:
        return "", "no Ray cluster is configured for this service: logs come from Ray"
    if not submission_id:
        return "", None
    try:
        return views.log_tail(ray.logs(submission_id)), None
    except RayUnavailable as exc:
        log.warning("log of %s: %s", submission_id, exc)
        return "", "Ray did not answer; the log shows again when it does"


@router.get("/experiments/{experiment_id}", response_class=HTMLResponse)
def read_experiment(
    request: Request,
    experiment_id: str,
    web: WebSessionDep,
    sessions: SessionsDep,
    settings: SettingsDep,
    scheduler: SchedulerDep,
    store: StoreDep,
    ray: RayDep,
) -> HTMLResponse:
    with sessions() as session, page_errors():
        exp = jobs.get_experiment(session, experiment_id, viewer=web.user)
        view = (
            queue_report.current_view(scheduler, [exp.id])
            if scheduler is not None and exp.state in jobs.WAITING_STATES
            else None
        )
        out = jobs.to_out(exp, settings=settings, queue=view)
        trials = jobs.trials(session, exp.id)
        metric_rows = jobs.metric_rows(session, exp.id, None)
        context = {
            "exp": out,
            "cancel_requested": bool(exp.cancel_requested),
            "can_change": views.may_change(exp, web.user),
            "spec_yaml": views.spec_yaml(exp.spec),
            "history": jobs.history(session, exp.id),
            "trials": trials,
            "curves": views.curves(metric_rows, is_sweep=exp.is_sweep),
            "pareto": views.pareto_plot(trials) if exp.is_sweep else None,
            "results": views.results(exp, trials),
            "error_log_tail": exp.error_log_tail,
            "last_event": session.scalar(
                select(Event.id).where(Event.experiment_id == exp.id).order_by(Event.id.desc()).limit(1)
            )
            or 0,
        }
    artifacts, artifacts_error = _artifacts(store, out.id)
    log_text, log_error = _log(ray, out.ray_job_id)
    return render(
        request,
        "experiment.html",
        web=web,
        title=f"{out.name} ({out.id})",
        artifacts=artifacts,
        artifacts_error=artifacts_error,
        log_text=log_text,
        log_error=log_error,
        live=not out.state.terminal,
        **context,
    )


@router.get("/experiments/{experiment_id}/curves", response_class=HTMLResponse)
def read_curves(
    request: Request, experiment_id: str, web: WebSessionDep, sessions: SessionsDep
) -> HTMLResponse:
    """The curves alone, for web.js to redraw them as metrics arrive."""
    with sessions() as session, page_errors():
        exp = jobs.get_experiment(session, experiment_id, viewer=web.user)
        charts = views.curves(jobs.metric_rows(session, exp.id, None), is_sweep=exp.is_sweep)
    return render(request, "_curves.html", web=web, curves=charts)


@router.get("/experiments/{experiment_id}/events")
def read_experiment_events(
    request: Request,
    experiment_id: str,
    web: WebSessionDep,
    sessions: SessionsDep,
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> StreamingResponse:
    """The API's event stream (service.api.sse) for a signed-in browser."""
    with sessions() as session, page_errors():
        jobs.get_experiment(session, experiment_id, viewer=web.user)
    last = request.headers.get("last-event-id", "")
    start = int(last) if last.isdigit() and int(last) < 2**31 else after
    return StreamingResponse(
        sse.experiment_events(sessions, experiment_id, after=start),
        media_type="text/event-stream",
        headers=_SSE_HEADERS,
    )


@router.get("/experiments/{experiment_id}/log")
async def read_log(
    experiment_id: str, web: WebSessionDep, sessions: SessionsDep, ray: RayDep, follow: bool = False
) -> Response:
    """The Ray job's log as text; follow=true streams it until the job ends."""

    def visible() -> Experiment:
        with sessions() as session, page_errors():
            return jobs.get_experiment(session, experiment_id, viewer=web.user)

    exp = await run_in_threadpool(visible)
    if ray is None or not exp.ray_job_id:
        return PlainTextResponse("")
    submission_id = exp.ray_job_id
    if not follow:
        text, problem = await run_in_threadpool(_log, ray, submission_id)
        return PlainTextResponse(text if problem is None else f"[lbgat] {problem}\n")

    async def follow_log() -> AsyncIterator[str]:
        try:
            async for chunk in ray.tail_logs(submission_id):
                yield chunk
        except RayUnavailable as exc:
            log.warning("following the log of %s stopped: %s", submission_id, exc)
            yield "\n[lbgat] the log stream stopped: Ray did not answer\n"

    return StreamingResponse(
        follow_log(), media_type="text/plain; charset=utf-8", headers={"Cache-Control": "no-cache"}
    )


@router.get("/experiments/{experiment_id}/artifacts/{path:path}")
def read_artifact(
    experiment_id: str, path: str, web: WebSessionDep, sessions: SessionsDep, store: StoreDep
) -> Response:
    with sessions() as session, page_errors():
        exp = jobs.get_experiment(session, experiment_id, viewer=web.user)
    try:
        key = artifact_key(exp.id, path)
    except HTTPException as exc:  # artifact_key's 400, as a page
        raise PageError(exc.status_code, str(exc.detail)) from None
    try:
        chunks = store.iter_chunks(key, CHUNK)
        first = next(chunks, b"")
    except KeyNotFound:
        raise PageError(status.HTTP_404_NOT_FOUND, f"no artifact {path!r} in experiment {exp.id}") from None
    except StoreError as exc:
        log.warning("artifact %s of %s: %s", path, exp.id, exc)
        raise PageError(
            status.HTTP_503_SERVICE_UNAVAILABLE, "the artifact store did not answer; try again later"
        ) from None
    return StreamingResponse(
        chain([first], chunks),
        media_type=_media_type(path),
        headers={"Content-Disposition": _disposition(path), "X-Content-Type-Options": "nosniff"},
    )


# -- leaderboard -------------------------------------------------------------------------------------


@router.get("/leaderboard", response_class=HTMLResponse)
def read_leaderboard(
    request: Request,
    web: WebSessionDep,
    sessions: SessionsDep,
    dataset: Annotated[str | None, Query(max_length=32)] = None,
    threat: Annotated[
        str | None, Query(max_length=40, description="`<norm> <eps>`, e.g. `linf 0.031`")
    ] = None,
    method: Annotated[str | None, Query(max_length=32)] = None,
    protocol: Annotated[str | None, Query(max_length=128)] = None,
    sort: Annotated[str | None, Query(max_length=32)] = None,
    order: Annotated[str, Query(pattern="^(asc|desc)$")] = "desc",
    compare: Annotated[list[str] | None, Query(max_length=20)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> HTMLResponse:
    norm, eps = None, None
    if threat:
        parts = threat.split()
        try:
            norm, eps = parts[0], float(parts[1])
        except (IndexError, ValueError):
            raise PageError(
                status.HTTP_422_UNPROCESSABLE_CONTENT, f"threat model {threat!r}: give `<norm> <eps>`"
            ) from None
    filters = {"dataset": dataset, "norm": norm, "eps": eps, "method": method}
    chosen = list(dict.fromkeys(compare or []))
    base = {
        k: v
        for k, v in {"dataset": dataset, "threat": threat, "method": method, "protocol": protocol}.items()
        if v
    }

    def sort_link(column: str) -> str:
        flip = "asc" if sort == column and order == "desc" else "desc"
        return "/leaderboard?" + urlencode({**base, "sort": column, "order": flip})

    common = {
        "filters": {
            "dataset": dataset or "",
            "threat": threat or "",
            "method": method or "",
            "protocol": protocol or "",
        },
        "sort": sort,
        "order": order,
        "sort_link": sort_link,
        "chosen": set(chosen),
    }
    if protocol:
        context = _protocol_board(sessions, web.user, protocol, filters, chosen, sort, order, limit)
        return render(request, "leaderboard.html", web=web, title="Leaderboard", **common, **context)
    with sessions() as session, page_errors():
        rows = views.leaderboard_rows(session, web.user, filters, limit)
        choices = views.filter_choices(session, web.user)
        compared = [
            row
            for row in (
                jobs.result_row(jobs.get_experiment(session, exp_id, viewer=web.user), require_results=False)
                for exp_id in chosen
            )
            if row is not None
        ]
    attacks = list(dict.fromkeys(name for row in compared for name in row.attacks))
    rank = {row.experiment_id: index + 1 for index, row in enumerate(rows)}
    shown = views.sort_rows(list(rows), sort, order == "desc")
    return render(
        request,
        "leaderboard.html",
        web=web,
        title="Leaderboard",
        board="experiments",
        rows=shown,
        rank=rank,
        choices=choices,
        selected_protocol="",
        compared=compared,
        attacks=attacks,
        scatter=views.board_scatter(shown, chosen),
        **common,
    )


def _protocol_board(
    sessions: sessionmaker[Session],
    user: User,
    protocol: str,
    filters: dict[str, Any],
    chosen: list[str],
    sort: str | None,
    order: str,
    limit: int,
) -> dict[str, Any]:
    """The board of one protocol's (checkpoint, protocol) rows; `compare` picks rows of it by
    `<job id>:<weights>` (views.row_key)."""
    with sessions() as session, page_errors():
        selected = views.protocol_key(protocol)  # an unknown protocol: 422, naming the known ones
        rows = views.protocol_rows(session, user, protocol, filters, limit)
        choices = views.filter_choices(session, user)
    if selected not in {c.key for c in choices.protocols}:
        choices.protocols.insert(0, views.ProtocolChoice(selected, results=len(rows)))
    groups = views.protocol_groups(rows, sort, order == "desc")
    by_key = {views.row_key(row): row for row in rows}
    compared = [by_key[key] for key in chosen if key in by_key]
    return {
        "board": "protocol",
        "groups": groups,
        "n_rows": len(rows),
        "choices": choices,
        "selected_protocol": selected,
        "protocol_info": _protocol_info(selected),
        "compared": compared,
        "not_compared": [key for key in chosen if key not in by_key],
        "attacks": list(dict.fromkeys(name for row in compared for name in row.attacks)),
        "scatter": views.protocol_scatter(groups, chosen),
    }


def _protocol_info(key: str) -> Protocol | None:
    try:
        return get_protocol(key)
    except UnknownProtocol:  # custom suites: their version is a hash, not a shipped protocol
        return None


# -- static files ------------------------------------------------------------------------------------


@router.get("/static/{name}")
def read_static(name: str) -> Response:
    if name not in STATIC:
        raise PageError(status.HTTP_404_NOT_FOUND, f"no static file {name!r}")
    return Response(
        _static_bytes(name),
        media_type=STATIC[name],
        headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


# -- installation ------------------------------------------------------------------------------------


def _signin_redirect(request: Request, exc: SignInRequired) -> Response:
    if request.url.path.endswith(("/events", "/table", "/curves", "/log")):
        # a stream or a fragment that web.js fetches: say so plainly instead of redirecting
        return PlainTextResponse(
            "sign in first", status_code=status.HTTP_401_UNAUTHORIZED, headers=_headers()
        )
    if request.method != "GET":  # a form posted after the session ended: sign in again
        return RedirectResponse("/", status_code=status.HTTP_303_SEE_OTHER)
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse("/?" + urlencode({"next": target}), status_code=status.HTTP_303_SEE_OTHER)


def _page_error(request: Request, exc: PageError) -> Response:
    web = None
    with contextlib.suppress(Exception):
        web = _read_session(request)
    return render(
        request,
        "error.html",
        web=web,
        title="Error",
        status_code=exc.status_code,
        message=str(exc),
        code=exc.status_code,
    )


def install(app: FastAPI) -> None:
    """Serve the pages from `app` (the routes, and the handlers that turn refusals into pages)."""
    app.add_exception_handler(SignInRequired, _signin_redirect)  # type: ignore[arg-type]
    app.add_exception_handler(PageError, _page_error)  # type: ignore[arg-type]
    app.include_router(router)
