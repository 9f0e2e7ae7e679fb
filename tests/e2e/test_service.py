"""End to end over real sockets: HTTP -> service (uvicorn child process) -> Ray Job Submission ->
workers.run on the local Ray -> SeaweedFS. The restart test runs on SQLite and PostgreSQL (two
service processes on one database: row locks differ); the other flows do not depend on the backend,
whose queries tests/service runs on both, so they run on SQLite only."""

from __future__ import annotations

import json
import shlex
import sys
import time

import httpx
import pytest

from api_schemas.presets import get_preset
from tests.e2e.conftest import LocalService, auth
from tests.waiting import wait_for

# A short LBGAT run on the digits set: 3 epochs, a small evaluation with AutoAttack on 60 images.
FAST = [
    "optimization.epochs=3",
    "optimization.schedule.milestones=[2]",
    "runtime.progress=false",
    "evaluation.n_examples=200",
    "evaluation.on_best=false",
    "evaluation.attacks=[{kind: pgd, steps: 10, step_size: 0.02}, "
    "{kind: autoattack, version: custom, attacks: [apgd-ce], n_examples: 60}]",
    "checkpoint.every_n_epochs=1",
    "resources.cpus_per_worker=1",
]


# Jobs whose Ray entrypoint only sleeps: for tests about the queue, not the training.
SLEEP = shlex.quote(sys.executable) + ' -c "import time; time.sleep({seconds})"'


def digits_spec(name: str, *extra: str) -> dict:
    return get_preset("digits", [*FAST, f"name={name}", *extra]).model_dump(mode="json")


def sleep_spec(name: str) -> dict:
    return get_preset("digits", [f"name={name}", "resources.cpus_per_worker=1"]).model_dump(mode="json")


def submit(client: httpx.Client, token: str, spec: dict, **extra) -> dict:
    r = client.post("/v1/experiments", json={"spec": spec, **extra}, headers=auth(token))
    assert r.status_code == 201, r.text
    return r.json()


