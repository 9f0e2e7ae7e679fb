"""The service on a real multi-node Ray cluster (tests/conftest.py `ray_multinode`): a head with no
job resources and two worker nodes with one `fake_gpu` each, the custom resource standing for a GPU
(LBGAT_GPU_RESOURCE=fake_gpu)."""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from service.local_service import LocalService
from tests.e2e.test_service import get, sleep_spec, submit
from tests.waiting import wait_for

GPU = "fake_gpu"

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
def multinode_service(ray_multinode, ray_auth_token, tmp_path) -> Iterator[tuple[LocalService, dict]]:
    admin = "lbg_admin_multinode_0123456789abcdef"
    env = {
        "LBGAT_DATABASE_URL": f"sqlite:///{tmp_path / 'lbgat.db'}",
        "LBGAT_ARTIFACT_STORE": f"file://{tmp_path / 'artifacts'}",
        "LBGAT_RAY_ADDRESS": ray_multinode.head.dashboard_url,
        "LBGAT_RAY_AUTH_TOKEN": ray_auth_token,
        "LBGAT_GPU_RESOURCE": GPU,
        "LBGAT_ADMIN_TOKEN": admin,
        "LBGAT_WORKER_PYTHON": sys.executable,
        "LBGAT_WORKER_ENTRYPOINT": HOLD_GPU,
        "LBGAT_POLL_INTERVAL_S": "0.2",
        "LBGAT_METRICS_INTERVAL_S": "0.5",
        "LBGAT_LOST_JOB_GRACE_S": "10",
        "LBGAT_MAX_RUNNING_JOBS": "4",
        "LBGAT_USER_MAX_RUNNING_JOBS": "4",
        "LBGAT_DEFAULT_MAX_ATTEMPTS": "1",
        "OMP_NUM_THREADS": "1",
    }
    proc = LocalService(env, tmp_path / "service.log", cwd=tmp_path).start()
    try:
        yield proc, env
    finally:
        proc.stop()
        proc.kill()


