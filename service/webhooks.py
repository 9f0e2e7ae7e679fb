"""Webhooks: events of a user's or a team's jobs POSTed to a URL, signed, retried, never in the way.

Queueing: `service.jobs.transition` calls `event_for` before it applies a state change and
`enqueue_job_event` after, so a `WebhookDelivery` row per matching webhook (the job owner's, the job's
team's) is written in the same transaction as the change: an event is queued if and only if the
change happened. The events: job.succeeded (a training job), evaluation.succeeded, job.failed (either
kind, finally failed), job.preempted (the attempt made way for another job; it goes back to the
queue), and budget.warning (a team's budget reached LBGAT_BUDGET_WARNING_FRACTION; to team webhooks,
once per period).

Sending: `WebhookSender` is a thread of its own, started and stopped with the app, so a slow or dead
receiver never holds up the scheduler or a request; it sends up to `webhook_concurrency` requests at
once, so a dead receiver holds one of them, not everyone else's events. Each pass claims the due rows with a conditional
UPDATE on their attempt counter (two replicas never both send one attempt; a claim is a lease of
`webhook_timeout_s` plus a margin, after which another replica may try again), then POSTs the
payload's JSON with

    X-Lbgat-Event: job.succeeded
    X-Lbgat-Delivery: <delivery id>       (the same on every retry: receivers deduplicate on it)
    X-Lbgat-Timestamp: <unix seconds>
    X-Lbgat-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>

A 2xx answer delivers it; anything else (another status, a timeout, a refused connection) is tried
again after `webhook_backoff_s * 2**(attempt-1)` (at most `webhook_backoff_max_s`), and given up
(`failed_at`) after `webhook_max_attempts` attempts. Redirects are not followed. Delivered and
given-up rows are deleted `webhook_retention_days` after they ended (checked once an hour), so the
table holds what is pending plus a month of history.

SSRF: URLs are http(s) only. LBGAT_WEBHOOK_ALLOWED_HOSTS (host names; `example.org` also allows its
subdomains) limits where requests go; LBGAT_WEBHOOK_ALLOW_PRIVATE=false refuses hosts that resolve to
loopback, private, link-local or reserved addresses, at creation and again before every request. The
default allows them: a lab cluster's receivers usually live on its own network.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from api_schemas.jobs import JobState
from service.db.engine import run_tx
from service.db.models import Experiment, User, Webhook, WebhookDelivery, utcnow
from service.settings import ServiceSettings
from service.text import one_line

if TYPE_CHECKING:
    from service.accounting import BudgetState

log = logging.getLogger("service.webhooks")

SIGNATURE_HEADER = "X-Lbgat-Signature"
MAX_ERROR_CHARS = 300
#: how often the sender deletes old deliveries (seconds)
PRUNE_EVERY_S = 3600.0


# -- signing -----------------------------------------------------------------------------------------


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-Lbgat-Signature value of `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(
    secret: str,
    timestamp: str,
    body: bytes,
    signature: str,
    *,
    tolerance_s: float = 300,
    now: float | None = None,
) -> bool:
    """What a receiver checks: the signature matches and the timestamp is recent (replays)."""
    try:
        age = abs((now if now is not None else time.time()) - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance_s and hmac.compare_digest(sign(secret, timestamp, body), signature)


# -- where requests may go ---------------------------------------------------------------------------


class DestinationRefused(ValueError):
    """The URL's host is not one this service may send to (allow-list, private addresses)."""


def check_destination(url: str, settings: ServiceSettings, *, resolve: bool = True) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DestinationRefused("only http and https URLs with a host")
    host = parts.hostname.lower()
    allowed = [h.lower().lstrip(".") for h in settings.webhook_allowed_hosts]
    if allowed and not any(host == h or host.endswith("." + h) for h in allowed):
        raise DestinationRefused(f"host {host} is not in LBGAT_WEBHOOK_ALLOWED_HOSTS")
    if settings.webhook_allow_private or not resolve:
        return
    try:
        infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
    except (socket.gaierror, UnicodeError) as exc:
        raise DestinationRefused(f"host {host} does not resolve ({exc})") from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0].split("%")[0])
        if not address.is_global or address.is_multicast:
            raise DestinationRefused(
                f"host {host} resolves to a non-public address ({address}); LBGAT_WEBHOOK_ALLOW_PRIVATE is off"
            )


# -- queueing ----------------------------------------------------------------------------------------


def event_for(exp: Experiment, old: JobState, new: JobState, reason: str | None) -> str | None:
    """The webhook event of a state change (read before it is applied), if it has one."""
    if new is JobState.succeeded:
        return "evaluation.succeeded" if exp.kind == "evaluation" else "job.succeeded"
    if new is JobState.failed:
        return "job.failed"
    if (
        old.active
        and new in (JobState.queued, JobState.retrying)
        and (exp.preempt_requested_at is not None or (reason or "").startswith("preempted"))
    ):
        return "job.preempted"
    return None


