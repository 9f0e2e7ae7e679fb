"""Liveness (/healthz), readiness (/readyz: database, store, Ray) and Prometheus metrics (/metrics).

/readyz answers anyone (load balancers and probes have no token), so a component that is not ready is
named with the kind of failure only; the full reason, which may hold the store's path or endpoint or
Ray's address, goes to the service's log (cut short, every secret this service knows masked). The
store is asked through the scheduler's one-attempt, short-timeout view where there is one, so a
store that is down does not hold the probe up for the store client's whole retry schedule.
"""

from __future__ import annotations

import hmac
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from api_schemas.jobs import Readiness
from service.api.deps import RayDep, SessionsDep, StoreDep, bearer, get_current_user
from service.api.responses import errors
from service.metrics import CONTENT_TYPE

log = logging.getLogger("service.api")

router = APIRouter(tags=["health"])

MAX_REASON = 300


def scrub(message: str, secrets: list[str]) -> str:
    for secret in secrets:
        if secret:
            message = message.replace(secret, "**********")
    message = " ".join(message.split())
    return message if len(message) <= MAX_REASON else message[: MAX_REASON - 3] + "..."


def _check(name: str, fn: Any, secrets: list[str]) -> str:
    try:
        result = fn()
    except Exception as exc:
        reason = scrub(f"{type(exc).__name__}: {exc}", secrets)
        log.warning("readiness: %s not ready: %s", name, reason)
        return f"not ready: {type(exc).__name__} (the reason is in the service's log)"
    return result if isinstance(result, str) else "ok"


def _database(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        session.execute(text("SELECT 1"))


@router.get("/healthz", summary="Liveness: the process answers (no dependencies checked)")
def read_health() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the database, the artifact store and Ray (if configured) answer",
    responses={503: {"model": Readiness, "description": "a component is not ready"}},
)
def read_readiness(request: Request, sessions: SessionsDep, store: StoreDep, ray: RayDep) -> JSONResponse:
    secrets: list[str] = request.app.state.secrets
    monitor = getattr(request.app.state.scheduler, "store_monitor", None)
    quick_store = monitor.store if monitor is not None else store
    checks = {
        "database": _check("database", lambda: _database(sessions), secrets),
        "store": _check("store", quick_store.check, secrets),
        "ray": "not configured" if ray is None else _check("ray", ray.check, secrets),
    }
    ready = all(value in ("ok", "not configured") for value in checks.values())
    body = Readiness(ready=ready, checks=checks)
    code = status.HTTP_200_OK if ready else status.HTTP_503_SERVICE_UNAVAILABLE
    return JSONResponse(body.model_dump(), status_code=code)


def metrics_reader(
    request: Request,
    sessions: SessionsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """Any user's API token, or LBGAT_METRICS_TOKEN (a scraper's secret that opens nothing else)."""
    expected = request.app.state.settings.metrics_token
    if (
        expected is not None
        and credentials is not None
        and hmac.compare_digest(credentials.credentials.encode(), expected.get_secret_value().encode())
    ):
        return
    get_current_user(sessions, credentials)


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics: queue depth and wait per state, jobs per user, request and dispatch latency",
    responses={200: {"content": {CONTENT_TYPE: {"schema": {"type": "string"}}}}, **errors(401)},
    dependencies=[Depends(metrics_reader)],
)
def read_metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