def ray_job(cluster, exp_id: str):
    """The Ray job (JobDetails) the service submitted for an experiment, found by its metadata."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(
        cluster.head.dashboard_url, headers={"Authorization": f"Bearer {cluster.head.token}"}
    )
    jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("lbgat_experiment") == exp_id]
    return jobs[-1] if jobs else None


def test_jobs_are_admitted_by_the_capacity_the_nodes_report(ray_multinode, multinode_service):
    """Two jobs needing one fake GPU each run at once, one on each worker node (their drivers on the
    head, which has no resources for jobs); the third waits for capacity with a reason that says so,
    and runs on the node that a cancelled one frees."""
    service, env = multinode_service
    headers = {"Authorization": f"Bearer {env['LBGAT_ADMIN_TOKEN']}"}
    admin = env["LBGAT_ADMIN_TOKEN"]
    head_id = next(n["node_id"] for n in ray_multinode.head.nodes() if n["is_head_node"])
    workers = {n.node_id for n in ray_multinode.nodes.values()}
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
            job = ray_job(ray_multinode, exp_id)
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
def preempting_service(ray_multinode, ray_auth_token, tmp_path) -> Iterator[tuple[LocalService, dict]]:
    admin = "lbg_admin_multinode_preempt_0123456789"
    env = {
        "LBGAT_DATABASE_URL": f"sqlite:///{tmp_path / 'lbgat.db'}",
        "LBGAT_ARTIFACT_STORE": f"file://{tmp_path / 'artifacts'}",
        "LBGAT_RAY_ADDRESS": ray_multinode.head.dashboard_url,
        "LBGAT_RAY_AUTH_TOKEN": ray_auth_token,
        "LBGAT_GPU_RESOURCE": GPU,
        "LBGAT_ADMIN_TOKEN": admin,
        "LBGAT_WORKER_PYTHON": sys.executable,
        # the drivers start in the repository, where the preset's relative data/ lives
        "LBGAT_WORKER_ENTRYPOINT": f"cd {shlex.quote(str(REPO))} && {{python}} -m workers.run --job-id {{job_id}}",
        "LBGAT_POLL_INTERVAL_S": "0.2",
        "LBGAT_METRICS_INTERVAL_S": "0.5",
        "LBGAT_LOST_JOB_GRACE_S": "20",
        "LBGAT_MAX_RUNNING_JOBS": "4",
        "LBGAT_USER_MAX_RUNNING_JOBS": "4",
        "LBGAT_DEFAULT_MAX_ATTEMPTS": "2",
        "LBGAT_PREEMPTION_ENABLED": "true",
        "LBGAT_PREEMPT_MIN_PRIORITY": "1",
        "LBGAT_PREEMPT_MIN_RUN_S": "0",
        "LBGAT_PREEMPTION_GRACE_S": "60",
        "OMP_NUM_THREADS": "1",
    }
    proc = LocalService(env, tmp_path / "service.log", cwd=tmp_path).start()
    try:
        yield proc, env
    finally:
        proc.stop()
        proc.kill()


def test_a_high_priority_job_preempts_and_the_victim_resumes_exactly(
    ray_multinode, preempting_service, tmp_path
):
    """A 2-worker high-priority job needs both fake GPUs while a low-priority run holds one: the
    scheduler preempts the low one, which saves a just-in-time checkpoint mid-run, goes back to the
    queue, runs again once the high one is done, and ends with each epoch once in metrics.jsonl and
    the weights of an uninterrupted run (same seed, CPU)."""
    import torch

    from api_schemas.presets import get_preset
    from trainer.checkpoint import read_checkpoint
    from trainer.loop import TrainingRun
    from workers.training import absolute_paths

    service, env = preempting_service
    admin = env["LBGAT_ADMIN_TOKEN"]
    headers = {"Authorization": f"Bearer {admin}"}
    store = tmp_path / "artifacts"
    spec = get_preset("digits", [*TRAIN, "name=low"])
    high_spec = get_preset(
        "digits",
        [
            *TRAIN,
            "name=high",
            "optimization.epochs=1",
            "optimization.schedule.milestones=[]",
            "resources.num_workers=2",
        ],
    )
    with httpx.Client(base_url=service.url, timeout=30) as client:
        low = submit(client, admin, spec.model_dump(mode="json"), priority=0)["id"]
        metrics = store / "experiments" / low / "main" / "metrics.jsonl"
        wait_for(
            lambda: metrics.exists() and metrics.read_text().strip(),
            timeout_s=240,
            what="the low-priority run's first epoch",
        )
        high = submit(client, admin, high_spec.model_dump(mode="json"), priority=5)["id"]

        def requeued():
            body = client.get(f"/v1/experiments/{low}", headers=headers).json()
            return body if body["state"] == "queued" and body["history"][-1]["to_state"] == "queued" else None

        body = wait_for(requeued, timeout_s=120, what="the low-priority run back in the queue")
        decided = next(h for h in body["history"] if (h["reason"] or "").startswith(f"preempting for {high}"))
        assert body["history"][-1]["reason"].startswith(f"preempted by {high}; resumes from its just-in-time")
        marker = json.loads((store / "experiments" / low / "main" / "preempted.json").read_text())
        assert marker["epoch"] >= 1 and marker["step"] >= 0

        done = wait_for(
            lambda: get(client, admin, low)["state"] in ("succeeded", "failed", "cancelled"),
            timeout_s=420,
            what="the low-priority run to finish after the high one",
        )
        assert done
        low_body = client.get(f"/v1/experiments/{low}", headers=headers).json()
        high_body = get(client, admin, high)
        assert low_body["state"] == "succeeded" and high_body["state"] == "succeeded", (low_body, high_body)
        assert low_body["attempts"] == 1  # a preemption is not charged as an attempt
        # the figures of benchmarks/README.md (preemption latency), seconds after the decision
        at = lambda value: datetime.fromisoformat(value).timestamp()  # noqa: E731
        decided_at = at(decided["at"])
        high_history = client.get(f"/v1/experiments/{high}", headers=headers).json()["history"]
        requeued_at = next(at(h["at"]) for h in body["history"] if h["reason"].startswith("preempted by"))
        dispatched_at = next(at(h["at"]) for h in high_history if h["to_state"] == "dispatching")
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
    got = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [line["epoch"] for line in got] == [1, 2, 3]
    want = [json.loads(line) for line in (tmp_path / "reference" / "metrics.jsonl").read_text().splitlines()]
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


def test_a_killed_node_resumes_from_the_last_checkpoint_on_the_other(
    ray_multinode, preempting_service, tmp_path
):
    """The raylet of the node that runs a training is killed outright (no drain, no just-in-time
    checkpoint): Ray Train restarts the worker on the other node from the last epoch checkpoint and the
    run finishes, each epoch once in metrics.jsonl. The node is replaced afterwards."""
    service, env = preempting_service
    admin = env["LBGAT_ADMIN_TOKEN"]
    store = tmp_path / "artifacts"
    spec = get_spec_for("crash")
    try:
        with httpx.Client(base_url=service.url, timeout=30) as client:
            exp = submit(client, admin, spec, priority=0)["id"]
            prefix = store / "experiments" / exp / "main"
            wait_for(
                lambda: any((prefix / "ray").glob("checkpoint_*/*")),
                timeout_s=240,
                what="the first epoch's checkpoint in the store",
            )
            time.sleep(1)  # its files written
            before = wait_for(
                lambda: train_worker_nodes(ray_multinode), timeout_s=30, what="the train worker"
            )
            (node_id,) = set(before.values())
            victim = ray_multinode.node_of(node_id)
            assert victim is not None, (node_id, before)
            victim.kill_raylet()
            wait_for(lambda: victim.state() == "DEAD", timeout_s=30, what="the node declared dead")
            after = wait_for(
                lambda: {n for a, n in train_worker_nodes(ray_multinode).items() if a not in before},
                timeout_s=120,
                what="the train worker restarted",
            )
            assert node_id not in after and after <= {n.node_id for n in ray_multinode.nodes.values()}
            wait_for(
                lambda: get(client, admin, exp)["state"] in ("succeeded", "failed", "cancelled"),
                timeout_s=300,
                what="the run to finish",
            )
            body = get(client, admin, exp)
            assert body["state"] == "succeeded", body
        events = [json.loads(line) for line in (prefix / "events.jsonl").read_text().splitlines()]
        resumed = [e for e in events if e["event"] == "resumed"]
        assert resumed and resumed[0]["epoch"] >= 1, events
        lines = [json.loads(line) for line in (prefix / "metrics.jsonl").read_text().splitlines()]
        assert [line["epoch"] for line in lines] == [1, 2, 3]
    finally:
        # the session's cluster keeps two worker nodes
        for name, node in list(ray_multinode.nodes.items()):
            if node.state() != "ALIVE":
                node.stop()
                del ray_multinode.nodes[name]
                ray_multinode.add_node(f"{name}-again", num_cpus=1, gpus=1)


def get_spec_for(name: str) -> dict:
    from api_schemas.presets import get_preset

    return get_preset("digits", [*TRAIN, f"name={name}"]).model_dump(mode="json")
