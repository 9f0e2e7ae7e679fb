"""The scheduler loop against a real database (SQLite and PostgreSQL) and the session's real local Ray:
dispatch, retries with the failure's reason, lost submissions, and two replicas sharing one queue."""

from __future__ import annotations

import shlex
import sys
import threading
import time

import pytest
from sqlalchemy import select

from api_schemas import parse_spec
from api_schemas.jobs import JobState
from api_schemas.presets import get_preset
from service.auth import create_user
from service.db.engine import make_engine, run_tx, session_factory
from service.db.migrate import upgrade
from service.db.models import Event, Experiment, User
from service.jobs import create_experiment, retry_experiment, transition
from service.ray_jobs import RayJobs
from service.scheduler import Scheduler
from service.settings import ServiceSettings
from workers.settings import StoreSettings
from workers.storage import LocalStore

PY = shlex.quote(sys.executable)


def settings_for(database_url: str, ray: str, entrypoint: str, **extra) -> ServiceSettings:
    values = dict(
        database_url=database_url,
        ray_address=ray,
        worker_entrypoint=entrypoint,
        poll_interval_s=0.1,
        max_running_jobs=4,
        user_max_running_jobs=4,
        lost_job_grace_s=1.0,
    )
    return ServiceSettings(_env_file=None, **{**values, **extra})  # type: ignore[call-arg]


@pytest.fixture
def queue(database_url, tmp_path):
    engine = make_engine(database_url)
    upgrade(engine)
    sessions = session_factory(engine)
    owner = run_tx(sessions, lambda s: create_user(s, name="alice", team="vision"))
    store_settings = StoreSettings(_env_file=None, artifact_store=f"file://{tmp_path / 'store'}")  # type: ignore[call-arg]
    yield sessions, owner, LocalStore(store_settings.local_root), store_settings
    engine.dispose()


def enqueue(sessions, owner, settings, name: str, **extra) -> str:
    spec = parse_spec(
        get_preset("digits", [f"name={name}", "resources.cpus_per_worker=1"]).model_dump(mode="json")
    )
    return run_tx(
        sessions, lambda s: create_experiment(s, owner=owner, spec=spec, settings=settings, **extra)[0].id
    )


