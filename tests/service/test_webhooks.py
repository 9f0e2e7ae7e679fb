"""Webhooks against the real API (uvicorn, SQLite and PostgreSQL) and a real HTTP receiver on 127.0.0.1.

The receiver answers each event's first request with 500 and later ones with 200: the event comes
again after the backoff, with the same delivery id and a valid signature, and then never again.
A receiver that never answers is given up on after the attempts, without holding up state changes.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from sqlalchemy import select

from api_schemas.jobs import JobState
from service import webhooks
from service.db.engine import run_tx
from service.db.models import Experiment, WebhookDelivery, utcnow
from service.jobs import transition
from tests.service.conftest import Api, Person, digits_spec


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    url: str
    requests: list[Received] = field(default_factory=list)
    hang: threading.Event = field(default_factory=threading.Event)  # set: /slow returns

    def on(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]


@contextmanager
def receiver() -> Iterator[Receiver]:
    """An HTTP server on 127.0.0.1: each delivery's first POST gets 500, its later ones 200; /slow
    never answers before the test ends."""
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            delivery = self.headers.get("X-Lbgat-Delivery")
            first = not any(r.headers.get("X-Lbgat-Delivery") == delivery for r in state.on(self.path))
            state.requests.append(Received(self.path, dict(self.headers), body, time.monotonic()))
            if self.path == "/slow":
                state.hang.wait(10)
            self.send_response(500 if first else 200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        state.hang.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def wait_for(predicate: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def submit(person: Person) -> str:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec("hooked")})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def move(api: Api, exp_id: str, *states: JobState, reason: str = "test", **fields: Any) -> float:
    """Move the job as the scheduler would (`fields` with the last change); returns how long the
    transaction took (seconds)."""

    flag = fields.pop("flag", False)  # the scheduler asked the attempt to make way

    def go(session: Any) -> None:
        exp = session.get(Experiment, exp_id)
        if flag:
            exp.preempt_requested_at = utcnow()
            session.flush()
        for i, state in enumerate(states):
            extra = {"started_at": utcnow()} if state is JobState.running else {}
            if i == len(states) - 1:
                extra.update(fields)  # as the scheduler passes `error` with the change
            assert transition(session, exp, state, reason=reason, **extra)

    started = time.monotonic()
    run_tx(api.sessions, go)
    return time.monotonic() - started


def deliveries(api: Api, webhook_id: int) -> list[WebhookDelivery]:
    with api.sessions() as session:
        rows = list(
            session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.webhook_id == webhook_id)
                .order_by(WebhookDelivery.id)
            )
        )
        session.expunge_all()
        return rows


FAST = {
    "webhook_backoff_s": 0.3,
    "webhook_poll_interval_s": 0.05,
    "webhook_timeout_s": 0.5,
    "webhook_max_attempts": 3,
}


def test_events_are_signed_retried_with_backoff_and_delivered_once(make_api: Any) -> None:
    api: Api = make_api(**FAST)
    alice = api.person()
    bob = api.person(alice.team)
    with receiver() as rx:
        mine = alice.http.post(
            "/v1/webhooks", json={"url": rx.url + "/alice", "events": ["job.succeeded", "job.preempted"]}
        )
        assert mine.status_code == 201, mine.text
        team = bob.http.post(
            "/v1/webhooks", json={"url": rx.url + "/team", "scope": "team", "events": ["job.failed"]}
        )
        assert team.status_code == 201, team.text
        secret, team_secret = mine.json()["secret"], team.json()["secret"]
        assert secret.startswith("whsec_") and team.json()["team"] == alice.team

        ok, failed, preempted = submit(alice), submit(alice), submit(alice)
        move(api, ok, JobState.dispatching, JobState.running, JobState.succeeded)
        move(api, failed, JobState.dispatching, JobState.running, JobState.failed, error="boom")
        move(api, preempted, JobState.dispatching, JobState.running)
        move(api, preempted, JobState.retrying, reason="preempted by z", preempt_requested_at=None, flag=True)

        wait_for(lambda: len(rx.on("/alice")) >= 4 and len(rx.on("/team")) >= 2)
        time.sleep(3 * FAST["webhook_backoff_s"])  # nothing more comes
        assert len(rx.on("/alice")) == 4 and len(rx.on("/team")) == 2

        by_event: dict[str, list[Received]] = {}
        for r in rx.requests:
            by_event.setdefault(r.headers["X-Lbgat-Event"], []).append(r)
        assert sorted(by_event) == ["job.failed", "job.preempted", "job.succeeded"]
        for event, got in by_event.items():
            key = team_secret if event == "job.failed" else secret
            first, second = got
            assert first.headers["X-Lbgat-Delivery"] == second.headers["X-Lbgat-Delivery"]
            assert second.at - first.at >= FAST["webhook_backoff_s"] * 0.9  # the backoff
            for r in got:
                assert r.headers["Content-Type"] == "application/json"
                assert r.headers["X-Lbgat-Signature"] == webhooks.sign(
                    key, r.headers["X-Lbgat-Timestamp"], r.body
                )
                assert webhooks.verify(
                    key, r.headers["X-Lbgat-Timestamp"], r.body, r.headers["X-Lbgat-Signature"]
                )
                assert not webhooks.verify(
                    "whsec_other", r.headers["X-Lbgat-Timestamp"], r.body, r.headers["X-Lbgat-Signature"]
                )
        job = json.loads(by_event["job.succeeded"][1].body)["job"]
        assert (job["id"], job["state"], job["owner"], job["team"]) == (
            ok,
            "succeeded",
            alice.name,
            alice.team,
        )
        failure = json.loads(by_event["job.failed"][1].body)["job"]
        assert (failure["id"], failure["error"]) == (failed, "boom")
        assert json.loads(by_event["job.preempted"][1].body)["job"]["reason"] == "preempted by z"

        rows = deliveries(api, mine.json()["id"])
        assert [(d.event, d.attempts) for d in rows] == [("job.succeeded", 2), ("job.preempted", 2)]
        assert all(d.delivered_at is not None and d.failed_at is None and d.last_error is None for d in rows)


def test_a_dead_receiver_is_given_up_on_and_blocks_nothing(make_api: Any) -> None:
    """State changes only queue the event (no network inside the transaction): a job's request can
    reach the receiver only after its state change has returned, even while the sender is stuck on a
    receiver that never answers; the API answers meanwhile. An ordering check, not a stopwatch."""
    api: Api = make_api(**{**FAST, "webhook_max_attempts": 2})
    alice = api.person()
    with receiver() as rx:
        hook = alice.http.post(
            "/v1/webhooks", json={"url": rx.url + "/slow", "events": ["job.succeeded"]}
        ).json()
        jobs = [submit(alice) for _ in range(3)]
        returned: dict[str, float] = {}
        for exp_id in jobs:
            move(api, exp_id, JobState.dispatching, JobState.running, JobState.succeeded)
            returned[exp_id] = time.monotonic()
        wait_for(lambda: len(rx.on("/slow")) >= 1)  # the sender is waiting on the receiver now
        r = alice.http.get("/v1/experiments")
        assert r.status_code == 200 and {e["id"] for e in r.json()["items"]} >= set(jobs)
        wait_for(lambda: all(d.failed_at is not None for d in deliveries(api, hook["id"])), timeout=30)
        for request in rx.on("/slow"):
            job = json.loads(request.body)["job"]["id"]
            assert request.at > returned[job], "a request was sent inside the state change"
        rows = deliveries(api, hook["id"])
        assert len(rows) == 3 and {d.attempts for d in rows} == {2}
        assert all("Timeout" in (d.last_error or "") for d in rows)
        assert len(rx.on("/slow")) == 6  # each delivery tried twice, then given up on


def test_webhook_routes_validate_scope_and_ownership(api: Api) -> None:
    alice = api.person()
    bob = api.person(alice.team)
    stranger = api.person()
    for body in (
        {"url": "ftp://example.org/x"},
        {"url": "http://"},
        {"url": "http://user:pw@example.org/"},
        {"url": "http://example.org:99999/"},
        {"url": "https://example.org/", "events": ["job.exploded"]},
        {"url": "https://example.org/", "events": []},
        {"url": "https://example.org/", "team": alice.team},  # a user webhook names no team
    ):
        r = alice.http.post("/v1/webhooks", json=body)
        assert r.status_code == 422, (body, r.text)
    r = alice.http.post(
        "/v1/webhooks", json={"url": "https://example.org/", "scope": "team", "team": stranger.team}
    )
    assert r.status_code == 403
    r = api.admin.http.post(
        "/v1/webhooks", json={"url": "https://example.org/", "scope": "team", "team": "nope-x"}
    )
    assert r.status_code == 404

    created = alice.http.post("/v1/webhooks", json={"url": "https://example.org/a", "scope": "team"}).json()
    own = bob.http.post("/v1/webhooks", json={"url": "https://example.org/b"}).json()
    listed = {h["id"]: h for h in alice.http.get("/v1/webhooks").json()}
    assert created["id"] in listed and own["id"] not in listed  # bob's own hook is his
    assert "secret" not in listed[created["id"]] and listed[created["id"]]["created_by"] == alice.name
    assert created["id"] not in {h["id"] for h in stranger.http.get("/v1/webhooks").json()}
    assert stranger.http.delete(f"/v1/webhooks/{created['id']}").status_code == 404
    assert bob.http.delete(f"/v1/webhooks/{created['id']}").status_code == 403
    assert alice.http.delete(f"/v1/webhooks/{created['id']}").status_code == 204
    assert alice.http.delete(f"/v1/webhooks/{created['id']}").status_code == 404


def test_destinations_follow_the_allow_list_and_private_setting() -> None:
    from service.settings import ServiceSettings

    def settings(**values: Any) -> ServiceSettings:
        return ServiceSettings(_env_file=None, **values)  # type: ignore[call-arg]

    webhooks.check_destination("http://127.0.0.1:8080/x", settings())  # the default: a lab network
    with pytest.raises(webhooks.DestinationRefused, match="non-public"):
        webhooks.check_destination("http://127.0.0.1:8080/x", settings(webhook_allow_private=False))
    with pytest.raises(webhooks.DestinationRefused, match="non-public"):
        webhooks.check_destination("http://10.1.2.3/x", settings(webhook_allow_private=False))
    allow = settings(webhook_allowed_hosts=["hooks.example.org"])
    webhooks.check_destination("https://a.hooks.example.org/x", allow, resolve=False)
    with pytest.raises(webhooks.DestinationRefused, match="ALLOWED_HOSTS"):
        webhooks.check_destination("https://evil.example.org/x", allow)


def test_the_signature_is_hmac_of_timestamp_and_body() -> None:
    import hashlib
    import hmac

    body = b'{"event":"job.succeeded"}'
    expected = hmac.new(b"s3cret", b"1700000000." + body, hashlib.sha256).hexdigest()
    assert webhooks.sign("s3cret", "1700000000", body) == "sha256=" + expected
    assert webhooks.verify("s3cret", "1700000000", body, "sha256=" + expected, now=1700000100)
    assert not webhooks.verify("s3cret", "1700000000", body, "sha256=" + expected, now=1700001000)  # stale


def test_a_dead_receiver_holds_up_no_other_receiver(make_api: Any) -> None:
    """Requests go out side by side: while the sender waits on a receiver that does not answer (a
    30 s timeout; /slow answers only after 10 s), another webhook's event is delivered, retry
    included, and the dead one's first attempt is still open."""
    api: Api = make_api(**{**FAST, "webhook_timeout_s": 30.0})
    alice = api.person()
    bob = api.person()
    with receiver() as rx:
        dead = alice.http.post("/v1/webhooks", json={"url": rx.url + "/slow", "events": ["job.succeeded"]})
        live = bob.http.post("/v1/webhooks", json={"url": rx.url + "/bob", "events": ["job.succeeded"]})
        assert dead.status_code == live.status_code == 201
        first, second = submit(alice), submit(bob)
        move(api, first, JobState.dispatching, JobState.running, JobState.succeeded)
        wait_for(lambda: len(rx.on("/slow")) == 1)  # the dead receiver holds a request now
        move(api, second, JobState.dispatching, JobState.running, JobState.succeeded)
        wait_for(lambda: deliveries(api, live.json()["id"])[0].delivered_at is not None, timeout=8)
        (stuck,) = deliveries(api, dead.json()["id"])
        assert (stuck.attempts, stuck.last_error, stuck.delivered_at, stuck.failed_at) == (
            1,
            None,
            None,
            None,
        )
        assert len(rx.on("/bob")) == 2  # a 500, then the retry's 200


