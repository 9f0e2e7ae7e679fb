"""The REST API against a real uvicorn server and a real database (SQLite and PostgreSQL).

No scheduler and no Ray here (tests/service/test_scheduler.py and tests/e2e cover them): jobs stay
queued unless a test moves them through the ORM, as the scheduler would.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import func, select

from api_schemas.jobs import JobState
from service.api.deps import get_store
from service.db.engine import run_tx
from service.db.models import Event, Experiment, Trial, utcnow
from service.jobs import transition
from tests.service.conftest import Api, Person, digits_spec
from workers.storage import LocalStore, experiment_prefix


def submit(person: Person, name: str = "digits", **body: Any) -> dict[str, Any]:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name), **body})
    assert r.status_code == 201, r.text
    return r.json()


def count_experiments(api: Api, owner: str | None = None) -> int:
    from service.db.models import User

    with api.sessions() as session:
        query = select(func.count()).select_from(Experiment)
        if owner is not None:
            query = query.join(User, Experiment.owner_id == User.id).where(User.name == owner)
        return session.scalar(query)


def set_state(api: Api, exp_id: str, *path: JobState, **fields: Any) -> None:
    """Move a job along the lifecycle as the scheduler would (checked transitions, recorded events)."""

    def move(session):
        exp = session.get(Experiment, exp_id)
        for state in path:
            assert transition(session, exp, state, reason="test")
        for key, value in fields.items():
            setattr(exp, key, value)

    run_tx(api.sessions, move)


# -- submission --------------------------------------------------------------------------------------


def test_submit_json_and_read_it_back(api: Api) -> None:
    alice = api.person()
    before = utcnow()
    exp = submit(alice, "lbgat-demo", priority=7, max_attempts=3, tags=["paper", "t1"])
    assert exp["id"].startswith("lbgat-demo-") and exp["name"] == "lbgat-demo"
    assert (exp["state"], exp["priority"], exp["max_attempts"], exp["attempts"]) == ("queued", 7, 3, 0)
    assert (exp["method"], exp["dataset"], exp["norm"], exp["eps"]) == ("lbgat", "digits", "linf", 0.1)
    assert (exp["owner"], exp["team"], exp["tags"], exp["is_sweep"]) == (
        alice.name,
        alice.team,
        ["paper", "t1"],
        False,
    )
    assert exp["ray_job_id"] is None and exp["dashboard_url"] is None and exp["finished_at"] is None

    detail = alice.http.get(f"/v1/experiments/{exp['id']}").json()
    assert detail["spec"]["name"] == "lbgat-demo" and detail["spec"]["method"]["alpha"] == 0.0
    assert detail["spec"]["optimization"]["epochs"] == 30  # the resolved spec, as stored
    assert [(h["from_state"], h["to_state"], h["reason"]) for h in detail["history"]] == [
        (None, "queued", "submitted")
    ]
    at = detail["history"][0]["at"]
    assert abs((httpx_datetime(at) - before).total_seconds()) < 60
    assert detail["trials"] == [] and detail["metrics"] == [] and detail["results"] is None
    # no Ray is configured for this service: the job waits, first in line, and says why
    assert detail["queue"]["position"] == 1
    assert "no Ray address configured (LBGAT_RAY_ADDRESS)" in detail["queue"]["reason"]
    assert count_experiments(api, alice.name) == 1


def httpx_datetime(text: str):
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("content_type", ["application/yaml", "application/x-yaml", "text/yaml"])
def test_submit_yaml_upload(api: Api, content_type: str) -> None:
    bob = api.person()
    text = yaml.safe_dump(digits_spec("yaml-upload", alpha=2.5))
    r = bob.http.post(
        "/v1/experiments",
        content=text.encode(),
        params={"priority": -3, "max_attempts": 1, "tags": ["a", "b"]},
        headers={"Content-Type": f"{content_type}; charset=utf-8"},
    )
    assert r.status_code == 201, r.text
    exp = r.json()
    assert (exp["name"], exp["priority"], exp["max_attempts"], exp["tags"]) == (
        "yaml-upload",
        -3,
        1,
        ["a", "b"],
    )
    spec = bob.http.get(f"/v1/experiments/{exp['id']}").json()["spec"]
    assert spec["method"]["alpha"] == 2.5

    # query options are bounded like the JSON fields
    r = bob.http.post(
        "/v1/experiments",
        content=text.encode(),
        params={"priority": 1000},
        headers={"Content-Type": content_type},
    )
    assert r.status_code == 422 and [e["loc"] for e in r.json()["errors"]] == ["query.priority"]
    assert count_experiments(api, bob.name) == 1


def test_invalid_specs_get_422_with_field_paths_and_nothing_is_stored(api: Api) -> None:
    carol = api.person()
    bad = digits_spec("bad", alpha=-1.0)
    r = carol.http.post("/v1/experiments", json={"spec": bad})
    assert r.status_code == 422
    body = r.json()
    assert body["errors"] == [{"loc": "method.alpha", "msg": "Input should be greater than or equal to 0"}]
    assert body["detail"].startswith("invalid spec: method.alpha:")

    r = carol.http.post(
        "/v1/experiments", content=yaml.safe_dump(bad), headers={"Content-Type": "application/yaml"}
    )
    assert r.status_code == 422 and [e["loc"] for e in r.json()["errors"]] == ["method.alpha"]

    several = digits_spec("bad2")
    several["optimization"]["lr"] = -0.1
    del several["dataset"]
    several["unknown_section"] = {}
    r = carol.http.post("/v1/experiments", json={"spec": several})
    assert r.status_code == 422
    assert {e["loc"] for e in r.json()["errors"]} == {"optimization.lr", "dataset", "unknown_section"}

    for content, content_type, loc in [
        (b"name: [unclosed", "application/yaml", "body"),
        (b"- a\n- list\n", "application/yaml", ""),  # not a mapping: the spec's root
        (b"{not json", "application/json", "body"),
        (json.dumps({"spec": digits_spec(), "priority": 101}).encode(), "application/json", "body.priority"),
        (json.dumps(digits_spec()).encode(), "application/json", "body.spec"),  # a bare spec, not wrapped
    ]:
        r = carol.http.post("/v1/experiments", content=content, headers={"Content-Type": content_type})
        assert r.status_code == 422, (content, r.text)
        assert loc in [e["loc"] for e in r.json()["errors"]], r.text

    r = carol.http.post("/v1/experiments", content=b"spec", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/yaml" in r.json()["detail"]
    assert count_experiments(api, carol.name) == 0


def test_oversized_bodies_get_413(api: Api) -> None:
    dave = api.person()
    limit = api.settings.max_spec_bytes
    spec = digits_spec("big")
    spec["description"] = "x" * (limit + 10)
    body = json.dumps({"spec": spec}).encode()
    assert len(body) > limit

    r = dave.http.post("/v1/experiments", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert r.json()["detail"] == f"request body larger than {limit} bytes (LBGAT_MAX_SPEC_BYTES)"

    def chunked():  # no Content-Length: the limit applies to the bytes that arrive
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    r = dave.http.post("/v1/experiments", content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert count_experiments(api, dave.name) == 0

    # just under the limit is fine (the spec's description has no length limit of its own)
    spec["description"] = ""
    small = json.dumps({"spec": spec}).encode()
    spec["description"] = "x" * (limit - len(small) - 10)
    r = dave.http.post("/v1/experiments", json={"spec": spec})
    assert r.status_code == 201, r.text
    assert count_experiments(api, dave.name) == 1


def test_idempotency_key(api: Api) -> None:
    erin = api.person()
    spec = digits_spec("idem")
    headers = {"Idempotency-Key": "submit-2026-001"}
    first = erin.http.post("/v1/experiments", json={"spec": spec}, headers=headers)
    again = erin.http.post("/v1/experiments", json={"spec": spec}, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    yaml_again = erin.http.post(
        "/v1/experiments",
        content=yaml.safe_dump(spec),
        headers={**headers, "Content-Type": "application/yaml"},
    )
    assert yaml_again.status_code == 200 and yaml_again.json()["id"] == first.json()["id"]
    assert count_experiments(api, erin.name) == 1

    other = erin.http.post("/v1/experiments", json={"spec": digits_spec("idem", alpha=1.0)}, headers=headers)
    assert other.status_code == 409
    assert "Idempotency-Key 'submit-2026-001'" in other.json()["detail"]
    assert first.json()["id"] in other.json()["detail"]

    # keys are per user: another user's identical key is a new submission
    frank = api.person(erin.team)
    r = frank.http.post("/v1/experiments", json={"spec": spec}, headers=headers)
    assert r.status_code == 201 and r.json()["id"] != first.json()["id"]

    r = erin.http.post("/v1/experiments", json={"spec": spec}, headers={"Idempotency-Key": "k" * 129})
    assert r.status_code == 422 and [e["loc"] for e in r.json()["errors"]] == ["header.idempotency-key"]
    assert count_experiments(api, erin.name) == 1


def test_concurrent_submissions_with_one_key_queue_once(api: Api) -> None:
    gina = api.person()
    spec = digits_spec("race")
    statuses: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()

    def go() -> None:
        with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {gina.token}"}) as client:
            r = client.post("/v1/experiments", json={"spec": spec}, headers={"Idempotency-Key": "race-1"})
        with lock:
            statuses.append(r.status_code)
            ids.append(r.json().get("id", r.text))

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 5 + [201], statuses
    assert len(set(ids)) == 1
    assert count_experiments(api, gina.name) == 1


# -- listing -----------------------------------------------------------------------------------------


def test_list_filters_and_cursor_pagination(api: Api) -> None:
    hank = api.person()
    ivy = api.person(hank.team)
    mine = [submit(hank, f"page-{i}")["id"] for i in range(7)]
    theirs = submit(ivy, "ivy-1")["id"]
    for exp_id in mine[:2]:
        assert hank.http.post(f"/v1/experiments/{exp_id}/cancel").status_code == 202

    seen: list[str] = []
    pages = []
    cursor = None
    while True:
        params: dict[str, Any] = {"user": hank.name, "limit": 3}
        if cursor:
            params["cursor"] = cursor
        r = hank.http.get("/v1/experiments", params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        pages.append(len(page["items"]))
        seen += [e["id"] for e in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [3, 3, 1]
    assert seen == list(reversed(mine))  # newest first, no duplicates, no gaps

    team_ids = [e["id"] for e in hank.http.get("/v1/experiments", params={"team": hank.team}).json()["items"]]
    assert team_ids == [theirs, *reversed(mine)]
    assert [e["id"] for e in hank.http.get("/v1/experiments").json()["items"]] == team_ids  # team by default

    def ids(**params: Any) -> list[str]:
        r = hank.http.get("/v1/experiments", params=params)
        assert r.status_code == 200, r.text
        return [e["id"] for e in r.json()["items"]]

    assert ids(state="cancelled") == [mine[1], mine[0]]
    assert ids(state=["cancelled", "queued"], user=ivy.name) == [theirs]
    assert len(ids(state="queued")) == 6
    assert ids(state="running") == []
    assert len(ids(method="lbgat", dataset="digits")) == 8
    assert ids(method="trades") == [] and ids(dataset="cifar10") == []
    assert ids(user="nobody-at-all") == []

    for params, loc in [
        ({"limit": 0}, "query.limit"),
        ({"limit": api.settings.max_page_size + 1}, "query.limit"),
        ({"state": "sleeping"}, "query.state[0]"),
    ]:
        r = hank.http.get("/v1/experiments", params=params)
        assert r.status_code == 422, r.text
        assert [e["loc"] for e in r.json()["errors"]] == [loc]
    r = hank.http.get("/v1/experiments", params={"cursor": "garbage!"})
    assert r.status_code == 422 and r.json()["detail"].startswith("cursor:")


# -- lifecycle ---------------------------------------------------------------------------------------


def test_cancel_and_retry(api: Api) -> None:
    jack = api.person()
    exp_id = submit(jack)["id"]
    r = jack.http.post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code == 202
    assert r.json()["state"] == "cancelled" and r.json()["finished_at"] is not None

    r = jack.http.post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code == 409 and r.json()["detail"] == f"experiment {exp_id} is already cancelled"

    r = jack.http.post(f"/v1/experiments/{exp_id}/retry")
    assert r.status_code == 200
    assert (r.json()["state"], r.json()["attempts"], r.json()["finished_at"]) == ("queued", 0, None)
    r = jack.http.post(f"/v1/experiments/{exp_id}/retry")
    assert r.status_code == 409 and "only failed or cancelled" in r.json()["detail"]

    history = jack.http.get(f"/v1/experiments/{exp_id}").json()["history"]
    assert [(h["from_state"], h["to_state"]) for h in history] == [
        (None, "queued"),
        ("queued", "cancelled"),
        ("cancelled", "queued"),
    ]
    assert history[1]["reason"] == f"cancelled by {jack.name}"

    # a running job is marked; the scheduler stops its Ray job and records the end
    set_state(api, exp_id, JobState.dispatching, JobState.running, ray_job_id=f"{exp_id}-a1")
    r = jack.http.post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "running"
    assert r.json()["dashboard_url"] is None  # no dashboard configured
    with api.sessions() as session:
        assert session.get(Experiment, exp_id).cancel_requested is True
    last = jack.http.get(f"/v1/experiments/{exp_id}").json()["history"][-1]
    assert (last["from_state"], last["to_state"]) == ("running", "running")
    assert "cancel requested" in last["reason"]

    r = jack.http.get("/v1/experiments/no-such-experiment")
    assert r.status_code == 404 and r.json() == {
        "detail": "experiment 'no-such-experiment' not found",
        "errors": [],
    }


def test_delete_removes_rows_and_artifacts_and_refuses_active_jobs(api: Api) -> None:
    kate = api.person()
    keep, gone = submit(kate, "keep")["id"], submit(kate, "gone")["id"]
    for exp_id in (keep, gone):
        api.store.put_bytes(experiment_prefix(exp_id, "main") + "checkpoints/last.pt", b"weights")
        api.store.put_json(experiment_prefix(exp_id) + "spec.json", {"name": exp_id})

    def add_rows(session):
        session.add(Trial(experiment_id=gone, name="main", metrics_lines=1))
        session.add(Event(experiment_id=gone, kind="metric", trial="main", data={"epoch": 1, "loss": 2.0}))

    run_tx(api.sessions, add_rows)

    r = kate.http.delete(f"/v1/experiments/{gone}")
    assert r.status_code == 204 and r.content == b""
    assert kate.http.get(f"/v1/experiments/{gone}").status_code == 404
    assert api.store.list(experiment_prefix(gone)) == []
    assert len(api.store.list(experiment_prefix(keep))) == 2
    with api.sessions() as session:
        for model in (Event, Trial):
            assert (
                session.scalar(select(func.count()).select_from(model).where(model.experiment_id == gone))
                == 0
            )
        assert session.get(Experiment, keep) is not None
    assert kate.http.delete(f"/v1/experiments/{gone}").status_code == 404

    for state in (JobState.dispatching, JobState.running):
        set_state(api, keep, state)
        r = kate.http.delete(f"/v1/experiments/{keep}")
        assert r.status_code == 409
        assert r.json()["detail"] == f"experiment {keep} is {state.value}; cancel it first"
        assert kate.http.get(f"/v1/experiments/{keep}").json()["state"] == state.value
        assert len(api.store.list(experiment_prefix(keep))) == 2

    set_state(api, keep, JobState.failed)
    assert kate.http.delete(f"/v1/experiments/{keep}").status_code == 204
    assert count_experiments(api, kate.name) == 0
    assert api.store.list(experiment_prefix(keep)) == []


# -- metrics, events, logs ---------------------------------------------------------------------------


def _add_metric(api: Api, exp_id: str, trial: str, epoch: int, acc: float) -> None:
    run_tx(
        api.sessions,
        lambda s: s.add(
            Event(experiment_id=exp_id, kind="metric", trial=trial, data={"epoch": epoch, "acc": acc})
        ),
    )


def test_metric_rows(api: Api) -> None:
    lena = api.person()
    exp_id = submit(lena)["id"]
    _add_metric(api, exp_id, "main", 1, 0.5)
    _add_metric(api, exp_id, "t1", 1, 0.4)
    _add_metric(api, exp_id, "main", 2, 0.6)
    rows = lena.http.get(f"/v1/experiments/{exp_id}/metrics").json()
    assert [(r["trial"], r["epoch"], r["acc"]) for r in rows] == [
        ("main", 1, 0.5),
        ("t1", 1, 0.4),
        ("main", 2, 0.6),
    ]
    main = lena.http.get(f"/v1/experiments/{exp_id}/metrics", params={"trial": "main"}).json()
    assert [r["epoch"] for r in main] == [1, 2]
    detail = lena.http.get(f"/v1/experiments/{exp_id}").json()
    assert [r["acc"] for r in detail["metrics"]] == [0.5, 0.6]


def _read_events(lines: Iterator[str], until: str, limit_s: float = 20.0) -> list[dict[str, Any]]:
    """Parse SSE frames from `lines` (one response's iter_lines()) until an event named `until`."""
    events: list[dict[str, Any]] = []
    frame: dict[str, Any] = {}
    deadline = time.monotonic() + limit_s
    for line in lines:
        assert time.monotonic() < deadline, events
        if line == "":
            if "event" in frame:
                events.append(frame)
                if frame["event"] == until:
                    return events
            frame = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(": ")
            frame[key] = json.loads(value) if key == "data" else value
    raise AssertionError(f"stream ended before {until!r}: {events}")


def test_event_stream_follows_state_and_metrics_until_the_end(api: Api) -> None:
    mia = api.person()
    exp_id = submit(mia)["id"]
    with mia.http.stream("GET", f"/v1/experiments/{exp_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = response.iter_lines()
        first = _read_events(lines, "state")
        assert [(e["event"], e["data"]["to"]) for e in first] == [("state", "queued")]
        first_id = int(first[0]["id"])

        _add_metric(api, exp_id, "main", 1, 0.7)
        metric = _read_events(lines, "metric")
        assert metric[0]["data"]["trial"] == "main" and metric[0]["data"]["acc"] == 0.7
        assert int(metric[0]["id"]) > first_id

        assert mia.http.post(f"/v1/experiments/{exp_id}/cancel").status_code == 202
        rest = _read_events(lines, "end")
        assert [(e["event"], e["data"].get("to")) for e in rest] == [("state", "cancelled"), ("end", None)]
        assert rest[0]["data"]["from"] == "queued" and rest[-1]["data"] == {"state": "cancelled"}
        cancel_id = int(rest[0]["id"])

    # resume: ?after= and Last-Event-ID send only what came later
    with mia.http.stream("GET", f"/v1/experiments/{exp_id}/events", params={"after": first_id}) as response:
        lines = response.iter_lines()
        events = _read_events(lines, "end")
        assert [e["event"] for e in events] == ["metric", "state", "end"]
    with mia.http.stream(
        "GET", f"/v1/experiments/{exp_id}/events", headers={"Last-Event-ID": str(cancel_id)}
    ) as response:
        assert [e["event"] for e in _read_events(response.iter_lines(), "end")] == ["end"]


def test_event_stream_stops_when_the_client_leaves(api: Api) -> None:
    nina = api.person()
    exp_id = submit(nina)["id"]
    for _ in range(3):  # connections are released: the server keeps answering
        with nina.http.stream("GET", f"/v1/experiments/{exp_id}/events") as response:
            assert _read_events(response.iter_lines(), "state")[0]["data"]["to"] == "queued"
    assert nina.http.get(f"/v1/experiments/{exp_id}").json()["state"] == "queued"


def test_logs_without_ray_are_503(api: Api) -> None:
    olga = api.person()
    exp_id = submit(olga)["id"]
    for follow in ("false", "true"):
        r = olga.http.get(f"/v1/experiments/{exp_id}/logs", params={"follow": follow})
        assert r.status_code == 503
        assert "no Ray cluster is configured" in r.json()["detail"]


# -- artifacts ---------------------------------------------------------------------------------------


def raw_get(api: Api, path: str, token: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (httpx would resolve '.' and '..' segments before sending)."""
    host, port = api.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Authorization", f"Bearer {token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_artifacts_list_download_and_path_checks(api: Api) -> None:
    paul = api.person()
    exp_id = submit(paul)["id"]
    other_id = submit(api.person(), "other")["id"]
    prefix = experiment_prefix(exp_id)
    payload = bytes(range(256)) * 5000  # 1.28 MB: streamed in more than one chunk
    api.store.put_bytes(prefix + "main/checkpoints/last.pt", payload)
    api.store.put_json(prefix + "main/summary.json", {"final": {"clean_accuracy": 0.9}})
    api.store.put_bytes(prefix + "main/metrics.jsonl", b'{"epoch": 1}\n')
    api.store.put_bytes(experiment_prefix(other_id) + "secret.txt", b"not yours")

    listing = paul.http.get(f"/v1/experiments/{exp_id}/artifacts").json()
    assert [(a["path"], a["size"]) for a in listing] == [
        ("main/checkpoints/last.pt", len(payload)),
        ("main/metrics.jsonl", 13),
        ("main/summary.json", len(json.dumps({"final": {"clean_accuracy": 0.9}}, indent=2))),
    ]

    r = paul.http.get(f"/v1/experiments/{exp_id}/artifacts/main/checkpoints/last.pt")
    assert r.status_code == 200 and r.content == payload
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"].startswith('attachment; filename="last.pt"')
    r = paul.http.get(f"/v1/experiments/{exp_id}/artifacts/main/summary.json")
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"final": {"clean_accuracy": 0.9}}
    r = paul.http.get(f"/v1/experiments/{exp_id}/artifacts/main/metrics.jsonl")
    assert r.headers["content-type"].startswith("application/x-ndjson") and r.content == b'{"epoch": 1}\n'

    r = paul.http.get(f"/v1/experiments/{exp_id}/artifacts/main/missing.pt")
    assert r.status_code == 404 and "missing.pt" in r.json()["detail"]
    r = paul.http.get(f"/v1/experiments/{exp_id}/artifacts/main/summary.json", params={"presign": "true"})
    assert r.status_code == 400 and "s3://" in r.json()["detail"]

    for raw in [
        f"../{other_id}/secret.txt",
        f"..%2F{other_id}%2Fsecret.txt",
        f"main/..%2F..%2F{other_id}/secret.txt",
        f"main/../../{other_id}/secret.txt",
        f"..%2F..%2F..%2Fexperiments%2F{other_id}%2Fsecret.txt",
        "main%5C..%5C..%5Csecret.txt",
        "main\\summary.json",
        "%2Fetc%2Fpasswd",
        "/etc/passwd",
        "main//summary.json",
        "main/./summary.json",
        "main/%00summary.json",
    ]:
        status, body = raw_get(api, f"/v1/experiments/{exp_id}/artifacts/{raw}", paul.token)
        assert status == 400, (raw, status, body)
        assert json.loads(body)["detail"].startswith("path "), body
        assert b"not yours" not in body
    assert paul.http.get(f"/v1/experiments/{other_id}/artifacts/secret.txt").status_code == 404  # other team


def test_storage_errors_are_answered_without_details(api: Api) -> None:
    quinn = api.person()
    exp_id = submit(quinn)["id"]

    def broken_store():
        raise RuntimeError("password=hunter2 leaked in an exception")

    api.app.dependency_overrides[get_store] = broken_store
    try:
        r = quinn.http.get(f"/v1/experiments/{exp_id}/artifacts")
    finally:
        api.app.dependency_overrides.clear()
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error (logged on the server)", "errors": []}
    assert quinn.http.get(f"/v1/experiments/{exp_id}/artifacts").json() == []


# -- results -----------------------------------------------------------------------------------------


def _finish(
    api: Api, exp_id: str, *, clean: float, attacks: dict[str, float], aa: float | None, **columns: Any
) -> None:
    robust = min(attacks.values())
    results = {
        "clean_accuracy": clean,
        "robust_accuracy": robust,
        "autoattack_accuracy": aa,
        "nrr": 2 * clean * robust / (clean + robust),
        "attacks": attacks,
    }
    set_state(
        api,
        exp_id,
        JobState.dispatching,
        JobState.running,
        JobState.succeeded,
        results=results,
        clean_accuracy=clean,
        robust_accuracy=robust,
        autoattack_accuracy=aa,
        **columns,
    )


def test_leaderboard_and_compare(api: Api) -> None:
    rita = api.person()
    sam = api.person(rita.team)
    a = submit(rita, "a")["id"]
    b = submit(sam, "b")["id"]
    c = submit(rita, "c")["id"]
    d = submit(rita, "d")["id"]
    queued = submit(rita, "queued")["id"]
    outsider = submit(api.person(), "outsider")["id"]
    _finish(api, a, clean=0.80, attacks={"fgsm": 0.60, "pgd20": 0.52}, aa=0.48)
    _finish(api, b, clean=0.85, attacks={"fgsm": 0.62, "pgd20": 0.55, "cw20": 0.53}, aa=0.50)
    _finish(api, c, clean=0.90, attacks={"pgd20": 0.40}, aa=None)
    _finish(
        api, d, clean=0.70, attacks={"pgd20": 0.30}, aa=0.29, dataset="cifar10", eps=8 / 255, method="trades"
    )
    _finish(api, outsider, clean=0.99, attacks={"pgd20": 0.99}, aa=0.99)

    board = rita.http.get("/v1/results/leaderboard").json()
    assert [r["experiment_id"] for r in board] == [b, a, c, d]  # AutoAttack, else worst attack; team only
    top = board[0]
    assert (top["owner"], top["team"], top["method"], top["dataset"]) == (
        sam.name,
        rita.team,
        "lbgat",
        "digits",
    )
    assert (top["clean_accuracy"], top["robust_accuracy"], top["autoattack_accuracy"]) == (0.85, 0.53, 0.50)
    assert top["attacks"] == {"fgsm": 0.62, "pgd20": 0.55, "cw20": 0.53}
    assert top["nrr"] == pytest.approx(2 * 0.85 * 0.53 / (0.85 + 0.53))

    def board_ids(**params: Any) -> list[str]:
        r = rita.http.get("/v1/results/leaderboard", params=params)
        assert r.status_code == 200, r.text
        return [row["experiment_id"] for row in r.json()]

    assert board_ids(dataset="digits") == [b, a, c]
    assert board_ids(dataset="cifar10") == [d]
    assert board_ids(eps=0.1) == [b, a, c]
    assert board_ids(eps=8 / 255, norm="linf") == [d]
    assert board_ids(norm="l2") == []
    assert board_ids(method="trades") == [d]
    assert board_ids(limit=2) == [b, a]
    assert queued not in board_ids()

    r = rita.http.get("/v1/results/compare", params={"ids": [c, b, a, queued]})
    assert r.status_code == 200, r.text
    comparison = r.json()
    assert [row["experiment_id"] for row in comparison["rows"]] == [c, b, a, queued]
    assert comparison["attacks"] == ["pgd20", "fgsm", "cw20"]  # first seen first
    assert comparison["rows"][3]["clean_accuracy"] is None and comparison["rows"][3]["attacks"] == {}

    assert rita.http.get("/v1/results/compare", params={"ids": [a, outsider]}).status_code == 404
    assert rita.http.get("/v1/results/compare", params={"ids": [a, "nope"]}).status_code == 404
    r = rita.http.get("/v1/results/compare", params={"ids": [a]})
    assert r.status_code == 422 and [e["loc"] for e in r.json()["errors"]] == ["query.ids"]
    r = rita.http.get("/v1/results/compare", params={"ids": [a] * 21})
    assert r.status_code == 422


# -- health, readiness, metrics, OpenAPI -------------------------------------------------------------


def test_readiness(api: Api) -> None:
    r = api.client().get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "checks": {"database": "ok", "store": "ok", "ray": "not configured"}}


def test_readiness_reports_an_unusable_store(make_api, tmp_path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the store's folder should be")
    api = make_api(store=LocalStore(blocker / "artifacts"))
    r = api.client().get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False
    assert body["checks"]["database"] == "ok" and body["checks"]["ray"] == "not configured"
    assert body["checks"]["store"] == "not ready: StoreUnavailable (the reason is in the service's log)"
    assert api.client().get("/healthz").json() == {"status": "ok"}  # alive, just not ready
    assert api.settings.admin_token.get_secret_value() not in r.text
    assert "file://" not in r.text and str(tmp_path) not in r.text  # anonymous: no location shown


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == name or series.startswith(name + "{"):
            found = dict(re.findall(r'(\w+)="([^"]*)"', series[len(name) :]))
            if found == labels:
                return float(value)
    return None


def test_prometheus_metrics(make_api) -> None:
    from service.metrics import observe_dispatch

    api = make_api()
    tina, uma = api.person(), api.person()
    for i in range(3):
        submit(tina, f"t{i}")
    cancelled = submit(uma, "u0")["id"]
    submit(uma, "u1")
    running = submit(uma, "u2")["id"]
    assert uma.http.post(f"/v1/experiments/{cancelled}/cancel").status_code == 202
    set_state(api, running, JobState.dispatching, JobState.running)
    uma.http.get("/v1/experiments/no-such")  # a 404 on a templated route
    observe_dispatch(0.25)

    assert api.client().get("/metrics").status_code == 401
    r = tina.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _sample(text, "lbgat_jobs", state="queued") == 4.0
    assert _sample(text, "lbgat_jobs", state="cancelled") == 1.0
    assert _sample(text, "lbgat_jobs", state="running") == 1.0
    assert _sample(text, "lbgat_jobs", state="succeeded") == 0.0
    assert _sample(text, "lbgat_user_jobs", user=tina.name, state="queued") == 3.0
    assert _sample(text, "lbgat_user_jobs", user=uma.name, state="queued") == 1.0
    assert _sample(text, "lbgat_user_jobs", user=uma.name, state="running") == 1.0
    assert _sample(text, "lbgat_user_jobs", user=uma.name, state="cancelled") is None  # active + waiting only
    assert (
        _sample(text, "lbgat_request_seconds_count", method="POST", route="/v1/experiments", status="201")
        == 6.0
    )
    assert (
        _sample(
            text,
            "lbgat_request_seconds_count",
            method="GET",
            route="/v1/experiments/{experiment_id}",
            status="404",
        )
        == 1.0
    )
    assert "no-such" not in text  # route templates, never raw paths
    assert (_sample(text, "lbgat_dispatch_seconds_count") or 0) >= 1.0
    assert 'lbgat_dispatch_seconds_bucket{le="0.25"}' in text


def test_openapi_documents_the_contract(api: Api) -> None:
    schema = api.client().get("/openapi.json").json()
    paths = schema["paths"]
    for path, method in [
        ("/v1/experiments", "post"),
        ("/v1/experiments", "get"),
        ("/v1/experiments/{experiment_id}", "get"),
        ("/v1/experiments/{experiment_id}", "delete"),
        ("/v1/experiments/{experiment_id}/cancel", "post"),
        ("/v1/experiments/{experiment_id}/retry", "post"),
        ("/v1/experiments/{experiment_id}/events", "get"),
        ("/v1/experiments/{experiment_id}/logs", "get"),
        ("/v1/experiments/{experiment_id}/metrics", "get"),
        ("/v1/experiments/{experiment_id}/artifacts", "get"),
        ("/v1/experiments/{experiment_id}/artifacts/{path}", "get"),
        ("/v1/results/leaderboard", "get"),
        ("/v1/results/compare", "get"),
        ("/v1/users", "post"),
        ("/v1/users/me", "get"),
        ("/v1/tokens", "post"),
        ("/v1/tokens/{token_id}", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert paths[path][method]["summary"], (path, method)
    submit_op = paths["/v1/experiments"]["post"]
    assert set(submit_op["requestBody"]["content"]) == {"application/json", "application/yaml"}
    assert submit_op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ExperimentOut"
    )
    assert "ErrorDetail" in schema["components"]["schemas"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]
