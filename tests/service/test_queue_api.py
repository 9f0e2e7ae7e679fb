"""GET /v1/queue and `lbgat queue` against the served API (SQLite and PostgreSQL): the table's shape,
estimated starts and expected ends (a fake Ray gives the planner its capacity), team isolation, bounded
parameters."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from api_schemas.jobs import JobState
from service.client.cli import main
from service.db.engine import run_tx
from service.db.models import Experiment, utcnow
from service.jobs import transition
from service.ray_jobs import Capacity
from tests.service.conftest import Api, digits_spec
from tests.service.fake_ray import FakeRay


def _submit(person: Any, name: str, priority: int = 0) -> str:
    spec = digits_spec(name)
    spec["resources"] = {**spec.get("resources", {}), "cpus_per_worker": 1}
    r = person.http.post("/v1/experiments", json={"spec": spec, "priority": priority})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _run(api: Api, exp_id: str, minutes_ago: float) -> None:
    def move(session: Any) -> None:
        exp = session.get(Experiment, exp_id)
        assert transition(session, exp, JobState.dispatching, ray_job_id=f"{exp_id}-a1", attempts=1)
        assert transition(
            session, exp, JobState.running, started_at=utcnow() - timedelta(minutes=minutes_ago)
        )

    run_tx(api.sessions, move)


def test_queue_rows_estimates_and_team_isolation(api: Api, tmp_path, monkeypatch, capsys):
    scheduler = api.app.state.scheduler
    scheduler.ray = FakeRay(Capacity(gpus=0, cpus=1, nodes=1))
    scheduler._capacity_at = 0.0
    alice = api.person()
    carol = api.person(team=alice.team)
    bob = api.person()
    running = _submit(alice, "q-running")
    _run(api, running, minutes_ago=10)
    low = _submit(alice, "q-low")
    high = _submit(carol, "q-high", priority=3)
    other = _submit(bob, "q-other")

    r = alice.http.get("/v1/queue")
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"generated_at", "fair_share_window_h", "running", "waiting", "more_waiting"}
    assert [e["id"] for e in body["running"]] == [running]
    assert [e["id"] for e in body["waiting"]] == [high, low]  # priority first; bob's job is not shown
    run_row, first, second = body["running"][0], *body["waiting"]
    assert run_row["position"] is None and run_row["state"] == "running" and run_row["expected_end"]
    # positions are places in the whole queue (bob's job, between them by fair share, is hidden)
    assert first["position"] == 1 and second["position"] > 1
    assert first["owner"] == carol.name and first["team"] == alice.team and first["priority"] == 3
    assert first["effective_priority"] == 3
    assert "waits for" in first["reason"]
    assert set(first["fair_share"]) == {"user_gpu_hours", "user_share", "team_gpu_hours", "team_share"}
    assert run_row["fair_share"]["user_gpu_hours"] > 0 and run_row["fair_share"]["team_share"] > 0
    assert first["estimated_start"] and second["estimated_start"]
    assert first["estimated_start"] < second["estimated_start"]
    # the running job's expected end (unknown epochs: the default duration from its start) is when
    # the first waiting job starts (one CPU: one job at a time)
    assert first["estimated_start"] == run_row["expected_end"]
    assert first["cpus"] == 1 and first["kind"] == "training"

    # the same through the experiment's own view
    r = carol.http.get(f"/v1/experiments/{high}")
    assert r.json()["queue"]["estimated_start"] == first["estimated_start"]

    # bob sees his own team only; the admin sees whichever team is named
    assert [e["id"] for e in bob.http.get("/v1/queue").json()["waiting"]] == [other]
    admin = api.admin.http.get("/v1/queue", params={"team": alice.team}).json()
    assert [e["id"] for e in admin["waiting"]] == [high, low] and len(admin["running"]) == 1
    assert alice.http.get("/v1/queue", params={"team": bob.team}).json()["waiting"] == []
    assert alice.http.get("/v1/queue", params={"user": carol.name}).json()["waiting"][0]["id"] == high
    assert alice.http.get("/v1/queue", params={"kind": "evaluation"}).json()["waiting"] == []
    limited = alice.http.get("/v1/queue", params={"limit": 1}).json()
    assert len(limited["waiting"]) == 1 and limited["more_waiting"] == 1

    for params, loc in (
        ({"limit": 0}, "query.limit"),
        ({"limit": 10_001}, "query.limit"),
        ({"kind": "nope"}, "query.kind"),
        ({"team": "x" * 65}, "query.team"),
    ):
        r = alice.http.get("/v1/queue", params=params)
        assert r.status_code == 422 and loc in [e["loc"] for e in r.json()["errors"]], r.text
    assert alice.http.get("/v1/queue").status_code == 200
    assert api.client().get("/v1/queue").status_code == 401

    # `lbgat queue`: JSON, and the table
    monkeypatch.setenv("LBGAT_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("LBGAT_TOKEN", alice.token)
    monkeypatch.setenv("COLUMNS", "250")
    capsys.readouterr()
    assert main(["queue", "--server", api.url, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [e["id"] for e in printed["waiting"]] == [high, low]
    assert main(["queue", "--server", api.url]) == 0
    table = capsys.readouterr().out
    assert "running (1)" in table and "waiting (2)" in table
    for exp_id in (running, high, low):
        assert exp_id in table
    assert other not in table and "waits for" in table and "(in " in table
    assert main(["show", low, "--server", api.url]) == 0
    assert "expected start" in capsys.readouterr().out
    with pytest.raises(SystemExit) as refused:
        main(["queue", "--server", api.url, "--limit", "0"])
    assert refused.value.code == 2 and "--limit" in capsys.readouterr().err
