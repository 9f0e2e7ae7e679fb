"""The service on a real multi-node Ray cluster (tests/conftest.py `ray_multinode`): a head with no
job resources and two worker nodes with 2 CPUs and one `fake_gpu` each, the custom resource standing
for a GPU (LBGAT_GPU_RESOURCE=fake_gpu): admission by the capacity the nodes report, preemption by a
higher-priority job, a node lost outright, a node drained (`ray drain-node`), and start estimates
against real starts."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from service.local_service import LocalService
from tests.e2e.test_service import get, sleep_spec, submit
from tests.waiting import wait_for

GPU = "fake_gpu"
# one process of a parallel run (pytest-xdist --dist loadgroup) runs them all: one cluster, not two
pytestmark = pytest.mark.xdist_group("multinode")

# A Ray job that holds one of the cluster's GPUs, as a training worker would: an actor asking for 1 CPU
# and 1 of LBGAT_GPU_RESOURCE (the name the service hands to its jobs); the driver prints the actor's
# node, then sleeps until the test cancels it. No braces: the service formats the entrypoint.
HOLD_GPU = (
    shlex.quote(sys.executable)
    + " -c "
    + shlex.quote(
        "import os, time, ray; ray.init(); name = os.environ['LBGAT_GPU_RESOURCE']\n"
        "class Holder:\n"
        "    def node(self): return ray.get_runtime_context().get_node_id()\n"
        "holder = ray.remote(Holder).options(num_cpus=1, resources=dict([(name, 1)])).remote()\n"
        "print('holding', name, 'on node', ray.get(holder.node.remote()), flush=True)\n"
        "time.sleep(600)"
    )
)


@pytest.fixture
def cluster(ray_multinode):
    """The session's cluster, its two worker nodes alive and taking work: a node that an earlier test
    killed or drained is replaced first (here rather than after that test: the last one pays for none)."""
    ray_multinode.replace_lost()
    return ray_multinode


def service_env(cluster, token: str, tmp_path: Path, admin: str, **settings: str) -> dict[str, str]:
    """A service on `cluster`: its own SQLite database and store under `tmp_path`, fast polling, the
    fake GPU resource; `settings` (LBGAT_ names) added or replacing these."""
    return {
        "LBGAT_DATABASE_URL": f"sqlite:///{tmp_path / 'lbgat.db'}",
        "LBGAT_ARTIFACT_STORE": f"file://{tmp_path / 'artifacts'}",
        "LBGAT_RAY_ADDRESS": cluster.head.dashboard_url,
        "LBGAT_RAY_AUTH_TOKEN": token,
        "LBGAT_GPU_RESOURCE": GPU,
        "LBGAT_ADMIN_TOKEN": admin,
        "LBGAT_WORKER_PYTHON": sys.executable,
        "LBGAT_POLL_INTERVAL_S": "0.2",
        "LBGAT_METRICS_INTERVAL_S": "0.5",
        "LBGAT_MAX_RUNNING_JOBS": "4",
        "LBGAT_USER_MAX_RUNNING_JOBS": "4",
        "OMP_NUM_THREADS": "1",
        **settings,
    }


def running_service(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[LocalService, dict]]:
    proc = LocalService(env, tmp_path / "service.log", cwd=tmp_path).start()
    try:
        yield proc, env
    finally:
        proc.stop()
        proc.kill()


@pytest.fixture
def multinode_service(cluster, ray_auth_token, tmp_path) -> Iterator[tuple[LocalService, dict]]:
    """Jobs that hold a fake GPU until cancelled (HOLD_GPU), one attempt each."""
    env = service_env(
        cluster,
        ray_auth_token,
        tmp_path,
        "lbg_admin_multinode_0123456789abcdef",
        LBGAT_WORKER_ENTRYPOINT=HOLD_GPU,
        LBGAT_LOST_JOB_GRACE_S="10",
        LBGAT_DEFAULT_MAX_ATTEMPTS="1",
    )
    yield from running_service(env, tmp_path)


def ray_job(cluster, exp_id: str):
    """The Ray job (JobDetails) the service submitted for an experiment, found by its metadata."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        cluster.head.dashboard_url, headers={"Authorization": f"Bearer {cluster.head.token}"}
    )
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("lbgat_experiment") == exp_id]
    return jobs[-1] if jobs else None