def _enqueue(session: Session, hooks: list[Webhook], event: str, payload: dict[str, Any]) -> int:
    now = utcnow()
    n = 0
    for hook in hooks:
        if event not in (hook.events or []):
            continue
        session.add(
            WebhookDelivery(
                webhook_id=hook.id,
                event=event,
                payload=payload,
                attempts=0,
                next_attempt_at=now,
                created_at=now,
            )
        )
        n += 1
    return n


def enqueue_job_event(session: Session, exp: Experiment, event: str, reason: str | None) -> int:
    """Queue `event` of `exp` (its new state already applied) for its owner's and team's webhooks."""
    hooks = list(
        session.scalars(
            select(Webhook).where(
                Webhook.active.is_(True),
                or_(Webhook.user_id == exp.owner_id, Webhook.team_id == exp.team_id),
            )
        )
    )
    if not hooks:
        return 0
    results = {
        key: exp.results.get(key)
        for key in ("clean_accuracy", "robust_accuracy", "autoattack_accuracy", "nrr")
        if isinstance(exp.results, dict) and exp.results.get(key) is not None
    }
    job = {
        "id": exp.id,
        "kind": exp.kind,
        "name": exp.name,
        "owner": exp.owner.name,
        "team": exp.team.name,
        "method": exp.method,
        "dataset": exp.dataset,
        "state": exp.state,
        "reason": reason,
        "attempts": exp.attempts,
        "error": exp.error,
        "preempted_by": exp.preempted_by,
        "results": results or None,
    }
    payload = {"event": event, "at": utcnow().isoformat(), "job": job}
    return _enqueue(session, hooks, event, payload)


def enqueue_budget_warning(session: Session, state: BudgetState) -> int:
    """Queue `budget.warning` for the team's webhooks that have not had one this period."""
    hooks = list(
        session.scalars(select(Webhook).where(Webhook.active.is_(True), Webhook.team_id == state.team_id))
    )
    hooks = [h for h in hooks if "budget.warning" in (h.events or [])]
    if not hooks:
        return 0
    sent = set(
        session.scalars(
            select(WebhookDelivery.webhook_id).where(
                WebhookDelivery.webhook_id.in_([h.id for h in hooks]),
                WebhookDelivery.event == "budget.warning",
                WebhookDelivery.created_at >= state.period_start,
            )
        )
    )
    hooks = [h for h in hooks if h.id not in sent]
    payload = {
        "event": "budget.warning",
        "at": utcnow().isoformat(),
        "budget": {
            "team": state.team,
            "period": state.period,
            "period_start": state.period_start.isoformat(),
            "period_end": state.period_end.isoformat(),
            "gpu_hours": state.budget,
            "used_gpu_hours": round(state.used, 6),
            "fraction": round(state.fraction, 6),
            "action": state.action,
            "exceeded": state.exceeded,
        },
    }
    return _enqueue(session, hooks, "budget.warning", payload)


# -- sending -----------------------------------------------------------------------------------------


def backoff_s(attempts: int, settings: ServiceSettings) -> float:
    """Pause after the `attempts`-th failed attempt (1, 2, ...): exponential, capped."""
    return min(settings.webhook_backoff_max_s, settings.webhook_backoff_s * 2 ** max(0, attempts - 1))


