"""Users (created by an admin) and API tokens (shown once, stored hashed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api_schemas.jobs import DB_INT_MAX, CreatedUser, TokenCreate, TokenOut, UserCreate, UserOut
from service import auth
from service.api.deps import AdminUser, CurrentUser, SessionDep, SessionsDep
from service.api.responses import errors
from service.db.engine import run_tx
from service.db.models import ApiToken, User

router = APIRouter(tags=["users"])

_NOT_ADMIN = {403: "the token's user is not an admin"}
# A JSON body FastAPI cannot decode (not UTF-8, nested too deep) is its 400, before validation.
_BAD_BODY = {400: "the body is not readable JSON (not UTF-8, or nested too deep)"}


def user_out(user: User) -> UserOut:
    return UserOut(
        name=user.name,
        team=user.team.name,
        is_admin=user.is_admin,
        max_running_jobs=user.max_running_jobs,
        max_gpus=user.max_gpus,
        created_at=user.created_at,
    )


def token_out(row: ApiToken, user: User, token: str) -> TokenOut:
    return TokenOut(id=row.id, user=user.name, label=row.label, token=token, prefix=row.prefix)


@router.post(
    "/users",
    response_model=CreatedUser,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user (admin); the answer holds their first token, shown once",
    responses=errors(
        400, 401, 403, 409, 422, descriptions={**_BAD_BODY, **_NOT_ADMIN, 409: "the name is taken"}
    ),
)
def create_user(body: UserCreate, admin: AdminUser, sessions: SessionsDep) -> CreatedUser:
    def create(session: Session) -> CreatedUser:
        user = auth.create_user(
            session,
            name=body.name,
            team=body.team,
            is_admin=body.is_admin,
            max_running_jobs=body.max_running_jobs,
            max_gpus=body.max_gpus,
        )
        row, token = auth.issue_token(session, user, label=f"created by {admin.name}"[:64])
        return CreatedUser(user=user_out(user), token=token_out(row, user, token))

    return run_tx(sessions, create)


@router.get(
    "/users",
    response_model=list[UserOut],
    summary="All users (admin)",
    responses=errors(401, 403, 422, descriptions=_NOT_ADMIN),
)
def read_users(admin: AdminUser, session: SessionDep) -> list[UserOut]:
    return [user_out(u) for u in session.scalars(select(User).order_by(User.name))]


@router.get("/users/me", response_model=UserOut, summary="The token's user", responses=errors(401, 422))
def read_user_me(current_user: CurrentUser) -> UserOut:
    return user_out(current_user)


@router.post(
    "/tokens",
    response_model=TokenOut,
    status_code=status.HTTP_201_CREATED,
    summary="A new token for yourself (shown once)",
    responses=errors(400, 401, 422, descriptions=_BAD_BODY),
)
def create_token(body: TokenCreate, current_user: CurrentUser, sessions: SessionsDep) -> TokenOut:
    def issue(session: Session) -> TokenOut:
        row, token = auth.issue_token(session, current_user, label=body.label)
        return token_out(row, current_user, token)

    return run_tx(sessions, issue)


@router.delete(
    "/tokens/{token_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Revoke a token (yours, or anyone's for an admin)",
    responses=errors(401, 404, 422, descriptions={404: "no such token of yours, or already revoked"}),
)
def delete_token(
    token_id: Annotated[int, Path(ge=1, le=DB_INT_MAX, description="the id `POST /v1/tokens` answered")],
    current_user: CurrentUser,
    sessions: SessionsDep,
) -> Response:
    """The id is bounded by what the tokens table's integer key holds (a larger one is a 422 naming
    `path.token_id`, not a database overflow)."""
    if not run_tx(sessions, lambda session: auth.revoke_token(session, current_user, token_id)):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"token {token_id} not found (or already revoked)")
    return Response(status_code=status.HTTP_204_NO_CONTENT)