def test_jobs_are_admitted_by_the_capacity_the_nodes_report(cluster, multinode_service):
    """Two jobs needing one fake GPU each run at once, one on each worker node (their drivers on the
    head, which has no resources for jobs); the third waits for capacity with a reason that says so,
    and runs on the node that a cancelled one frees."""
    service, env = multinode_service
    headers = {"Authorization": f"Bearer {env['LBGAT_ADMIN_TOKEN']}"}
    admin = env["LBGAT_ADMIN_TOKEN"]
    head_id = next(n["node_id"] for n in cluster.head.nodes() if n["is_head_node"])
    workers = {n.node_id for n in cluster.nodes.values()}
    seen: list = []

    def states(client, ids):
        bodies = [get(client, admin, i) for i in ids]
        seen[:] = [(b["state"], (b["queue"] or {}).get("reason"), b["error"]) for b in bodies]
        return bodies

    def holding_node(client, exp_id: str) -> str | None:
        logs = client.get(f"/v1/experiments/{exp_id}/logs", headers=headers).text
        line = next((line for line in logs.splitlines() if line.startswith("holding ")), None)
        return line.rsplit(" ", 1)[1] if line else None

    with httpx.Client(base_url=service.url, timeout=30) as client:
        ids = [submit(client, admin, sleep_spec(f"mn-{i}"))["id"] for i in range(3)]
        first, second, third = ids

        def two_running_third_waiting():
            bodies = states(client, ids)
            running = [b["state"] == "running" for b in bodies[:2]]
            return bodies if all(running) and bodies[2]["state"] == "queued" and bodies[2]["queue"] else None

        bodies = wait_for(two_running_third_waiting, timeout_s=150, what=f"two running, one waiting ({seen})")
        assert [b["gpus"] for b in bodies] == [1, 1, 1]
        reason = bodies[2]["queue"]["reason"]
        assert "waits for 1 GPUs" in reason and "0 GPUs" in reason, reason

        nodes = {}
        for exp_id in (first, second):
            nodes[exp_id] = wait_for(
                lambda exp_id=exp_id: holding_node(client, exp_id), timeout_s=120, what=f"{exp_id} holding"
            )
            job = ray_job(cluster, exp_id)
            assert job is not None and job.driver_node_id == head_id
        assert set(nodes.values()) <= workers and nodes[first] != nodes[second], (nodes, workers)
        assert get(client, admin, third)["state"] == "queued"

        # a GPU frees: the third is admitted, on the node the first one held
        assert client.post(f"/v1/experiments/{first}/cancel", headers=headers).status_code == 202
        wait_for(
            lambda: states(client, ids)[2]["state"] == "running",
            timeout_s=120,
            what=f"the third running ({seen})",
        )
        node = wait_for(lambda: holding_node(client, third), timeout_s=120, what="the third holding")
        assert node == nodes[first]
        for exp_id in (second, third):
            client.post(f"/v1/experiments/{exp_id}/cancel", headers=headers)
        wait_for(
            lambda: all(b["state"] == "cancelled" for b in states(client, ids)),
            timeout_s=90,
            what=f"all cancelled ({seen})",
        )


# -- preemption on the cluster ------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
# A short digits run whose every step is cheap (3-step attack), checkpointing every epoch; its EMA too
TRAIN = [
    "optimization.epochs=3",
    "optimization.schedule.milestones=[2]",
    "optimization.weight_averaging={decay: 0.9}",
    "threat_model.steps=3",
    "runtime.progress=false",
    "runtime.device=cpu",
    "evaluation.attacks=[{kind: fgsm}]",
    "evaluation.n_examples=64",
    "evaluation.on_best=false",
    "checkpoint.every_n_epochs=1",
    "resources.cpus_per_worker=1",
]
TIMINGS = {"seconds", "images_per_second", "checkpoint_at", "extra"}


