"""The control plane's FastAPI app: `create_app(settings)`; `lbgat serve` runs it with uvicorn.

The lifespan opens everything the routes use and keeps it in `app.state`: settings, the database
(`engine`, `sessions`; migrated at start), the artifact `store`, `ray` (a RayJobs, or None without a
Ray address) and the `scheduler` (this process's dispatcher, or None). Torch is never imported here,
and Ray's client only when a RayJobs first talks to Ray, so the API starts in about a second.

Errors: every 4xx/5xx body is an `ErrorDetail`. Domain errors (service.jobs.JobError) carry their
status; invalid specs and requests answer 422 with dotted field paths; the artifact store's errors
answer 404/503 without its location (logged here); anything unexpected is logged here and answered
with a generic 500 that reveals nothing. The OpenAPI document (service/api/openapi.py) says so.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_schemas import SpecError
from api_schemas.jobs import ErrorDetail
from service import auth
from service.api import api_router, health_router
from service.api.openapi import build_openapi
from service.db.engine import make_engine, run_tx, session_factory
from service.db.migrate import upgrade
from service.jobs import JobError
from service.metrics import RequestTimer, ServiceMetrics, route_template
from service.ray_jobs import RayJobs
from service.settings import ServiceSettings, get_settings
from workers.settings import StoreSettings
from workers.storage import ArtifactStore, KeyNotFound, StoreError, open_store

log = logging.getLogger("service")

MAX_ERRORS = 50  # field errors listed in one 422


# -- errors ------------------------------------------------------------------------------------------


def _error(
    status_code: int, detail: str, errors: list[dict[str, Any]] | None = None, **kw: Any
) -> JSONResponse:
    body = ErrorDetail(detail=detail, errors=(errors or [])[:MAX_ERRORS])
    return JSONResponse(body.model_dump(), status_code=status_code, **kw)


def dotted(loc: tuple[Any, ...] | list[Any]) -> str:
    """('body', 'spec', 'method', 0, 'alpha') -> 'body.spec.method[0].alpha'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


async def _job_error(request: Request, exc: JobError) -> JSONResponse:
    # a refusal that names fields (service.evaluations.Invalid) lists them as a 422 of validation does
    return _error(exc.status, str(exc), getattr(exc, "errors", None))


async def _spec_error(request: Request, exc: SpecError) -> JSONResponse:
    errors = [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors]
    summary = "; ".join(f"{e['loc'] or '<root>'}: {e['msg']}" for e in errors[:5])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    if exc.too_large:  # refused for its size (expanded YAML, stored JSON), not its content
        return _error(status.HTTP_413_CONTENT_TOO_LARGE, f"spec too large: {summary}{more}", errors)
    return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid spec: {summary}{more}", errors)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "loc": dotted(e.get("loc", ())),
            "msg": e.get("msg", "invalid"),
            "type": e.get("type", "value_error"),
        }
        for e in exc.errors()
    ]
    summary = "; ".join(f"{e['loc']}: {e['msg']}" for e in errors[:5])
    return _error(status.HTTP_422_UNPROCESSABLE_CONTENT, f"invalid request: {summary}", errors)


def _allowed_methods(request: Request) -> str | None:
    """`Allow` for a 405: every method the OpenAPI document declares for the matched path template.

    The router names only the methods of the first route whose path matched, and this API serves
    several methods of one path from separate routes (GET and DELETE of an experiment)."""
    operations = request.app.openapi()["paths"].get(route_template(request.scope))
    if not operations:
        return None
    return ", ".join(sorted(method.upper() for method in operations))


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == status.HTTP_405_METHOD_NOT_ALLOWED:
        allowed = _allowed_methods(request)
        if allowed is not None:
            headers["Allow"] = allowed
    return _error(exc.status_code, str(exc.detail), headers=headers or None)


STORE_NOT_FOUND = "not found in the artifact store"
STORE_UNAVAILABLE = "the artifact store is unavailable; try again later (the service log says why)"


async def _not_found(request: Request, exc: KeyNotFound) -> JSONResponse:
    # The store's messages name its location (a local path, a bucket's endpoint): the log only.
    # Routes that know which artifact was asked for answer their own 404 naming just the artifact.
    log.info("%s %s: %s", request.method, request.url.path, exc)
    return _error(status.HTTP_404_NOT_FOUND, STORE_NOT_FOUND)


async def _store_error(request: Request, exc: StoreError) -> JSONResponse:
    # The message names the endpoint (never the secret key: S3Store scrubs it): the log only.
    log.warning("%s %s: artifact store error: %s", request.method, request.url.path, exc)
    return _error(status.HTTP_503_SERVICE_UNAVAILABLE, STORE_UNAVAILABLE)


