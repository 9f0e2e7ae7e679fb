"""Users, teams and API tokens. A token is 256 random bits shown once; only its SHA-256 is stored."""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service.db.models import ApiToken, Team, User, utcnow

log = logging.getLogger("service.auth")

TOKEN_PREFIX = "lbg_"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def get_or_create_team(session: Session, name: str) -> Team:
    team = session.scalar(select(Team).where(Team.name == name))
    if team is None:
        team = Team(name=name)
        session.add(team)
        session.flush()
    return team


def create_user(
    session: Session,
    *,
    name: str,
    team: str = "default",
    is_admin: bool = False,
    max_running_jobs: int | None = None,
    max_gpus: float | None = None,
) -> User:
    if session.scalar(select(User).where(User.name == name)) is not None:
        from service.jobs import JobError

        raise JobError(f"user {name!r} already exists", status=409)
    user = User(
        name=name,
        team_id=get_or_create_team(session, team).id,
        is_admin=is_admin,
        max_running_jobs=max_running_jobs,
        max_gpus=max_gpus,
    )
    session.add(user)
    session.flush()
    session.refresh(user)
    return user


def issue_token(
    session: Session, user: User, *, label: str = "cli", token: str | None = None
) -> tuple[ApiToken, str]:
    """A new token for `user`; returns the row and the clear token (to show once)."""
    token = token or new_token()
    row = ApiToken(user_id=user.id, token_hash=hash_token(token), prefix=token[:10], label=label)
    session.add(row)
    session.flush()
    return row, token


def authenticate(session: Session, token: str) -> User | None:
    """The user a bearer token belongs to, or None. The lookup is by hash (an index), so timing does
    not reveal how much of a guessed token matched; compare_digest guards the final check."""
    digest = hash_token(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == digest, ApiToken.revoked_at.is_(None)))
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    return row.user


_TOUCHED: dict[str, float] = {}
_TOUCH_EVERY_S = 300.0


def touch_token(session: Session, token: str) -> bool:
    """Record that the token was used, at most every 5 minutes per token and process: `last_used_at`
    tells an admin which tokens are alive without a write on every request."""
    digest = hash_token(token)
    now = time.monotonic()
    if now - _TOUCHED.get(digest, -_TOUCH_EVERY_S) < _TOUCH_EVERY_S:
        return False
    _TOUCHED[digest] = now
    session.execute(update(ApiToken).where(ApiToken.token_hash == digest).values(last_used_at=utcnow()))
    return True


def revoke_token(session: Session, user: User, token_id: int) -> bool:
    row = session.get(ApiToken, token_id)
    if row is None or (row.user_id != user.id and not user.is_admin) or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    return True


def ensure_admin(session: Session, token: str) -> User | None:
    """Bootstrap: an admin user `admin` owning `token` (LBGAT_ADMIN_TOKEN), created once.

    A revoked bootstrap token stays revoked: revoking is how an admin retires a leaked token, and a
    restart must not bring it back. The service still starts (None is returned, a warning logged) and
    the token keeps getting 401; a new LBGAT_ADMIN_TOKEN value becomes a new token of `admin`.
    """
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(token)))
    if row is not None:
        if row.revoked_at is None:
            return row.user
        log.warning(
            "LBGAT_ADMIN_TOKEN is revoked (token %d, %s..., revoked %s): it stays revoked and gets 401; "
            "replace LBGAT_ADMIN_TOKEN with a new secret (a new admin token) or unset it",
            row.id,
            row.prefix,
            row.revoked_at.isoformat(timespec="seconds"),
        )
        return None
    admin = session.scalar(select(User).where(User.name == "admin"))
    if admin is None:
        admin = create_user(session, name="admin", team="default", is_admin=True)
    issue_token(session, admin, label="bootstrap", token=token)
    return admin