@pytest.fixture
def preempting_service(cluster, ray_auth_token, tmp_path) -> Iterator[tuple[LocalService, dict]]:
    """Real training jobs (workers.run), two attempts each, preemption by priority >= 1."""
    env = service_env(
        cluster,
        ray_auth_token,
        tmp_path,
        "lbg_admin_multinode_preempt_0123456789",
        # the drivers start in the repository, where the preset's relative data/ lives
        LBGAT_WORKER_ENTRYPOINT=f"cd {shlex.quote(str(REPO))} && {{python}} -m workers.run --job-id {{job_id}}",
        LBGAT_LOST_JOB_GRACE_S="20",
        LBGAT_DEFAULT_MAX_ATTEMPTS="2",
        LBGAT_PREEMPTION_ENABLED="true",
        LBGAT_PREEMPT_MIN_PRIORITY="1",
        LBGAT_PREEMPT_MIN_RUN_S="0",
        LBGAT_PREEMPTION_GRACE_S="60",
    )
    yield from running_service(env, tmp_path)


def training_spec(name: str, *overrides: str):
    """The short digits run of TRAIN, named `name`, with `overrides` on top (an ExperimentSpec)."""
    from api_schemas.presets import get_preset

    return get_preset("digits", [*TRAIN, f"name={name}", *overrides])


def submit_training(client: httpx.Client, admin: str, spec, *, priority: int = 0) -> str:
    return submit(client, admin, spec.model_dump(mode="json"), priority=priority)["id"]


def first_epoch(metrics: Path, what: str = "the first epoch") -> None:
    wait_for(lambda: metrics.exists() and metrics.read_text().strip(), timeout_s=240, what=what)


def finished(client: httpx.Client, admin: str, exp_id: str, timeout_s: float = 300) -> dict:
    """The experiment once it ended (succeeded, failed or cancelled)."""
    return wait_for(
        lambda: (
            (body := get(client, admin, exp_id))["state"] in ("succeeded", "failed", "cancelled") and body
        ),
        timeout_s=timeout_s,
        what=f"{exp_id} to finish",
    )


def jsonl(path: Path) -> list[dict]:
    """The rows of a .jsonl file a worker appends to (a last line still being written is left out)."""
    lines = path.read_text().splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        return rows + [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        return rows


def at(value: str) -> float:
    """An API timestamp as unix time (UTC where it names no zone)."""
    moment = datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()


def test_a_high_priority_job_preempts_and_the_victim_resumes_exactly(cluster, preempting_service, tmp_path):
    """A 2-worker high-priority job needs both fake GPUs while a low-priority run holds one: the
    scheduler preempts the low one, which saves a just-in-time checkpoint mid-run, goes back to the
    queue, runs again once the high one is done, and ends with each epoch once in metrics.jsonl and
    the weights of an uninterrupted run (same seed, CPU)."""
    import torch

    from trainer.checkpoint import read_checkpoint
    from trainer.loop import TrainingRun
    from workers.training import absolute_paths

    service, env = preempting_service
    admin = env["LBGAT_ADMIN_TOKEN"]
    store = tmp_path / "artifacts"
    spec = training_spec("low")
    high_spec = training_spec(
        "high", "optimization.epochs=1", "optimization.schedule.milestones=[]", "resources.num_workers=2"
    )
    with httpx.Client(base_url=service.url, timeout=30) as client:
        low = submit_training(client, admin, spec, priority=0)
        metrics = store / "experiments" / low / "main" / "metrics.jsonl"
        first_epoch(metrics, "the low-priority run's first epoch")
        high = submit_training(client, admin, high_spec, priority=5)

        def requeued():
            body = get(client, admin, low)
            return body if body["state"] == "queued" and body["history"][-1]["to_state"] == "queued" else None

        body = wait_for(requeued, timeout_s=120, what="the low-priority run back in the queue")
        decided = next(h for h in body["history"] if (h["reason"] or "").startswith(f"preempting for {high}"))
        assert body["history"][-1]["reason"].startswith(f"preempted by {high}; resumes from its just-in-time")
        marker = json.loads((store / "experiments" / low / "main" / "preempted.json").read_text())
        assert marker["epoch"] >= 1 and marker["step"] >= 0

        low_body = finished(client, admin, low, timeout_s=420)
        high_body = get(client, admin, high)
        assert low_body["state"] == "succeeded" and high_body["state"] == "succeeded", (low_body, high_body)
        assert low_body["attempts"] == 1  # a preemption is not charged as an attempt
        # the figures of benchmarks/README.md (preemption latency), seconds after the decision
        decided_at = at(decided["at"])
        requeued_at = next(at(h["at"]) for h in body["history"] if h["reason"].startswith("preempted by"))
        dispatched_at = next(at(h["at"]) for h in high_body["history"] if h["to_state"] == "dispatching")
        print(
            f"preemption: checkpoint written +{marker['saved_at'] - decided_at:.2f} s, victim back in the "
            f"queue +{requeued_at - decided_at:.2f} s, preempting job dispatched "
            f"+{dispatched_at - decided_at:.2f} s and running +{at(high_body['started_at']) - decided_at:.2f} s"
        )

    # an uninterrupted run of the same spec in this process: the same weights, the same metrics
    reference = TrainingRun(absolute_paths(spec, base=REPO), out_dir=tmp_path / "reference")
    reference.fit(evaluate_at_end=False)
    payload = read_checkpoint(store / "experiments" / low / "main" / "checkpoints" / "last.pt")
    for key, value in reference.robust.state_dict().items():
        assert torch.equal(payload["robust"][key], value), key
    for key, value in reference.averaged.state_dict().items():
        assert torch.equal(payload["robust_ema"][key], value), key
    got = jsonl(metrics)
    assert [line["epoch"] for line in got] == [1, 2, 3]
    want = jsonl(tmp_path / "reference" / "metrics.jsonl")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]  # noqa: E731
    assert strip(got) == strip(want)


