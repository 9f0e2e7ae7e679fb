"""Dependencies of the routes, as `Annotated` aliases (`SessionDep`, `CurrentUser`, ...) so that
handlers stay thin and tests can override any of them with `app.dependency_overrides`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Annotated, Protocol

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import StringConstraints
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service import auth
from service.db.models import User
from service.ray_jobs import RayJobs
from service.settings import ServiceSettings
from service.web.sessions import is_session_token
from workers.storage import ArtifactStore

# auto_error=False: we answer a missing token ourselves (401 + WWW-Authenticate, ErrorDetail body);
# the scheme still documents bearer auth in OpenAPI.
bearer = HTTPBearer(auto_error=False, description="an API token: `Authorization: Bearer lbg_...`")


def get_settings(request: Request) -> ServiceSettings:
    return request.app.state.settings


def get_sessions(request: Request) -> sessionmaker[Session]:
    return request.app.state.sessions


def get_db(sessions: Annotated[sessionmaker[Session], Depends(get_sessions)]) -> Iterator[Session]:
    """A read session for the request. Writes go through `service.db.engine.run_tx(sessions, fn)`,
    which owns its transaction and retries SQLite write conflicts."""
    with sessions() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_ray(request: Request) -> RayJobs | None:
    return request.app.state.ray


class SchedulerLike(Protocol):
    """What the API needs of `service.scheduler.Scheduler` (imported only when one starts)."""

    def wake(self) -> None: ...

    def queue_view(
        self, ids: Iterable[str] = (), max_age_s: float = 2.0
    ) -> dict[str, tuple[int, str, datetime | None]]: ...

    def expected_ends(self, max_age_s: float = 2.0) -> dict[str, datetime]: ...


def get_scheduler(request: Request) -> SchedulerLike | None:
    return request.app.state.scheduler


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": 'Bearer realm="lbgat"'},
    )


def get_current_user(
    sessions: Annotated[sessionmaker[Session], Depends(get_sessions)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> User:
    """The token's user. The session closes before the handler runs: the returned User is detached,
    with its team loaded (both are read-only for handlers)."""
    if credentials is None or not credentials.credentials:
        raise _unauthorized("missing API token: send `Authorization: Bearer <token>` (see `lbgat login`)")
    if is_session_token(credentials.credentials):
        raise _unauthorized("a page session is not an API token: use a token from `lbgat login`")
    with sessions() as session:
        user = auth.authenticate(session, credentials.credentials)
        if user is not None and auth.touch_token(session, credentials.credentials):
            try:
                session.commit()
            except OperationalError:  # best effort: a busy SQLite writer must not fail the request
                session.rollback()
    if user is None:
        raise _unauthorized("invalid or revoked API token")
    return user


def get_admin_user(user: Annotated[User, Depends(get_current_user)]) -> User:
    if not user.is_admin:
        raise HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail="this needs an admin token")
    return user


# PostgreSQL's text cannot hold NUL: a string parameter that reaches a query may not contain one (a 422
# naming it, where the driver would fail the query with a 500). The same on SQLite, so that both agree.
NO_NUL = r"^[^\x00]*$"
NoNulStr = Annotated[str, StringConstraints(pattern=NO_NUL)]
ExperimentId = Annotated[str, Path(pattern=NO_NUL, description="an experiment's id, e.g. lbgat-c10-1a2b3c4d")]
EvaluationId = Annotated[
    str,
    Path(pattern=NO_NUL, description="an evaluation's id (a job of the queue), e.g. eval-lbgat-c10-1a2b3c4d"),
]

SettingsDep = Annotated[ServiceSettings, Depends(get_settings)]
SessionsDep = Annotated[sessionmaker[Session], Depends(get_sessions)]
SessionDep = Annotated[Session, Depends(get_db)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
RayDep = Annotated[RayJobs | None, Depends(get_ray)]
SchedulerDep = Annotated[SchedulerLike | None, Depends(get_scheduler)]
CurrentUser = Annotated[User, Depends(get_current_user)]
AdminUser = Annotated[User, Depends(get_admin_user)]


def wake(scheduler: SchedulerLike | None) -> None:
    """Start the scheduler's next round now (after a submit, cancel or retry), if one runs here."""
    if scheduler is not None:
        scheduler.wake()