class WebhookSender:
    """The background thread that delivers queued events (see the module docstring). The thread
    only claims and hands requests to a pool of `webhook_concurrency` threads; it never waits on a
    receiver, so an event that comes while a dead receiver holds one request goes out at once."""

    def __init__(self, *, sessions: sessionmaker[Session], settings: ServiceSettings) -> None:
        self.sessions = sessions
        self.settings = settings
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._http: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: set[Future[bool]] = set()
        self._pruned_at = float("-inf")

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._pool = ThreadPoolExecutor(self.settings.webhook_concurrency, thread_name_prefix="lbgat-hook")
        self._thread = threading.Thread(target=self._loop, name="lbgat-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout if timeout is not None else self.settings.webhook_timeout_s + 5)
            self._thread = None
        if self._pool is not None:  # requests in flight end by their timeout; their claims lapse
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        if self._http is not None:
            self._http.close()
            self._http = None

    def wake(self) -> None:
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.dispatch()
                if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                    self.prune()
                    self._pruned_at = time.monotonic()
            except Exception:  # a bad pass must not end the deliveries; the next one retries
                log.exception("webhook delivery pass failed")
            self._wake.wait(self.settings.webhook_poll_interval_s)
            self._wake.clear()

    def _done(self, future: Future[bool]) -> None:
        self._in_flight.discard(future)
        self._wake.set()  # a free slot: look for more at once

    def dispatch(self) -> int:
        """Claim as many due deliveries as there are free request slots and start sending them;
        returns how many were started."""
        assert self._pool is not None, "start() first"
        free = self.settings.webhook_concurrency - len(self._in_flight)
        if free <= 0:
            return 0
        claimed = self.claim(limit=free)
        for delivery_id, attempt in claimed:
            future = self._pool.submit(self.send, delivery_id, attempt)
            self._in_flight.add(future)
            future.add_done_callback(self._done)
        return len(claimed)

    def _client(self) -> Any:
        if self._http is None:
            import httpx

            self._http = httpx.Client(
                timeout=self.settings.webhook_timeout_s,
                follow_redirects=False,
                trust_env=False,
                limits=httpx.Limits(max_connections=self.settings.webhook_concurrency),
            )
        return self._http

    def claim(self, now: datetime | None = None, *, limit: int = 50) -> list[tuple[int, int]]:
        """Claim up to `limit` due deliveries: [(id, attempt number)]. Conditional on the attempt
        counter, so a row another replica claimed meanwhile is skipped. A claim is a lease: each
        claimed request starts at once and ends within `webhook_timeout_s`."""
        now = now or utcnow()
        lease = now + timedelta(seconds=2 * self.settings.webhook_timeout_s + 10)

        def go(session: Session) -> list[tuple[int, int]]:
            due = session.execute(
                select(WebhookDelivery.id, WebhookDelivery.attempts)
                .where(
                    WebhookDelivery.delivered_at.is_(None),
                    WebhookDelivery.failed_at.is_(None),
                    WebhookDelivery.next_attempt_at <= now,
                )
                .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
                .limit(limit)
            ).all()
            claimed = []
            for delivery_id, attempts in due:
                result = session.execute(
                    update(WebhookDelivery)
                    .where(
                        WebhookDelivery.id == delivery_id,
                        WebhookDelivery.attempts == attempts,
                        WebhookDelivery.delivered_at.is_(None),
                        WebhookDelivery.failed_at.is_(None),
                    )
                    .values(attempts=attempts + 1, next_attempt_at=lease)
                    .execution_options(synchronize_session=False)
                )
                if result.rowcount == 1:
                    claimed.append((delivery_id, attempts + 1))
            return claimed

        return run_tx(self.sessions, go)

    def prune(self, now: datetime | None = None) -> int:
        """Delete deliveries that ended (delivered or given up) more than `webhook_retention_days`
        ago; returns how many."""
        cutoff = (now or utcnow()) - timedelta(days=self.settings.webhook_retention_days)

        def go(session: Session) -> int:
            result = session.execute(
                delete(WebhookDelivery)
                .where(or_(WebhookDelivery.delivered_at < cutoff, WebhookDelivery.failed_at < cutoff))
                .execution_options(synchronize_session=False)
            )
            return result.rowcount or 0

        removed = run_tx(self.sessions, go)
        if removed:
            log.info("webhooks: deleted %d deliveries that ended before %s", removed, cutoff)
        return removed

    def send(self, delivery_id: int, attempt: int) -> bool:
        with self.sessions() as session:
            row = session.execute(
                select(
                    WebhookDelivery.event,
                    WebhookDelivery.payload,
                    Webhook.url,
                    Webhook.secret,
                    Webhook.active,
                )
                .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
                .where(WebhookDelivery.id == delivery_id)
            ).first()
        if row is None:
            return False  # its webhook was deleted meanwhile (the delivery with it)
        event, payload, url, secret, active = row
        error: str | None = None
        if not active:
            error = "the webhook is inactive"
        else:
            body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
            timestamp = str(int(time.time()))
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "lbgat-webhooks/1",
                "X-Lbgat-Event": event,
                "X-Lbgat-Delivery": str(delivery_id),
                "X-Lbgat-Timestamp": timestamp,
                SIGNATURE_HEADER: sign(secret, timestamp, body),
            }
            try:
                check_destination(url, self.settings)
                response = self._client().post(url, content=body, headers=headers)
                if not 200 <= response.status_code < 300:
                    error = f"HTTP {response.status_code}"
            except DestinationRefused as exc:
                error = f"refused: {exc}"
            except Exception as exc:  # httpx's transport errors, and anything else a request raises
                error = f"{type(exc).__name__}: {exc}"
        self._record(delivery_id, attempt, error)
        return error is None

    def _record(self, delivery_id: int, attempt: int, error: str | None) -> None:
        now = utcnow()
        if error is None:
            values: dict[str, Any] = {"delivered_at": now, "last_error": None}
        elif attempt >= self.settings.webhook_max_attempts:
            values = {"failed_at": now, "last_error": one_line(error, MAX_ERROR_CHARS)}
            log.warning("webhook delivery %d given up after %d attempts: %s", delivery_id, attempt, error)
        else:
            values = {
                "next_attempt_at": now + timedelta(seconds=backoff_s(attempt, self.settings)),
                "last_error": one_line(error, MAX_ERROR_CHARS),
            }
            log.info("webhook delivery %d attempt %d failed (%s); retrying", delivery_id, attempt, error)

        def go(session: Session) -> None:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempt)
                .values(**values)
                .execution_options(synchronize_session=False)
            )

        run_tx(self.sessions, go)


# -- the API's side ----------------------------------------------------------------------------------


def webhook_scope(hook: Webhook) -> str:
    return "team" if hook.team_id is not None else "user"


def visible_webhooks(session: Session, viewer: User) -> list[Webhook]:
    query = select(Webhook).order_by(Webhook.id)
    if not viewer.is_admin:
        query = query.where(or_(Webhook.user_id == viewer.id, Webhook.team_id == viewer.team_id))
    return list(session.scalars(query))