def train_worker_nodes(cluster) -> dict[str, str]:
    """Ray Train workers alive on the cluster: actor id -> node id (the state API's actors)."""
    from service.ray_jobs import RayJobs

    jobs = RayJobs(cluster.head.dashboard_url, token=cluster.head.token)
    response = jobs._get()._do_request("GET", "/api/v0/actors?limit=10000&detail=true")
    actors = response.json()["data"]["result"]["result"]
    return {
        a["actor_id"]: a["node_id"]
        for a in actors
        if "RayTrainWorker" in (a.get("class_name") or "") and a.get("state") == "ALIVE"
    }


def new_worker_nodes(cluster, before: dict[str, str]) -> set[str]:
    """The nodes of the Ray Train workers alive now that were not in `before` (a restarted group)."""
    return {node for actor, node in train_worker_nodes(cluster).items() if actor not in before}


def test_a_killed_node_resumes_from_the_last_checkpoint_on_the_other(cluster, preempting_service, tmp_path):
    """The raylet of the node that runs a training is killed outright (no drain, no just-in-time
    checkpoint): Ray Train restarts the worker on the other node from the last epoch checkpoint and the
    run finishes, each epoch once in metrics.jsonl."""
    service, env = preempting_service
    admin = env["LBGAT_ADMIN_TOKEN"]
    store = tmp_path / "artifacts"
    with httpx.Client(base_url=service.url, timeout=30) as client:
        exp = submit_training(client, admin, training_spec("crash"))
        prefix = store / "experiments" / exp / "main"
        wait_for(
            lambda: any((prefix / "ray").glob("checkpoint_*/*")),
            timeout_s=240,
            what="the first epoch's checkpoint in the store",
        )
        time.sleep(1)  # its files written
        before = wait_for(lambda: train_worker_nodes(cluster), timeout_s=30, what="the train worker")
        (node_id,) = set(before.values())
        victim = cluster.node_of(node_id)
        assert victim is not None, (node_id, before)
        victim.kill_raylet()
        wait_for(lambda: victim.state() == "DEAD", timeout_s=30, what="the node declared dead")
        after = wait_for(
            lambda: new_worker_nodes(cluster, before),
            timeout_s=120,
            what="the train worker restarted",
        )
        assert node_id not in after and after <= {n.node_id for n in cluster.nodes.values()}
        body = finished(client, admin, exp)
        assert body["state"] == "succeeded", body
    resumed = [e for e in jsonl(prefix / "events.jsonl") if e["event"] == "resumed"]
    assert resumed and resumed[0]["epoch"] >= 1, resumed
    assert [line["epoch"] for line in jsonl(prefix / "metrics.jsonl")] == [1, 2, 3]


