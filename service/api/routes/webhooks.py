"""Webhooks: URLs told about a user's or a team's jobs (service.webhooks sends them, signed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from api_schemas.accounting import CreatedWebhook, WebhookCreate, WebhookOut
from api_schemas.jobs import DB_INT_MAX
from service import webhooks
from service.api.deps import CurrentUser, SessionDep, SessionsDep, SettingsDep
from service.api.responses import errors
from service.db.engine import run_tx
from service.db.models import Team, User, Webhook
from service.jobs import JobError

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

WebhookId = Annotated[int, Path(ge=1, le=DB_INT_MAX, description="the id `POST /v1/webhooks` answered")]


def webhook_out(session: Session, hook: Webhook) -> WebhookOut:
    user = session.get(User, hook.user_id) if hook.user_id is not None else None
    team = session.get(Team, hook.team_id) if hook.team_id is not None else None
    creator = session.get(User, hook.created_by)
    return WebhookOut(
        id=hook.id,
        url=hook.url,
        scope=webhooks.webhook_scope(hook),  # type: ignore[arg-type]
        user=user.name if user else None,
        team=team.name if team else None,
        events=list(hook.events or []),
        active=hook.active,
        created_by=creator.name if creator else "?",
        created_at=hook.created_at,
    )


@router.post(
    "",
    response_model=CreatedWebhook,
    status_code=status.HTTP_201_CREATED,
    summary="Add a webhook for your jobs or your team's (the answer holds its secret, shown once)",
    responses=errors(
        400,
        401,
        403,
        404,
        422,
        descriptions={
            400: "the body is not readable JSON (not UTF-8, or nested too deep)",
            403: "a team webhook for another team (admins only)",
            404: "no such team",
            422: "invalid body, or a host this service may not send to "
            "(LBGAT_WEBHOOK_ALLOWED_HOSTS, LBGAT_WEBHOOK_ALLOW_PRIVATE)",
        },
    ),
)
def create_webhook(
    body: WebhookCreate, current_user: CurrentUser, sessions: SessionsDep, settings: SettingsDep
) -> CreatedWebhook:
    """A user webhook hears about the caller's own jobs; a team webhook about every job of the team and
    its budget warnings. Any member may add a team webhook for their own team (members see the team's
    jobs anyway); only an admin for another team. The secret signs every request."""
    try:
        webhooks.check_destination(body.url, settings)
    except webhooks.DestinationRefused as exc:
        error = JobError(f"invalid request: body.url: {exc}", status=422)
        error.errors = [{"loc": "body.url", "msg": str(exc), "type": "value_error"}]  # type: ignore[attr-defined]
        raise error from None
    if body.scope == "user" and body.team is not None:
        error = JobError("invalid request: body.team: only a team webhook names a team", status=422)
        error.errors = [{"loc": "body.team", "msg": "only scope=team names a team", "type": "value_error"}]  # type: ignore[attr-defined]
        raise error

    def create(session: Session) -> CreatedWebhook:
        user_id = team_id = None
        if body.scope == "user":
            user_id = current_user.id
        else:
            name = body.team or current_user.team.name
            if name != current_user.team.name and not current_user.is_admin:
                raise JobError(
                    f"only an admin may add a webhook for team {name} (yours is {current_user.team.name})",
                    403,
                )
            team = session.scalar(select(Team).where(Team.name == name))
            if team is None:
                raise JobError(f"team {name!r} not found", status=404)
            team_id = team.id
        secret = webhooks.new_secret()
        events = [e for e in dict.fromkeys(body.events)]
        hook = Webhook(
            user_id=user_id,
            team_id=team_id,
            created_by=current_user.id,
            url=body.url,
            secret=secret,
            events=events,
            active=True,
        )
        session.add(hook)
        session.flush()
        return CreatedWebhook(**webhook_out(session, hook).model_dump(), secret=secret)

    return run_tx(sessions, create)


@router.get(
    "",
    response_model=list[WebhookOut],
    summary="Your webhooks and your team's (every one for an admin); secrets are never shown again",
    responses=errors(401, 422),
)
def read_webhooks(current_user: CurrentUser, session: SessionDep) -> list[WebhookOut]:
    return [webhook_out(session, hook) for hook in webhooks.visible_webhooks(session, current_user)]


@router.delete(
    "/{webhook_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="Remove a webhook (its creator, or an admin); its pending deliveries go with it",
    responses=errors(
        401,
        403,
        404,
        422,
        descriptions={403: "not its creator (nor an admin)", 404: "no such webhook visible to you"},
    ),
)
def delete_webhook(webhook_id: WebhookId, current_user: CurrentUser, sessions: SessionsDep) -> Response:
    def remove(session: Session) -> None:
        hook = session.get(Webhook, webhook_id)
        visible = hook is not None and (
            current_user.is_admin or hook.user_id == current_user.id or hook.team_id == current_user.team_id
        )
        if not visible:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"webhook {webhook_id} not found")
        if not current_user.is_admin and hook.created_by != current_user.id:
            raise JobError(
                f"webhook {webhook_id} was added by someone else; only they or an admin may remove it", 403
            )
        session.delete(hook)

    run_tx(sessions, remove)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