async def _conflict(request: Request, exc: IntegrityError) -> JSONResponse:
    log.warning("%s %s: integrity error: %s", request.method, request.url.path, str(exc.orig).splitlines()[0])
    return _error(status.HTTP_409_CONFLICT, "conflicting concurrent change; try again")


INTERNAL_ERROR = "internal server error (logged on the server)"


class CatchAll:
    """Answer an unexpected exception with a generic 500 (ErrorDetail) and log it with its traceback.

    A middleware rather than an `Exception` handler: Starlette re-raises after such a handler, and
    uvicorn then drops the keep-alive connection, so a client's next request on it would fail too.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.error(
                "unhandled %s in %s %s",
                type(exc).__name__,
                scope["method"],
                route_template(scope),
                exc_info=exc,
            )
            if started:  # a stream broke midway: nothing to answer, drop the connection
                raise
            response = _error(status.HTTP_500_INTERNAL_SERVER_ERROR, INTERNAL_ERROR)
            await response(scope, receive, send)


# -- the app -----------------------------------------------------------------------------------------


def _secrets(settings: ServiceSettings, store_settings: StoreSettings | None) -> list[str]:
    """Values that must never appear in an answer (readiness reasons are scrubbed of them)."""
    found = []
    if settings.admin_token is not None:
        found.append(settings.admin_token.get_secret_value())
    password = make_url(settings.database_url).password
    if password:
        found.append(str(password))
    if store_settings is not None and store_settings.s3_secret_key is not None:
        found.append(store_settings.s3_secret_key.get_secret_value())
    return [s for s in found if s]


def create_app(
    settings: ServiceSettings | None = None,
    *,
    store: ArtifactStore | None = None,
    ray: RayJobs | None = None,
    scheduler: bool | None = None,
) -> FastAPI:
    """The API. `store`/`ray` replace the ones the settings name; `scheduler` False never starts the
    dispatcher here, True starts it whatever `settings.scheduler_enabled` says."""
    settings = settings if settings is not None else get_settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.database_url, pool_size=settings.database_pool_size)
        sched = None
        sender = None
        try:
            upgrade(engine)
            sessions = session_factory(engine)
            if settings.admin_token is not None:
                token = settings.admin_token.get_secret_value()
                try:
                    run_tx(sessions, lambda s: auth.ensure_admin(s, token))
                except IntegrityError:  # another replica bootstrapped it at the same moment
                    run_tx(sessions, lambda s: auth.ensure_admin(s, token))
            store_settings = None if store is not None else StoreSettings()
            app_store = store if store is not None else open_store(store_settings)
            app_ray = ray
            if app_ray is None and settings.ray_address:
                token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
                app_ray = RayJobs(settings.ray_address, token=token, gpu_resource=settings.gpu_resource)
            metrics.bind_database(sessions, settings=settings)
            app.state.engine = engine
            app.state.sessions = sessions
            app.state.store = app_store
            app.state.ray = app_ray
            app.state.secrets = _secrets(settings, store_settings)
            from service.scheduler import Scheduler

            # Every replica plans (queue positions and reasons for the API); only some dispatch.
            planner = Scheduler(
                sessions=sessions,
                settings=settings,
                store=app_store,
                ray=app_ray,
                store_settings=store_settings,
            )
            if scheduler is True or (scheduler is None and settings.scheduler_enabled):
                planner.start()
                sched = planner
            app.state.scheduler = planner
            if settings.webhooks_enabled:  # its own thread: a slow receiver never holds up the queue
                from service.webhooks import WebhookSender

                sender = WebhookSender(sessions=sessions, settings=settings)
                sender.start()
            app.state.webhook_sender = sender
            log.info(
                "lbgat service ready: database %s, store %s, ray %s, scheduler %s",
                engine.url.render_as_string(hide_password=True),
                app_store.url,
                app_ray.address if app_ray is not None else "not configured",
                "on" if sched is not None else "off",
            )
            yield
        finally:
            if sender is not None:
                sender.stop()
            if sched is not None:
                sched.stop()
            engine.dispose()

    app = FastAPI(
        title="lbgat control plane",
        version="1",
        summary="Queue, schedule and follow adversarial-training experiments on a shared Ray cluster",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.scheduler = None
    app.state.ray = None
    app.state.webhook_sender = None

    app.add_exception_handler(JobError, _job_error)
    app.add_exception_handler(SpecError, _spec_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(KeyNotFound, _not_found)
    app.add_exception_handler(StoreError, _store_error)
    app.add_exception_handler(IntegrityError, _conflict)

    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        )
    app.add_middleware(CatchAll)
    app.add_middleware(RequestTimer, metrics=metrics)  # outermost: times every answer, 500s included

    app.include_router(health_router)
    app.include_router(api_router)
    if settings.web_enabled:
        from service.web import install as install_pages

        install_pages(app)
    app.openapi = lambda: build_openapi(app, settings)  # type: ignore[method-assign]
    return app