def get(client: httpx.Client, token: str, exp_id: str) -> dict:
    r = client.get(f"/v1/experiments/{exp_id}", headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


def state_is(client, token, exp_id, *states):
    def check():
        body = get(client, token, exp_id)
        return body if body["state"] in states else None

    return check


def sse_events(client: httpx.Client, token: str, exp_id: str, timeout_s: float) -> list[tuple[str, dict]]:
    """Read the experiment's event stream until its `end` event."""
    events: list[tuple[str, dict]] = []
    kind = None
    deadline = time.monotonic() + timeout_s
    with client.stream(
        "GET",
        f"/v1/experiments/{exp_id}/events",
        headers=auth(token),
        timeout=httpx.Timeout(10, read=timeout_s),
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event:"):
                kind = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and kind:
                events.append((kind, json.loads(line.split(":", 1)[1])))
                if kind == "end":
                    return events
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no `end` event within {timeout_s} s; got {events}")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_lbgat_digits_runs_to_success_with_metrics_results_and_checkpoint(
    service: LocalService, service_env, tmp_path
):
    admin = service_env["LBGAT_ADMIN_TOKEN"]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        exp = submit(client, admin, digits_spec("e2e-lbgat"))
        assert exp["state"] in ("queued", "dispatching")
        assert exp["method"] == "lbgat" and exp["dataset"] == "digits"

        events = sse_events(client, admin, exp["id"], timeout_s=240)
        states = [e[1]["to"] for e in events if e[0] == "state"]
        assert states[0] == "queued" and states[-1] == "succeeded", (states, service.log_tail())
        assert {"dispatching", "running"} <= set(states)
        epochs = [e[1]["epoch"] for e in events if e[0] == "metric"]
        assert epochs == [1, 2, 3]
        assert events[-1] == ("end", {"state": "succeeded"}) or events[-1][1].get("state") == "succeeded"

        body = get(client, admin, exp["id"])
        assert body["state"] == "succeeded" and body["attempts"] == 1
        assert [m["epoch"] for m in body["metrics"]] == [1, 2, 3]
        assert all(0 <= m["train_adv_accuracy"] <= 1 for m in body["metrics"])
        assert body["dashboard_url"].endswith(f"/#/jobs/{exp['id']}-a1")
        results = body["results"]
        assert results["clean_accuracy"] > 0.5
        assert 0 < results["autoattack_accuracy"] <= results["clean_accuracy"]
        assert results["robust_accuracy"] <= results["autoattack_accuracy"] + 1e-9
        assert set(results["attacks"]) >= {"pgd10"}

        board = client.get(
            "/v1/results/leaderboard", params={"dataset": "digits"}, headers=auth(admin)
        ).json()
        assert [row["experiment_id"] for row in board] == [exp["id"]]
        assert board[0]["autoattack_accuracy"] == results["autoattack_accuracy"]

        listing = client.get(f"/v1/experiments/{exp['id']}/artifacts", headers=auth(admin)).json()
        paths = {a["path"] for a in listing}
        assert {"spec.json", "main/metrics.jsonl", "main/summary.json", "main/checkpoints/last.pt"} <= paths
        r = client.get(f"/v1/experiments/{exp['id']}/artifacts/main/checkpoints/last.pt", headers=auth(admin))
        assert r.status_code == 200 and len(r.content) == next(
            a["size"] for a in listing if a["path"] == "main/checkpoints/last.pt"
        )
        from trainer.checkpoint import read_checkpoint

        (tmp_path / "last.pt").write_bytes(r.content)
        payload = read_checkpoint(tmp_path / "last.pt")  # the trainer's safe loader reads what workers wrote
        assert payload["epoch"] == 3

        logs = client.get(f"/v1/experiments/{exp['id']}/logs", headers=auth(admin))
        assert logs.status_code == 200 and exp["id"] in logs.text


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_cancel_a_running_job_stops_its_ray_job(service: LocalService, service_env, ray_cluster):
    admin = service_env["LBGAT_ADMIN_TOKEN"]
    with httpx.Client(base_url=service.url, timeout=30) as client:
        exp = submit(client, admin, digits_spec("e2e-cancel", "optimization.epochs=200"))
        running = wait_for(state_is(client, admin, exp["id"], "running"), timeout_s=90, what="running")
        r = client.post(f"/v1/experiments/{exp['id']}/cancel", headers=auth(admin))
        assert r.status_code in (200, 202), r.text
        final = wait_for(state_is(client, admin, exp["id"], "cancelled"), timeout_s=60, what="cancelled")
        assert final["finished_at"] is not None

    from ray.job_submission import JobSubmissionClient

    status = JobSubmissionClient(ray_cluster).get_job_status(running["ray_job_id"])
    assert str(status.value) == "STOPPED"


def test_restart_finds_queued_and_running_jobs_and_never_submits_twice(service_env, tmp_path, ray_cluster):
    """Kill -9 the service while one job runs and two wait; a new process finds all three in the right
    state, keeps the running one, dispatches the others in order, and Ray saw one submission each."""
    env = {**service_env, "LBGAT_WORKER_ENTRYPOINT": SLEEP.format(seconds=6)}
    admin = env["LBGAT_ADMIN_TOKEN"]
    first = LocalService(env, tmp_path / "first.log").start()
    try:
        with httpx.Client(base_url=first.url, timeout=30) as client:
            ids = [submit(client, admin, sleep_spec(f"restart-{i}"))["id"] for i in range(3)]
            wait_for(state_is(client, admin, ids[0], "running"), timeout_s=60, what="first job running")
            assert [get(client, admin, i)["state"] for i in ids[1:]] == ["queued", "queued"]
    finally:
        first.kill()

    second = LocalService(env, tmp_path / "second.log").start()
    try:
        with httpx.Client(base_url=second.url, timeout=30) as client:
            states = [get(client, admin, i)["state"] for i in ids]
            assert states[0] in ("running", "succeeded") and states[1:] in (
                ["queued", "queued"],
                ["dispatching", "queued"],
                ["running", "queued"],
            )
            for exp_id in ids:
                wait_for(
                    state_is(client, admin, exp_id, "succeeded"), timeout_s=90, what=f"{exp_id} succeeded"
                )
            details = [get(client, admin, i) for i in ids]
    finally:
        second.stop()
    starts = [d["started_at"] for d in details]
    assert starts == sorted(starts)  # FIFO for one user
    assert all(d["attempts"] == 1 for d in details)

    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_cluster).list_jobs()
    for exp_id in ids:
        assert [j.submission_id for j in jobs if (j.metadata or {}).get("lbgat_experiment") == exp_id] == [
            f"{exp_id}-a1"
        ]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_fair_share_orders_two_users_jobs(service_env, tmp_path):
    """One slot; alice queues three jobs, then bob one. Bob's job runs second, not fourth.
    Only the order matters here, so the jobs sleep instead of training."""
    env = {**service_env, "LBGAT_WORKER_ENTRYPOINT": SLEEP.format(seconds=4)}
    admin = env["LBGAT_ADMIN_TOKEN"]
    service = LocalService(env, tmp_path / "service.log").start()
    try:
        started = _fair_share_run(service, admin)
    finally:
        service.stop()
    alice, bob = started["alice"], started["bob"]
    order = sorted([*alice, *bob], key=lambda i: started["at"][i])
    assert order == [alice[0], bob[0], alice[1], alice[2]]


def _fair_share_run(service: LocalService, admin: str) -> dict:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        tokens = {}
        for name, team in (("alice", "vision"), ("bob", "robustness")):
            r = client.post("/v1/users", json={"name": name, "team": team}, headers=auth(admin))
            assert r.status_code == 201, r.text
            tokens[name] = r.json()["token"]["token"]
        # hold the only slot with a job of the admin so the queue builds up behind it
        blocker = submit(client, admin, sleep_spec("blocker"))
        wait_for(
            state_is(client, admin, blocker["id"], "dispatching", "running"), timeout_s=60, what="blocker"
        )
        alice = [submit(client, tokens["alice"], sleep_spec(f"alice-{i}"))["id"] for i in range(3)]
        bob = submit(client, tokens["bob"], sleep_spec("bob-0"))["id"]
        queue = {i: get(client, admin, i)["queue"] for i in [*alice, bob]}
        assert queue[alice[0]]["position"] == 1
        assert queue[bob]["position"] == 2  # fair share puts bob right after alice's first job
        assert "slots are busy" in queue[alice[1]]["reason"]
        ids = [*alice, bob]
        for exp_id in ids:
            wait_for(state_is(client, admin, exp_id, "succeeded"), timeout_s=120, what=f"{exp_id} succeeded")
        return {"alice": alice, "bob": [bob], "at": {i: get(client, admin, i)["started_at"] for i in ids}}
