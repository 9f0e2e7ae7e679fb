"""Accounting against the real API (uvicorn, SQLite and PostgreSQL): the usage ledger written by
`service.jobs.transition`, `GET /v1/usage`, team budgets (warning, lower priority, hold) as the
scheduler's plan sees them, the Prometheus gauges, and `lbgat usage` / `lbgat budget`.

Jobs are moved through their states with `service.jobs.transition`, as the scheduler moves them, with
a controlled `started_at` and `last_checkpoint_at`: the attempt ran `hours` up to now, its last
checkpoint was `checkpoint_h` before now. Charge rates are set on dispatch as the scheduler sets them.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from api_schemas.jobs import JobState
from service.client.cli import main
from service.db.engine import run_tx
from service.db.models import Experiment, UsageRecord, WebhookDelivery, utcnow
from service.jobs import transition
from tests.service.conftest import Api, Person, digits_spec

H = 3600.0
TOL = 0.01  # hours: the seconds between setting up an attempt and ending it


def submit(person: Person, name: str = "acct", priority: int = 0) -> str:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name), "priority": priority})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run_attempt(
    api: Api,
    exp_id: str,
    *,
    hours: float,
    end: JobState | None,
    reason: str = "test",
    checkpoint_h: float | None = None,
    preempt: bool = False,
    gpus: float = 2.0,
    cpus: float = 4.0,
) -> None:
    """Dispatch, run for `hours` (backdated) and end the attempt in `end` (None: leave it running)."""

    def go(session: Any) -> None:
        exp = session.get(Experiment, exp_id)
        now = utcnow()
        assert transition(
            session,
            exp,
            JobState.dispatching,
            reason="test",
            attempts=exp.attempts + 1,
            gpus=gpus,
            cpus=cpus,
            charge_rate=gpus,
        )
        assert transition(
            session, exp, JobState.running, reason="test", started_at=now - timedelta(hours=hours)
        )
        exp.last_checkpoint_at = None if checkpoint_h is None else now - timedelta(hours=checkpoint_h)
        exp.preempt_requested_at = now if preempt else None
        session.flush()
        if end is not None:
            assert transition(session, exp, end, reason=reason, preempt_requested_at=None)

    run_tx(api.sessions, go)


def ledger(api: Api, exp_id: str) -> list[UsageRecord]:
    with api.sessions() as session:
        rows = session.scalars(
            select(UsageRecord).where(UsageRecord.experiment_id == exp_id).order_by(UsageRecord.id)
        ).all()
        session.expunge_all()
        return list(rows)


def usage(person: Person, **params: Any) -> dict[str, Any]:
    r = person.http.get("/v1/usage", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_ledger_has_one_row_per_attempt_with_its_hours_and_lost_hours(api: Api) -> None:
    alice = api.person()
    ok, failed, preempted, cancelled = (submit(alice, n) for n in ("ok", "failed", "preempted", "cancelled"))
    run_attempt(api, ok, hours=1.0, checkpoint_h=0.1, end=JobState.succeeded)
    run_attempt(api, failed, hours=2.0, checkpoint_h=0.5, end=JobState.retrying)
    run_attempt(api, failed, hours=1.0, checkpoint_h=None, end=JobState.failed)
    run_attempt(
        api,
        preempted,
        hours=1.0,
        checkpoint_h=0.1,
        end=JobState.retrying,  # the scheduler asked it to make way (preempt_requested_at)
        reason="preempted by x",
        preempt=True,
    )
    run_attempt(
        api, cancelled, hours=0.5, checkpoint_h=2.0, end=JobState.cancelled
    )  # checkpoint of an earlier attempt

    (row,) = ledger(api, ok)
    assert (row.outcome, row.attempt, row.gpus, row.cpus) == ("succeeded", 1, 2.0, 4.0)
    assert row.gpu_seconds / H == pytest.approx(2.0, abs=TOL) and row.cpu_seconds / H == pytest.approx(
        4.0, abs=TOL
    )
    assert row.lost_gpu_seconds == 0
    retried, final = ledger(api, failed)
    assert (retried.outcome, retried.attempt, final.outcome, final.attempt) == ("retrying", 1, "failed", 2)
    assert retried.gpu_seconds / H == pytest.approx(4.0, abs=TOL)
    assert retried.lost_gpu_seconds / H == pytest.approx(1.0, abs=TOL)  # 0.5 h since the checkpoint x 2 GPUs
    assert final.lost_gpu_seconds / H == pytest.approx(2.0, abs=TOL)  # no checkpoint: all of it
    (row,) = ledger(api, preempted)
    assert row.outcome == "preempted" and row.lost_gpu_seconds / H == pytest.approx(0.2, abs=TOL)
    (row,) = ledger(api, cancelled)
    assert row.outcome == "cancelled" and row.lost_gpu_seconds / H == pytest.approx(1.0, abs=TOL)
    with api.sessions() as session:
        exp = session.get(Experiment, failed)
        assert exp.lost_gpu_seconds / H == pytest.approx(3.0, abs=TOL)
        assert exp.gpu_seconds / H == pytest.approx(6.0, abs=TOL)

    report = usage(alice, group_by="user")
    assert report["team"] == alice.team
    (mine,) = report["rows"]
    assert (mine["key"], mine["team"], mine["attempts"], mine["running"]) == (alice.name, alice.team, 5, 0)
    assert mine["gpu_hours"] == pytest.approx(2 + 4 + 2 + 2 + 1, abs=TOL)
    assert mine["cpu_hours"] == pytest.approx(4 + 8 + 4 + 4 + 2, abs=TOL)
    assert mine["lost_preemption_gpu_hours"] == pytest.approx(0.2, abs=TOL)
    assert mine["lost_failure_gpu_hours"] == pytest.approx(3.0, abs=TOL)  # cancelled is neither
    assert report["total"]["gpu_hours"] == pytest.approx(mine["gpu_hours"])


def test_usage_groups_by_team_and_method_and_keeps_teams_apart(api: Api) -> None:
    alice = api.person()
    bob = api.person(alice.team)
    carol = api.person()
    run_attempt(api, submit(alice), hours=1.0, end=JobState.succeeded)
    run_attempt(api, submit(bob), hours=0.5, end=JobState.succeeded, gpus=1.0)
    run_attempt(api, submit(bob), hours=0.25, end=None, gpus=4.0)  # still running: counted up to now
    carols = submit(carol)
    run_attempt(api, carols, hours=3.0, end=JobState.succeeded)

    by_user = {r["key"]: r for r in usage(bob)["rows"]}
    assert set(by_user) == {alice.name, bob.name}  # never carol's
    assert by_user[bob.name]["gpu_hours"] == pytest.approx(0.5 + 1.0, abs=TOL)
    assert by_user[bob.name]["running"] == 1
    (team,) = usage(alice, group_by="team")["rows"]
    assert (team["key"], team["attempts"]) == (alice.team, 3)
    assert team["gpu_hours"] == pytest.approx(2.0 + 0.5 + 1.0, abs=TOL)
    (method,) = usage(alice, group_by="method")["rows"]
    assert method["key"] == "lbgat"

    r = alice.http.get("/v1/usage", params={"team": carol.team})
    assert r.status_code == 403 and carol.team in r.json()["detail"]
    teams = {r["key"]: r for r in usage(api.admin, group_by="team")["rows"]}
    assert teams[carol.team]["gpu_hours"] == pytest.approx(6.0, abs=TOL) and alice.team in teams
    assert [r["key"] for r in usage(api.admin, team=carol.team)["rows"]] == [carol.name]

    # a window before the attempts holds nothing; one cut through an attempt counts its part
    start = utcnow() - timedelta(days=3)
    assert usage(carol, since=start.isoformat(), until=(start + timedelta(days=1)).isoformat())["rows"] == []
    half = usage(carol, since=(utcnow() - timedelta(hours=1.5)).isoformat())
    assert half["rows"][0]["gpu_hours"] == pytest.approx(3.0, abs=TOL)  # the last 1.5 h of 3 h x 2 GPUs

    # deleting the experiment keeps its hours: a team cannot shrink its usage by deleting jobs
    assert carol.http.delete(f"/v1/experiments/{carols}").status_code == 204
    assert usage(carol)["rows"][0]["gpu_hours"] == pytest.approx(6.0, abs=TOL)


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "query.since"),
        ({"since": "1900-01-01T00:00:00Z"}, "query.since"),
        ({"until": "2999-01-01T00:00:00Z"}, "query.until"),
        ({"since": "2001-01-01T00:00:00Z", "until": "2199-01-01T00:00:00Z"}, "query.since"),
        ({"group_by": "planet"}, "query.group_by"),
        ({"team": "no spaces"}, "query.team"),
        ({"since": "yesterday"}, "query.since"),
    ],
)
def test_usage_refuses_bad_parameters_naming_them(api: Api, params: dict[str, str], loc: str) -> None:
    r = api.admin.http.get("/v1/usage", params=params)
    assert r.status_code == 422, r.text
    assert loc in [e["loc"] for e in r.json()["errors"]]


def _candidates(api: Api, *, notify: bool = False) -> dict[str, Any]:
    planner = api.app.state.scheduler
    if notify:  # as a scheduling round: in its claiming transaction
        candidates, _, _ = run_tx(api.sessions, lambda s: planner._inputs(s, lock=True))
    else:
        with api.sessions() as session:
            candidates, _, _ = planner._inputs(session, lock=False)
    return {c.id: c for c in candidates}


def test_budgets_warn_at_80_percent_then_lower_priority_or_hold(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    lead = api.person()
    team = lead.team
    hook = lead.http.post(
        "/v1/webhooks", json={"url": "http://127.0.0.1:9/hook", "scope": "team", "events": ["budget.warning"]}
    )
    assert hook.status_code == 201, hook.text
    r = lead.http.put(f"/v1/teams/{team}/budget", json={"gpu_hours": 10})
    assert r.status_code == 403  # admins set budgets
    r = api.admin.http.put(f"/v1/teams/{team}/budget", json={"gpu_hours": 10, "period": "month"})
    assert r.status_code == 200, r.text
    assert (r.json()["action"], r.json()["used_gpu_hours"], r.json()["warning"]) == (
        "lower_priority",
        0.0,
        False,
    )
    waiting = submit(lead, "waits", priority=5)

    # 9 of 10 GPU-hours (0.1 h on 90 GPUs, so the test stays inside one month): a warning, nothing held
    run_attempt(api, submit(lead), hours=0.1, end=JobState.succeeded, gpus=90.0)
    budget = lead.http.get(f"/v1/teams/{team}/budget").json()
    assert budget["used_gpu_hours"] == pytest.approx(9.0, abs=0.1) and budget["fraction"] == pytest.approx(
        0.9, abs=0.01
    )
    assert (budget["warning"], budget["exceeded"]) == (True, False)
    assert usage(lead)["budgets"][0]["warning"] is True
    assert _candidates(api, notify=True)[waiting].priority == 5
    _candidates(api, notify=True)  # the warning goes once per period and webhook, and is logged once
    warned = [
        r for r in caplog.records if r.name == "service.accounting" and f"team {team} has used" in r.message
    ]
    assert len(warned) == 1 and "9.0 of its 10 GPU-hours this month (90%)" in warned[0].message
    with api.sessions() as session:
        events = session.scalars(
            select(WebhookDelivery.payload).where(WebhookDelivery.webhook_id == hook.json()["id"])
        ).all()
    assert len(events) == 1 and events[0]["event"] == "budget.warning"
    assert events[0]["budget"]["team"] == team and events[0]["budget"]["exceeded"] is False

    # spent: lower_priority takes LBGAT_BUDGET_PRIORITY_PENALTY off the team's waiting jobs
    run_attempt(api, submit(lead), hours=0.1, end=JobState.succeeded, gpus=20.0)
    assert _candidates(api)[waiting].priority == 5 - api.settings.budget_priority_penalty
    assert lead.http.get(f"/v1/teams/{team}/budget").json()["exceeded"] is True

    # hold: the job waits with the reason, in the plan and in the API's queue view
    r = api.admin.http.put(f"/v1/teams/{team}/budget", json={"gpu_hours": 10, "action": "hold"})
    assert r.status_code == 200 and r.json()["action"] == "hold"
    held = _candidates(api)[waiting]
    assert held.priority == 5 and held.held.startswith(
        f"team {team} spent its budget: 11.0 of 10 GPU-hours this month"
    )
    with api.sessions() as session:
        reason = api.app.state.scheduler._plan(session, lock=False).waiting[waiting][1]
    assert reason == held.held
    shown = lead.http.get(f"/v1/experiments/{waiting}").json()["queue"]
    assert shown["reason"].startswith(f"team {team} spent its budget")

    # no budget, no effect
    assert api.admin.http.delete(f"/v1/teams/{team}/budget").status_code == 204
    assert lead.http.get(f"/v1/teams/{team}/budget").status_code == 404
    assert _candidates(api)[waiting].held is None


def test_budget_bounds_and_visibility(api: Api) -> None:
    lead, other = api.person(), api.person()
    for body in ({"gpu_hours": 0}, {"gpu_hours": -1}, {"gpu_hours": 5, "period": "year"}, {"gpu_hours": "5"}):
        r = api.admin.http.put(f"/v1/teams/{lead.team}/budget", json=body)
        assert r.status_code == 422, body
    assert api.admin.http.put("/v1/teams/no-such-team/budget", json={"gpu_hours": 5}).status_code == 404
    assert api.admin.http.put(f"/v1/teams/{lead.team}/budget", json={"gpu_hours": 5}).status_code == 200
    assert other.http.get(f"/v1/teams/{lead.team}/budget").status_code == 403
    assert lead.http.delete(f"/v1/teams/{lead.team}/budget").status_code == 403


def test_prometheus_gauges_show_team_hours_budget_and_lost_hours(api: Api) -> None:
    lead = api.person()
    run_attempt(api, submit(lead), hours=1.0, checkpoint_h=0.25, end=JobState.failed)
    assert (
        api.admin.http.put(
            f"/v1/teams/{lead.team}/budget", json={"gpu_hours": 4, "period": "week"}
        ).status_code
        == 200
    )
    text = api.admin.http.get("/metrics").text
    lines = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if lead.team in line}
    assert lines[f'lbgat_team_gpu_hours{{period="week",team="{lead.team}"}}'] == pytest.approx(2.0, abs=TOL)
    assert lines[f'lbgat_team_budget_gpu_hours{{period="week",team="{lead.team}"}}'] == 4.0
    assert lines[f'lbgat_team_budget_fraction{{team="{lead.team}"}}'] == pytest.approx(0.5, abs=0.01)
    lost = f'lbgat_team_lost_gpu_hours{{cause="failure",period="week",team="{lead.team}"}}'
    assert lines[lost] == pytest.approx(0.5, abs=TOL)


def test_cli_usage_and_budget(
    api: Api, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lead = api.person()
    run_attempt(
        api,
        submit(lead),
        hours=1.0,
        checkpoint_h=0.5,
        end=JobState.retrying,
        reason="preempted by y",
        preempt=True,
    )
    api.admin.http.put(f"/v1/teams/{lead.team}/budget", json={"gpu_hours": 2.5, "period": "month"})
    monkeypatch.setenv("LBGAT_API_URL", api.url)
    monkeypatch.setenv("LBGAT_TOKEN", lead.token)
    monkeypatch.setenv("COLUMNS", "250")

    assert main(["usage"]) == 0
    out = capsys.readouterr().out
    assert lead.name in out and "lost: preemption" in out and "2.00" in out and "1.00" in out
    assert f"team {lead.team}: 2.0 of 2.5 GPU-hours this month (80%, warning" in out
    assert main(["usage", "--json", "--group-by", "team", "--since", "2026-01-01"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["rows"][0]["key"] == lead.team and report["since"].startswith("2026-01-01T00:00:00")
    assert main(["usage", "--team", "someone-elses"]) == 2
    assert "your own team" in capsys.readouterr().err
    assert main(["budget", "show", lead.team]) == 0
    assert "2.0 of 2.5 GPU-hours this month" in capsys.readouterr().out


def test_a_job_that_never_started_has_no_ledger_row(api: Api) -> None:
    """Cancelled while queued: nothing ran, nothing is charged."""
    alice = api.person()
    exp_id = submit(alice)
    r = alice.http.post(f"/v1/experiments/{exp_id}/cancel")
    assert r.status_code in (200, 202), r.text
    with api.sessions() as session:
        n = session.scalar(
            select(func.count()).select_from(UsageRecord).where(UsageRecord.experiment_id == exp_id)
        )
    assert n == 0


def test_outcomes_of_the_ways_an_attempt_ends() -> None:
    """Back to the queue "preempted by ..." is a preemption even when the flag is already cleared;
    back to the queue for another reason is a lost attempt; a success is never a preemption."""
    from service.accounting import attempt_outcome
    from service.webhooks import event_for

    def exp(**fields: Any) -> Experiment:
        return Experiment(**{"kind": "training", "preempt_requested_at": None, **fields})

    asked = exp(preempt_requested_at=utcnow())
    assert attempt_outcome(exp(), JobState.queued, "preempted by big-job") == "preempted"
    assert attempt_outcome(exp(), JobState.queued, "node lost") == "lost"
    assert attempt_outcome(asked, JobState.retrying, "stopped") == "preempted"
    assert attempt_outcome(asked, JobState.succeeded, None) == "succeeded"
    assert attempt_outcome(asked, JobState.cancelled, None) == "cancelled"
    assert attempt_outcome(exp(), JobState.retrying, "attempt 1 failed") == "retrying"
    assert event_for(exp(), JobState.running, JobState.queued, "preempted by big-job") == "job.preempted"
    assert event_for(exp(), JobState.running, JobState.retrying, "attempt 1 failed") is None
    assert (
        event_for(exp(kind="evaluation"), JobState.running, JobState.succeeded, None)
        == "evaluation.succeeded"
    )
    assert event_for(exp(), JobState.running, JobState.failed, None) == "job.failed"


def test_budget_periods_are_utc_calendar_periods() -> None:
    from datetime import datetime, timezone

    from service.accounting import period_bounds

    at = datetime(2026, 12, 31, 23, 30, tzinfo=timezone.utc)  # a Thursday
    utc = timezone.utc
    assert period_bounds("day", at) == (datetime(2026, 12, 31, tzinfo=utc), datetime(2027, 1, 1, tzinfo=utc))
    assert period_bounds("week", at) == (datetime(2026, 12, 28, tzinfo=utc), datetime(2027, 1, 4, tzinfo=utc))
    assert period_bounds("month", at) == (datetime(2026, 12, 1, tzinfo=utc), datetime(2027, 1, 1, tzinfo=utc))
    with pytest.raises(ValueError, match="day, week or month"):
        period_bounds("year", at)
