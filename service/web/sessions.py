"""Page sessions: sign in with an API token, get a session of your own; CSRF tokens for the forms.

A session is an `ApiToken` row labelled `web-session` (only the SHA-256 of its token is stored, as
for every token), so revoking it (signing out, or an admin revoking the user's tokens) ends it
everywhere, and no table or migration of its own is needed. Its token lives only in an HttpOnly,
SameSite=Strict cookie and starts with `lbgs_`: the API refuses it as a bearer token, and the pages
accept nothing else as a session, so an API token never sits in a browser cookie and a cookie never
works as an API token.

Every form carries a CSRF token, the HMAC-SHA256 of the session token (keyed with LBGAT_WEB_SECRET
when set). A POST without the right one is refused with 403. The sign-in form has no session yet: it
is tied the same way to a random `lbgat_signin` cookie set with the form (double submit).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

from fastapi import Request, Response
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from service import auth
from service.db.models import ApiToken, User, utcnow
from service.settings import ServiceSettings

SESSION_LABEL = "web-session"
SESSION_PREFIX = "lbgs_"
SESSION_COOKIE = "lbgat_session"
SIGNIN_COOKIE = "lbgat_signin"
CSRF_FIELD = "csrf"


def is_session_token(token: str) -> bool:
    return token.startswith(SESSION_PREFIX)


@dataclass(frozen=True)
class WebSession:
    """A signed-in browser: its user (detached, team loaded), its token row and the forms' CSRF token."""

    user: User
    token_id: int
    csrf: str


def _key(settings: ServiceSettings) -> bytes:
    return settings.web_secret.get_secret_value().encode() if settings.web_secret is not None else b""


def csrf_token(settings: ServiceSettings, secret: str) -> str:
    """The CSRF token of a session (or of a sign-in form's nonce): unguessable without the cookie."""
    return hmac.new(_key(settings) + b"|csrf|", secret.encode(), hashlib.sha256).hexdigest()


def csrf_ok(settings: ServiceSettings, secret: str | None, sent: str | None) -> bool:
    if not secret or not sent:
        return False
    return hmac.compare_digest(csrf_token(settings, secret), sent)


def start_session(session: Session, user: User) -> str:
    """A new session row for `user`; returns the session token (for the cookie, never shown)."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    auth.issue_token(session, user, label=SESSION_LABEL, token=token)
    return token


def lookup(session: Session, token: str, settings: ServiceSettings) -> tuple[User, ApiToken] | None:
    """The session's user and row, if the token is a live page session (not revoked, not expired)."""
    if not is_session_token(token):
        return None
    digest = auth.hash_token(token)
    row = session.scalar(
        select(ApiToken).where(
            ApiToken.token_hash == digest,
            ApiToken.label == SESSION_LABEL,
            ApiToken.revoked_at.is_(None),
        )
    )
    if row is None or not hmac.compare_digest(row.token_hash, digest):
        return None
    if utcnow() - row.created_at > timedelta(hours=settings.web_session_hours):
        return None
    return row.user, row


def end_session(session: Session, token: str) -> bool:
    """Revoke the session's row (sign out); False when it was not a live session."""
    if not is_session_token(token):
        return False
    result = session.execute(
        update(ApiToken)
        .where(
            ApiToken.token_hash == auth.hash_token(token),
            ApiToken.label == SESSION_LABEL,
            ApiToken.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow())
    )
    return result.rowcount == 1


# -- cookies -----------------------------------------------------------------------------------------


def _secure(request: Request, settings: ServiceSettings) -> bool:
    if settings.web_cookie_secure is not None:
        return settings.web_cookie_secure
    return request.url.scheme == "https"


def set_session_cookie(response: Response, request: Request, settings: ServiceSettings, token: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=int(settings.web_session_hours * 3600),
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
    )


def clear_session_cookie(response: Response, request: Request, settings: ServiceSettings) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path="/", httponly=True, samesite="strict", secure=_secure(request, settings)
    )


def signin_nonce(request: Request) -> tuple[str, bool]:
    """The sign-in form's nonce: the browser's `lbgat_signin` cookie, or a new one (True: set it)."""
    current = request.cookies.get(SIGNIN_COOKIE, "")
    if len(current) >= 32:
        return current, False
    return secrets.token_urlsafe(32), True


def set_signin_cookie(response: Response, request: Request, settings: ServiceSettings, nonce: str) -> None:
    response.set_cookie(
        SIGNIN_COOKIE,
        nonce,
        max_age=3600,
        path="/",
        httponly=True,
        samesite="strict",
        secure=_secure(request, settings),
    )
