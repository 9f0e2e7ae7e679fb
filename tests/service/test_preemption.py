"""Preemption and start-time estimates through the scheduler loop, on a real database (SQLite and
PostgreSQL): with a fake Ray (scripted job states and capacity) for the decision, the victim's way back
to the queue and the estimates' scenario, and on the session's real local Ray for one preemption of a
job whose entrypoint traps SIGTERM and writes preempted.json as the worker does."""

from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from api_schemas import parse_spec
from api_schemas.presets import get_preset
from service.auth import create_user
from service.db.engine import make_engine, run_tx, session_factory
from service.db.migrate import upgrade
from service.db.models import Event, Experiment, StartEstimate, utcnow
from service.jobs import create_experiment
from service.ray_jobs import Capacity, RayJobs
from service.scheduler import Plan, Scheduler
from service.settings import ServiceSettings
from tests.service.fake_ray import FakeRay
from tests.waiting import wait_for
from workers.settings import StoreSettings
from workers.storage import LocalStore

PY = shlex.quote(sys.executable)


def settings_for(database_url: str, **extra) -> ServiceSettings:
    values = dict(
        database_url=database_url,
        ray_address="http://fake:8265",
        poll_interval_s=0.1,
        max_running_jobs=4,
        user_max_running_jobs=4,
        preemption_enabled=True,
        preempt_min_priority=1,
        preempt_min_run_s=0,
        preemption_grace_s=7,
        metrics_interval_s=0.01,
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


def enqueue(sessions, owner, settings, name: str, *overrides: str, **extra) -> str:
    spec = parse_spec(
        get_preset("digits", [f"name={name}", "resources.cpus_per_worker=1", *overrides]).model_dump(
            mode="json"
        )
    )
    return run_tx(
        sessions, lambda s: create_experiment(s, owner=owner, spec=spec, settings=settings, **extra)[0].id
    )


def rows(sessions) -> dict[str, Experiment]:
    with sessions() as s:
        return {e.id: e for e in s.scalars(select(Experiment))}


def reasons(sessions, exp_id: str) -> list[tuple[str | None, str, str | None]]:
    with sessions() as s:
        events = s.scalars(
            select(Event).where(Event.experiment_id == exp_id, Event.kind == "state").order_by(Event.id)
        )
        return [(e.data.get("from"), e.data["to"], e.data.get("reason")) for e in events]


def test_a_high_priority_job_preempts_and_the_victim_resumes(queue, database_url):
    sessions, owner, store, store_settings = queue
    settings = settings_for(database_url)
    ray = FakeRay(Capacity(gpus=0, cpus=1, nodes=1))
    scheduler = Scheduler(
        sessions=sessions, settings=settings, store=store, ray=ray, store_settings=store_settings
    )  # type: ignore[arg-type]

    low = enqueue(sessions, owner, settings, "low")
    scheduler.run_round()
    scheduler.run_round()
    assert rows(sessions)[low].state == "running"
    assert ray.env[f"{low}-a1"]["RAY_JOB_STOP_WAIT_TIME_S"] == "7"
    assert ray.env[f"{low}-a1"]["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "0.5"  # the GPU freed sooner
    # an epoch with a checkpoint: last_checkpoint_at comes from the metrics row
    ckpt = time.time() - 5
    store.put_bytes(
        f"experiments/{low}/main/metrics.jsonl",
        (
            json.dumps(
                {
                    "epoch": 1,
                    "loss": 1.0,
                    "lr": 0.1,
                    "images_per_second": 1,
                    "seconds": 3,
                    "checkpoint_at": ckpt,
                }
            )
            + "\n"
        ).encode(),
    )
    scheduler.run_round()
    assert abs(rows(sessions)[low].last_checkpoint_at.timestamp() - ckpt) < 1e-3

    high = enqueue(sessions, owner, settings, "high", priority=5)
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[low].state == "running" and exp[low].preempted_by == high
    assert exp[low].preempt_requested_at is not None
    assert reasons(sessions, low)[-1][:2] == ("running", "running")
    assert reasons(sessions, low)[-1][2].startswith(f"preempting for {high}")
    # the hand-over: the preemptor is submitted in the decision's round, right after the victim's
    # stop, while the victim's Ray job still runs (Ray starts its workers once the victim releases)
    assert ray.calls == [("submit", f"{low}-a1"), ("stop", f"{low}-a1"), ("submit", f"{high}-a1")]
    assert ray.status[f"{low}-a1"] == "RUNNING"
    assert exp[high].state in ("dispatching", "running") and exp[high].ray_job_id == f"{high}-a1"
    dispatching = next(r for r in reasons(sessions, high) if r[1] == "dispatching")[2]
    assert f"on what {low} frees (preempted" in dispatching
    assert high not in scheduler.queue_view([])

    # still stopping: no second decision; the victim's CPU is the preemptor's, so a job arriving
    # now waits (the one CPU is not free twice)
    other = enqueue(sessions, owner, settings, "other")
    scheduler.run_round()
    scheduler.run_round()
    exp = rows(sessions)
    assert ray.stopped == [f"{low}-a1"] and exp[high].state == "running" and exp[other].state == "queued"
    assert "0 CPUs are free" in scheduler.queue_view([other])[other][1]
    assert (
        reasons(sessions, high)[-1][2]
        == f"Ray job running; its workers start as {low} release their resources"
    )

    # the entrypoint saved its checkpoint and exited; Ray says STOPPED
    saved = time.time() - 1
    store.put_json(f"experiments/{low}/main/preempted.json", {"saved_at": saved, "epoch": 1, "step": 7})
    ray.status[f"{low}-a1"] = "STOPPED"
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[low].state == "queued"
    assert exp[low].attempts == 0 and exp[low].preemptions == 1  # not charged
    assert exp[low].preempt_requested_at is None
    assert abs(exp[low].last_checkpoint_at.timestamp() - saved) < 1e-3
    assert exp[low].lost_gpu_seconds >= 0
    assert reasons(sessions, low)[-1][:2] == ("running", "queued")
    assert reasons(sessions, low)[-1][2] == f"preempted by {high}; resumes from its just-in-time checkpoint"
    assert exp[high].state == "running" and exp[other].state == "queued"  # the CPU is still high's
    assert [c for c in ray.calls if c[0] == "submit"] == [("submit", f"{low}-a1"), ("submit", f"{high}-a1")]

    ray.status[f"{high}-a1"] = "SUCCEEDED"
    scheduler.run_round()
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[high].state == "succeeded"
    assert exp[low].state == "running" and exp[low].ray_job_id == f"{low}-a2" and exp[low].attempts == 1
    assert exp[other].state == "queued"  # the freed CPU went to one job: the older one
    ray.status[f"{low}-a2"] = "SUCCEEDED"
    scheduler.run_round()
    assert rows(sessions)[low].state == "succeeded"


def start_preemption(queue, settings) -> tuple[Scheduler, FakeRay, str, str]:
    """One CPU: a low-priority job runs, a high-priority one arrives and the decision's round
    submits it; returns (scheduler, Ray, low, high)."""
    sessions, owner, store, store_settings = queue
    ray = FakeRay(Capacity(gpus=0, cpus=1, nodes=1))
    scheduler = Scheduler(
        sessions=sessions, settings=settings, store=store, ray=ray, store_settings=store_settings
    )  # type: ignore[arg-type]
    low = enqueue(sessions, owner, settings, "low")
    scheduler.run_round()
    scheduler.run_round()
    assert rows(sessions)[low].state == "running"
    high = enqueue(sessions, owner, settings, "high", priority=5)
    return scheduler, ray, low, high


def test_a_victim_that_ignores_the_stop_is_stopped_again_after_the_grace(queue, database_url):
    """The victim's Ray job still runs past grace + margin (its entrypoint ignored SIGTERM and Ray
    did not kill it): the scheduler stops it again, once per grace period. Its preemptor, submitted
    at the decision, keeps the victim's resources meanwhile, and no other job is admitted on them."""
    sessions, owner, _store, _ = queue
    settings = settings_for(database_url, preemption_grace_s=60, preemption_stop_margin_s=30)
    scheduler, ray, low, high = start_preemption(queue, settings)
    scheduler.run_round()
    scheduler.run_round()
    assert ray.stopped == [f"{low}-a1"]  # within grace + margin: asked once
    assert rows(sessions)[high].state == "running"

    # asked 100 s ago, past 60 + 30: stopped again, once per grace period
    asked = utcnow() - timedelta(seconds=100)
    run_tx(
        sessions,
        lambda s: s.execute(
            update(Experiment).where(Experiment.id == low).values(preempt_requested_at=asked)
        ),
    )
    other = enqueue(sessions, owner, settings, "other")
    scheduler.run_round()
    scheduler.run_round()
    exp = rows(sessions)
    assert ray.stopped == [f"{low}-a1", f"{low}-a1"]
    assert exp[low].state == "running" and exp[high].state == "running" and exp[other].state == "queued"

    # Ray kills it at last, before it saved anything: back in the queue, from its last checkpoint
    ray.status[f"{low}-a1"] = "STOPPED"
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[low].state == "queued" and exp[low].attempts == 0 and exp[low].preemptions == 1
    assert reasons(sessions, low)[-1][2] == (
        f"preempted by {high}; no just-in-time checkpoint was saved, resumes from its last checkpoint"
    )
    assert exp[high].state == "running" and exp[other].state == "queued"


def test_a_victim_that_ray_calls_succeeded_goes_back_to_the_queue_if_it_checkpointed(queue, database_url):
    """Ray reports a stopped job SUCCEEDED when its entrypoint exits 0 on SIGTERM before the job
    supervisor records the stop: with a preempted.json saved after the request the victim was
    preempted (back to the queue, not charged); without one it really finished."""
    sessions, _owner, store, _ = queue
    scheduler, ray, low, high = start_preemption(queue, settings_for(database_url))
    scheduler.run_round()
    assert rows(sessions)[low].preempt_requested_at is not None
    store.put_json(f"experiments/{low}/main/preempted.json", {"saved_at": time.time(), "epoch": 0, "step": 3})
    ray.status[f"{low}-a1"] = "SUCCEEDED"
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[low].state == "queued" and exp[low].attempts == 0 and exp[low].preemptions == 1
    assert reasons(sessions, low)[-1][2] == f"preempted by {high}; resumes from its just-in-time checkpoint"

    # its next run is asked to stop too (a third job, higher still), but finishes first: the only
    # marker is the first run's (a minute old by then), so it succeeded
    store.put_json(
        f"experiments/{low}/main/preempted.json", {"saved_at": time.time() - 60, "epoch": 0, "step": 3}
    )
    ray.status[f"{high}-a1"] = "SUCCEEDED"
    scheduler.run_round()
    scheduler.run_round()
    assert rows(sessions)[low].state == "running"
    top = enqueue(sessions, _owner, settings_for(database_url), "top", priority=9)
    scheduler.run_round()
    assert rows(sessions)[low].preempted_by == top
    ray.status[f"{low}-a2"] = "SUCCEEDED"
    scheduler.run_round()
    assert rows(sessions)[low].state == "succeeded"


def test_a_preemptor_whose_submission_failed_is_dispatched_again_on_its_victim(queue, database_url):
    """Ray refuses the preemptor's submission in the decision's round: it goes back to the queue,
    the decision stands (the victim stops, once), and the next round submits it again on the
    victim's resources, without a second decision."""
    sessions = queue[0]
    scheduler, ray, low, high = start_preemption(queue, settings_for(database_url))
    ray.refuse.add(f"{high}-a1")
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[high].state == "queued" and exp[low].preempted_by == high
    assert reasons(sessions, high)[-1][2].startswith("submission failed, will try again")
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[high].state == "running" and exp[low].state == "running"
    assert ray.calls == [("submit", f"{low}-a1"), ("stop", f"{low}-a1"), ("submit", f"{high}-a1")]


def test_rounds_come_quickly_while_a_victim_stops(queue, database_url):
    """The pause before the next round: the poll interval, but short while a victim is stopping
    (it goes back to the queue as soon as Ray says it ended)."""
    sessions = queue[0]
    scheduler, ray, low, high = start_preemption(queue, settings_for(database_url, poll_interval_s=2))
    assert scheduler._pause() == 2
    scheduler.run_round()
    assert rows(sessions)[high].state == "running"
    assert scheduler._pause() == 0.25
    ray.status[f"{low}-a1"] = "STOPPED"
    scheduler.run_round()
    assert rows(sessions)[low].state == "queued"
    assert scheduler._pause() == 2


def test_no_preemption_while_off_or_for_equal_priority(queue, database_url):
    sessions, owner, store, store_settings = queue
    settings = settings_for(database_url, preemption_enabled=False)
    ray = FakeRay(Capacity(gpus=0, cpus=1, nodes=1))
    scheduler = Scheduler(
        sessions=sessions, settings=settings, store=store, ray=ray, store_settings=store_settings
    )  # type: ignore[arg-type]
    low = enqueue(sessions, owner, settings, "low")
    scheduler.run_round()
    high = enqueue(sessions, owner, settings, "high", priority=5)
    scheduler.run_round()
    assert ray.stopped == [] and rows(sessions)[low].preempt_requested_at is None
    assert "waits for" in scheduler.queue_view([high])[high][1]


def test_a_worker_that_stops_for_a_drained_node_goes_back_uncharged(queue, database_url):
    """The entrypoint exits with workers.run's EXIT_PREEMPTED (4) without the scheduler asking."""
    sessions, owner, store, store_settings = queue
    settings = settings_for(database_url)
    ray = FakeRay(Capacity(gpus=0, cpus=1, nodes=1))
    scheduler = Scheduler(
        sessions=sessions, settings=settings, store=store, ray=ray, store_settings=store_settings
    )  # type: ignore[arg-type]
    job = enqueue(sessions, owner, settings, "drained")
    scheduler.run_round()
    scheduler.run_round()
    store.put_json(f"experiments/{job}/main/preempted.json", {"saved_at": time.time(), "epoch": 0, "step": 2})
    ray.status[f"{job}-a1"], ray.exit_codes[f"{job}-a1"] = "FAILED", 4
    scheduler.run_round()
    exp = rows(sessions)[job]
    assert exp.state in ("queued", "dispatching", "running") and exp.preemptions == 1
    assert ("running", "queued") in [r[:2] for r in reasons(sessions, job)]
    why = next(r[2] for r in reasons(sessions, job) if r[:2] == ("running", "queued"))
    assert why.startswith("preempted (") and why.endswith("resumes from its just-in-time checkpoint")
    assert exp.ray_job_id == f"{job}-a2" or exp.state == "queued"


def read_metrics(scheduler: Scheduler, sessions, exp_id: str, rows: int, timeout_s: float = 30) -> None:
    """Run rounds until the scheduler has read `rows` metrics rows of `exp_id` (on a loaded machine
    a slow store probe can hold the reading back for a round or two)."""

    def seen() -> bool:
        scheduler.run_round()
        with sessions() as s:
            count = s.scalar(
                select(func.count())
                .select_from(Event)
                .where(Event.experiment_id == exp_id, Event.kind == "metric")
            )
        return count >= rows

    wait_for(seen, timeout_s=timeout_s, what=f"{rows} metrics rows of {exp_id} read", interval_s=0.1)


def test_estimated_starts_for_a_scripted_queue(queue, database_url):
    """One slot. The running job has 10 epochs of 60 s, 4 done; two jobs wait (unknown durations:
    the default, 1000 s). Expected starts: in 6 x 60 s, then 1000 s later; stated error: 5 s."""
    sessions, owner, store, store_settings = queue
    settings = settings_for(
        database_url,
        preemption_enabled=False,
        max_running_jobs=1,
        estimate_default_duration_s=1000,
        estimate_record_threshold_s=30,
    )
    ray = FakeRay(Capacity(gpus=0, cpus=8, nodes=1))
    scheduler = Scheduler(
        sessions=sessions, settings=settings, store=store, ray=ray, store_settings=store_settings
    )  # type: ignore[arg-type]
    running = enqueue(
        sessions, owner, settings, "running", "optimization.epochs=10", "optimization.schedule.milestones=[8]"
    )
    scheduler.run_round()
    scheduler.run_round()
    lines = [
        {"epoch": e, "loss": 1.0, "lr": 0.1, "images_per_second": 1, "seconds": 60.0} for e in range(1, 5)
    ]
    store.put_bytes(
        f"experiments/{running}/main/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in lines).encode()
    )
    read_metrics(scheduler, sessions, running, 4)
    first = enqueue(sessions, owner, settings, "first")
    second = enqueue(sessions, owner, settings, "second")
    before = utcnow()
    scheduler.run_round()
    view = scheduler.queue_view([first, second])
    assert [view[first][0], view[second][0]] == [1, 2]
    start1, start2 = view[first][2], view[second][2]
    assert abs((start1 - (before + timedelta(seconds=360))).total_seconds()) < 5
    assert abs((start2 - start1).total_seconds() - 1000) < 1
    assert abs((scheduler.expected_ends()[running] - start1).total_seconds()) < 1

    # recorded: estimated_start_at, and one StartEstimate row per job until the estimate moves
    scheduler.run_round()
    with sessions() as s:
        made = s.execute(select(StartEstimate.experiment_id, StartEstimate.position)).all()
        stored = s.get(Experiment, first).estimated_start_at
    assert sorted(made) == sorted([(first, 1), (second, 2)])
    assert abs((stored - start1).total_seconds()) < 5
    # the next epochs take 200 s each (the estimate averages the latest 5): 1 epoch left after the
    # ninth, so the estimate moves to 200 s from now, past the threshold: a second row
    slower = lines + [
        {"epoch": e, "loss": 1.0, "lr": 0.1, "images_per_second": 1, "seconds": 200.0} for e in range(5, 10)
    ]
    store.put_bytes(
        f"experiments/{running}/main/metrics.jsonl", "".join(json.dumps(r) + "\n" for r in slower).encode()
    )
    read_metrics(scheduler, sessions, running, 9)
    scheduler.run_round()
    with sessions() as s:
        firsts = s.scalars(
            select(StartEstimate).where(StartEstimate.experiment_id == first).order_by(StartEstimate.id)
        ).all()
    assert len(firsts) == 2
    assert abs((firsts[1].estimated_start - firsts[1].made_at).total_seconds() - 200) < 5
    # the error, once it starts, is started_at - estimated_start
    ray.status[f"{running}-a1"] = "SUCCEEDED"
    scheduler.run_round()
    scheduler.run_round()
    exp = rows(sessions)
    assert exp[first].state == "running"
    error = (exp[first].started_at - firsts[-1].estimated_start).total_seconds()
    assert error < 0  # it ended early: the job started before its estimate


def test_estimates_sliding_behind_an_overrunning_job_add_few_rows(queue, database_url):
    """Behind a job that overruns its estimate, a waiting job's estimate moves with the clock every
    round. The shown estimate follows (moves past the threshold), but StartEstimate rows are added
    only when it moves threshold x 2^(k-1) from the job's last row: about log2(wait / threshold)."""
    sessions, owner, store, store_settings = queue
    settings = settings_for(database_url, estimate_record_threshold_s=60)
    scheduler = Scheduler(
        sessions=sessions,
        settings=settings,
        store=store,
        ray=FakeRay(Capacity(gpus=0, cpus=8, nodes=1)),
        store_settings=store_settings,
    )  # type: ignore[arg-type]
    job = enqueue(sessions, owner, settings, "waiting")
    start = utcnow()
    for minute in range(0, 24 * 60, 2):  # a day of rounds, the estimate 2 minutes later each time
        estimate = start + timedelta(minutes=minute + 5)
        plan = Plan(waiting={job: (1, "waiting for a slot")}, estimates={job: estimate})
        run_tx(sessions, lambda s, plan=plan: scheduler._record_estimates(s, plan))
    with sessions() as s:
        made = s.scalars(select(StartEstimate).where(StartEstimate.experiment_id == job)).all()
        shown = s.get(Experiment, job).estimated_start_at
    assert 8 <= len(made) <= 12  # 720 rounds; 1 + log2(1440 min / 1 min) rows
    assert abs((shown - (start + timedelta(minutes=24 * 60 - 2 + 5))).total_seconds()) <= 60


SIGTERM_ENTRYPOINT = r"""
import json, os, pathlib, signal, sys, time
exp = os.environ["LBGAT_EXPERIMENT_ID"]
root = pathlib.Path(os.environ["LBGAT_ARTIFACT_STORE"].removeprefix("file://")) / "experiments" / exp
name = json.loads((root / "spec.json").read_text())["name"]
marker = root / "main" / "preempted.json"
def stop(*_):
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"saved_at": time.time(), "epoch": 0, "step": 3}))
    print("preempted: checkpoint saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
if name.startswith("low") and not marker.exists():
    time.sleep(120)
    sys.exit(3)
time.sleep(1)
"""


def test_preemption_on_a_real_ray_job(queue, database_url, ray_cluster, tmp_path):
    sessions, owner, store, store_settings = queue
    script = tmp_path / "entry.py"
    script.write_text(SIGTERM_ENTRYPOINT)
    settings = settings_for(
        database_url,
        ray_address=ray_cluster,
        worker_entrypoint=f"{PY} {shlex.quote(str(script))} {{job_id}}",
        max_running_jobs=1,
        preemption_grace_s=10,
        preempt_min_run_s=2,  # the entrypoint has installed its SIGTERM handler by then
    )
    scheduler = Scheduler(
        sessions=sessions,
        settings=settings,
        store=store,
        ray=RayJobs(ray_cluster),
        store_settings=store_settings,
    )

    def until(done, timeout_s: float = 60):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            scheduler.run_round()
            current = rows(sessions)
            if done(current):
                return current
            time.sleep(0.1)
        raise AssertionError(f"not done: {[(e.id, e.state, e.error) for e in rows(sessions).values()]}")

    low = enqueue(sessions, owner, settings, "low")
    until(lambda r: r[low].state == "running")
    high = enqueue(sessions, owner, settings, "high", priority=5)
    until(lambda r: r[low].state == "queued" and r[low].preemptions == 1)
    exp = rows(sessions)
    assert exp[low].attempts == 0
    assert store.get_json(f"experiments/{low}/main/preempted.json")["step"] == 3
    history = reasons(sessions, low)
    assert (
        "running",
        "queued",
        f"preempted by {high}; resumes from its just-in-time checkpoint",
    ) in history
    final = until(lambda r: r[low].state == "succeeded" and r[high].state == "succeeded")
    assert final[low].attempts == 1 and final[low].ray_job_id == f"{low}-a2"
    assert final[high].attempts == 1
    assert RayJobs(ray_cluster).state(f"{low}-a1").status == "STOPPED"