def test_ended_deliveries_are_pruned_after_the_retention(api: Api) -> None:
    from datetime import timedelta

    from service.settings import ServiceSettings

    alice = api.person()
    hook = alice.http.post("/v1/webhooks", json={"url": "http://127.0.0.1:9/x", "events": ["job.failed"]})
    assert hook.status_code == 201, hook.text
    hook_id, now = hook.json()["id"], utcnow()
    old, recent = now - timedelta(days=31), now - timedelta(days=29)
    rows = {
        "old delivered": {"delivered_at": old},
        "old given up": {"failed_at": old, "last_error": "HTTP 500"},
        "recent delivered": {"delivered_at": recent},
        "old pending": {"next_attempt_at": now + timedelta(hours=1), "created_at": old},
    }
    with api.sessions() as session:
        for name, fields in rows.items():
            session.add(
                WebhookDelivery(webhook_id=hook_id, event="job.failed", payload={"n": name}, **fields)
            )
        session.commit()
    settings = ServiceSettings(_env_file=None, webhook_retention_days=30)  # type: ignore[call-arg]
    sender = webhooks.WebhookSender(sessions=api.sessions, settings=settings)
    assert sender.prune(now) == 2
    assert sorted(d.payload["n"] for d in deliveries(api, hook_id)) == ["old pending", "recent delivered"]
    assert sender.prune(now) == 0