# A drain announces that the node goes in DRAIN_DEADLINE_S seconds. Ray Train's watcher sees it within
# a second (RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S of the `ray_multinode` cluster), the workers report
# their just-in-time checkpoint about as fast (0.6-1.5 s after the drain on the 2-core test machine,
# up to 15x oversubscribed), and at the deadline Ray Train moves the group. The run must still be
# training then: an epoch of the 2 workers takes 1.2-2.5 s there, so DRAIN_EPOCHS leave 20-40 s of
# training after the drain, and a machine 3x faster still trains past the deadline.
DRAIN_DEADLINE_S = 5
DRAIN_EPOCHS = 20
# A start estimate is right within ESTIMATE_ERROR_S seconds or ESTIMATE_ERROR_FRACTION of the real wait
# from when it was read, whichever is larger. The estimator counts the running job's epochs left times
# its training seconds per epoch, from its latest row; it leaves out each epoch's validation and
# checkpoint report (~35 % of an epoch's wall time here), the run's final evaluation, the Ray job's
# end, and the next job's dispatch and driver start. Measured on the 2-core machine (6-15x
# oversubscribed): the job behind started 13-16 s after its estimate, 43-52 % of waits of 30-31 s.
ESTIMATE_ERROR_S = 20.0
ESTIMATE_ERROR_FRACTION = 2 / 3
CAPACITY_MAX_AGE_S = 5.0  # the scheduler's capacity() reads the nodes at most this often