def run_until(scheduler: Scheduler, sessions, done, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        scheduler.run_round()
        with sessions() as s:
            rows = {e.id: e for e in s.scalars(select(Experiment))}
        if done(rows):
            return rows
        time.sleep(0.1)
    raise AssertionError(f"not done after {timeout_s} s: {[(e.id, e.state, e.error) for e in rows.values()]}")


def states(sessions, exp_id: str) -> list[str]:
    with sessions() as s:
        events = s.scalars(
            select(Event).where(Event.experiment_id == exp_id, Event.kind == "state").order_by(Event.id)
        )
        return [e.data["to"] for e in events]


def test_failed_attempt_is_retried_then_fails_with_the_reason(queue, database_url, ray_cluster):
    sessions, owner, store, store_settings = queue
    entry = f"{PY} -c \"import sys; print('error: loss is NaN at epoch 3', file=sys.stderr); sys.exit(1)\""
    settings = settings_for(database_url, ray_cluster, entry)
    exp_id = enqueue(sessions, owner, settings, "failing", max_attempts=2)
    scheduler = Scheduler(
        sessions=sessions,
        settings=settings,
        store=store,
        ray=RayJobs(ray_cluster),
        store_settings=store_settings,
    )
    rows = run_until(scheduler, sessions, lambda r: r[exp_id].state == "failed")
    exp = rows[exp_id]
    assert exp.attempts == 2 and exp.ray_job_id == f"{exp_id}-a2"
    assert exp.error == "error: loss is NaN at epoch 3"  # the worker's error line, alone
    assert "error: loss is NaN at epoch 3" in exp.error_log_tail
    # each attempt may or may not be seen running before it fails, depending on the rounds' timing
    assert [s for s in states(sessions, exp_id) if s != "running"] == [
        "queued",
        "dispatching",
        "retrying",
        "dispatching",
        "failed",
    ]
    # the spec the worker reads was written before the submission
    assert store.get_json(f"experiments/{exp_id}/spec.json")["name"] == "failing"

    # a manual retry restarts the attempt budget but never reuses a Ray submission id: Ray keeps
    # the old runs, and would answer for them
    run_tx(sessions, lambda s: retry_experiment(s, s.get(Experiment, exp_id), user=s.get(User, owner.id)))
    rows = run_until(scheduler, sessions, lambda r: r[exp_id].state == "failed")
    assert rows[exp_id].attempts == 2 and rows[exp_id].ray_job_id == f"{exp_id}-a4"
    assert RayJobs(ray_cluster).state(f"{exp_id}-a3").status == "FAILED"


def test_a_claimed_job_whose_submission_was_lost_is_submitted_again(queue, database_url, ray_cluster):
    """The service died between claiming a job (dispatching) and submitting it to Ray."""
    sessions, owner, store, store_settings = queue
    settings = settings_for(database_url, ray_cluster, f"{PY} -c pass")
    exp_id = enqueue(sessions, owner, settings, "lost")

    def claim(s):
        exp = s.get(Experiment, exp_id)
        from service.db.models import utcnow

        transition(
            s, exp, JobState.dispatching, attempts=1, ray_job_id=f"{exp_id}-a1", dispatched_at=utcnow()
        )

    run_tx(sessions, claim)
    scheduler = Scheduler(
        sessions=sessions,
        settings=settings,
        store=store,
        ray=RayJobs(ray_cluster),
        store_settings=store_settings,
    )
    rows = run_until(scheduler, sessions, lambda r: r[exp_id].state == "succeeded")
    assert rows[exp_id].attempts == 1
    from ray.job_submission import JobSubmissionClient

    assert JobSubmissionClient(ray_cluster).get_job_status(f"{exp_id}-a1").value == "SUCCEEDED"


def test_two_replicas_never_dispatch_a_job_twice(queue, database_url, ray_cluster):
    sessions, owner, store, store_settings = queue
    settings = settings_for(database_url, ray_cluster, f"{PY} -c pass", max_running_jobs=2)
    ids = [enqueue(sessions, owner, settings, f"replica-{i}") for i in range(4)]
    replicas = [
        Scheduler(
            sessions=sessions,
            settings=settings,
            store=store,
            ray=RayJobs(ray_cluster),
            store_settings=store_settings,
        )
        for _ in range(2)
    ]
    stop = threading.Event()
    errors: list[BaseException] = []

    def spin(scheduler: Scheduler) -> None:
        while not stop.is_set():
            try:
                scheduler.run_round()
            except BaseException as exc:  # surfaced below
                errors.append(exc)
                return

    threads = [threading.Thread(target=spin, args=(r,)) for r in replicas]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with sessions() as s:
                done = {e.id: e for e in s.scalars(select(Experiment))}
                active = sum(e.state in ("dispatching", "running") for e in done.values())
            assert active <= 2, "more jobs dispatched than LBGAT_MAX_RUNNING_JOBS"
            if all(e.state == "succeeded" for e in done.values()):
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors
    assert all(done[i].state == "succeeded" and done[i].attempts == 1 for i in ids), [
        (e.id, e.state, e.attempts) for e in done.values()
    ]
    for exp_id in ids:
        assert states(sessions, exp_id).count("dispatching") == 1
    from ray.job_submission import JobSubmissionClient

    submitted = [j.submission_id for j in JobSubmissionClient(ray_cluster).list_jobs()]
    for exp_id in ids:
        assert submitted.count(f"{exp_id}-a1") == 1 and f"{exp_id}-a2" not in submitted


@pytest.mark.parametrize("entrypoint", ["{python} -m workers.run --job {job}", "{python} {0}", "{python"])
def test_a_worker_entrypoint_with_unknown_placeholders_is_refused_at_start(entrypoint: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ServiceSettings(_env_file=None, worker_entrypoint=entrypoint)  # type: ignore[call-arg]
    (error,) = info.value.errors()
    assert error["loc"] == ("worker_entrypoint",) and "{python} and {job_id}" in error["msg"]