def test_a_drained_node_hands_its_training_to_the_other_and_the_next_job_starts_as_estimated(
    cluster, preempting_service, tmp_path
):
    """`ray drain-node` (reason: preemption) of the node that runs a 2-worker training, both workers on
    it (CPU only; 2 CPUs a node): the workers see the drain (ray.train.get_preemption_info), report a
    just-in-time checkpoint of kind "drain" and train on; at the drain's deadline Ray Train tears the
    group down and starts it on the other node from its newest checkpoint, the drained node leaves
    once idle, and the run finishes with each epoch once in metrics.jsonl.

    Start estimates on the way: with the drained node gone the run holds every CPU left, and a job
    submitted then waits for it. Once the run has reported two epochs on the other node, the waiting
    job's estimated start (GET /v1/experiments/<id>) follows from the run's epochs left and seconds per
    epoch; it starts when the run is done, within the stated error of that estimate (then it is
    cancelled)."""
    service, env = preempting_service
    admin = env["LBGAT_ADMIN_TOKEN"]
    headers = {"Authorization": f"Bearer {admin}"}
    store = tmp_path / "artifacts"
    spec = training_spec(
        "drain",
        f"optimization.epochs={DRAIN_EPOCHS}",
        "resources.num_workers=2",
        "resources.use_gpu=false",
    )
    behind_spec = training_spec("behind", "optimization.epochs=1", "optimization.schedule.milestones=[]")
    with httpx.Client(base_url=service.url, timeout=30) as client:
        exp = submit_training(client, admin, spec)
        prefix = store / "experiments" / exp / "main"
        first_epoch(prefix / "metrics.jsonl")
        before = wait_for(
            lambda: len(workers := train_worker_nodes(cluster)) == 2 and workers,
            timeout_s=30,
            what="the two train workers",
        )
        (node_id,) = set(before.values())  # Ray Train packs the group's bundles on one node
        victim = cluster.node_of(node_id)
        (other,) = [n for n in cluster.nodes.values() if n is not victim]
        drained_at = time.time()
        victim.drain(reason_message="spot reclaim (test)", deadline_s=DRAIN_DEADLINE_S)

        def moved() -> set[str]:
            nodes = new_worker_nodes(cluster, before)
            if not nodes and (body := get(client, admin, exp))["state"] != "running":
                pytest.fail(f"the run ended before the drain's deadline (raise DRAIN_EPOCHS): {body}")
            return nodes

        after = wait_for(moved, timeout_s=120, what="the group restarted")
        assert after == {other.node_id}, (after, node_id, other.node_id)
        wait_for(lambda: victim.state() == "DEAD", timeout_s=60, what="the drained node to leave")
        gone_at = time.monotonic()

        # the estimate: a job behind the run, read once the run reported two epochs after it moved
        def epochs_since_resume() -> list[dict]:
            events = jsonl(prefix / "events.jsonl")
            resumed = [e["time"] for e in events if e["event"] == "resumed"]
            rows = jsonl(prefix / "metrics.jsonl") if resumed else []
            return [r for r in rows if r["extra"]["finished_at"] > resumed[0]]

        wait_for(epochs_since_resume, timeout_s=120, what="an epoch on the other node")
        time.sleep(max(0.0, gone_at + CAPACITY_MAX_AGE_S + 0.5 - time.monotonic()))
        behind = submit_training(client, admin, behind_spec)
        wait_for(lambda: len(epochs_since_resume()) >= 2, timeout_s=120, what="two epochs on the other node")
        time.sleep(2.5)  # a scheduling round with those rows, past the 2 s the queue view is kept
        waiting, read_at = get(client, admin, behind), time.time()
        assert waiting["state"] == "queued" and get(client, admin, exp)["state"] == "running", waiting
        assert waiting["queue"]["estimated_start"], waiting
        estimate = at(waiting["queue"]["estimated_start"])

        body = finished(client, admin, exp)
        assert body["state"] == "succeeded", body
        assert body["attempts"] == 1  # Ray Train moved the group within the Ray job
        started = wait_for(
            lambda: get(client, admin, behind)["started_at"],
            timeout_s=120,
            what="the job behind to start",
        )
        assert client.post(f"/v1/experiments/{behind}/cancel", headers=headers).status_code == 202
        assert finished(client, admin, behind, timeout_s=120)["state"] == "cancelled"
    events = jsonl(prefix / "events.jsonl")
    drains = [e for e in events if e["event"] == "checkpoint" and e["kind"] == "drain"]
    resumed = [e for e in events if e["event"] == "resumed"]
    assert len(drains) == 1 and node_id in drains[0]["reason"], events
    # taken after the drain and before its deadline (the reason quotes Ray's deadline_ms)
    deadline = int(drains[0]["reason"].rsplit("deadline_ms ", 1)[1].rstrip(")")) / 1000
    assert drained_at <= drains[0]["time"] < deadline, (drained_at, deadline, drains)
    (resume,) = resumed
    assert resume["world_size"] == 2 and resume["time"] > drains[0]["time"], events
    # from the newest checkpoint: the drain's, or an epoch's reported after it
    assert (resume["epoch"], resume["step"]) >= (drains[0]["epoch"], drains[0]["step"]), events
    assert [row["epoch"] for row in jsonl(prefix / "metrics.jsonl")] == list(range(1, DRAIN_EPOCHS + 1))
    print(
        f"drain: checkpoint +{drains[0]['time'] - drained_at:.2f} s (epoch {drains[0]['epoch']} step "
        f"{drains[0]['step']}, {deadline - drains[0]['time']:.2f} s before the deadline), resumed on "
        f"the other node +{resume['time'] - drained_at:.2f} s (epoch {resume['epoch']} step {resume['step']})"
    )
    started_at = at(started)
    error, wait = started_at - estimate, started_at - read_at
    print(
        f"estimate: read {wait:.1f} s before the start, predicted a wait of {estimate - read_at:.1f} s, "
        f"error {error:+.1f} s; run ended +{at(body['finished_at']) - read_at:.1f} s"
    )
    assert abs(error) <= max(ESTIMATE_ERROR_S, ESTIMATE_ERROR_FRACTION * wait), (error, wait)
