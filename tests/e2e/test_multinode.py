"""The service on a real multi-node Ray cluster (tests/conftest.py `ray_multinode`): a head with no
job resources and two worker nodes with one `fake_gpu` each, the custom resource standing for a GPU
(LBGAT_GPU_RESOURCE=fake_gpu)."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator

import httpx
import pytest

from service.local_service import LocalService
from tests.e2e.test_service import get, sleep_spec, submit
from tests.waiting import wait_for

GPU = "fake_gpu"

# A Ray job that holds one of the cluster's GPUs for a while, as a training worker would: a task
# asking for 1 CPU and 1 of LBGAT_GPU_RESOURCE (the name the service hands to its jobs), which prints
# the node it ran on. No braces: the service formats the entrypoint.
HOLD_GPU = (
    shlex.quote(sys.executable)
    + " -c "
    + shlex.quote(
        "import os, ray; ray.init(); name = os.environ['LBGAT_GPU_RESOURCE']\n"
        "def hold(s):\n"
        "    import time; time.sleep(s); return ray.get_runtime_context().get_node_id()\n"
        "node = ray.get(ray.remote(hold).options(num_cpus=1, resources=dict([(name, 1)])).remote({seconds}))\n"
        "print('held', name, 'on node', node, flush=True)"
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
        "LBGAT_WORKER_ENTRYPOINT": HOLD_GPU.format(seconds=6),
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
    """Two jobs needing one fake GPU each run at once, one per worker node (the head has none); the
    third waits for capacity with a reason that says so, and runs once a GPU is free."""
    service, env = multinode_service
    admin = env["LBGAT_ADMIN_TOKEN"]
    head_id = next(n["node_id"] for n in ray_multinode.head.nodes() if n["is_head_node"])
    workers = {n.node_id: n.name for n in ray_multinode.nodes.values()}
    with httpx.Client(base_url=service.url, timeout=30) as client:
        ids = [submit(client, admin, sleep_spec(f"mn-{i}"))["id"] for i in range(3)]
        first, second, third = ids

        def two_running_third_waiting():
            bodies = [get(client, admin, i) for i in ids]
            running = [b for b in bodies if b["state"] == "running"]
            waiting = bodies[2] if bodies[2]["state"] == "queued" and bodies[2]["queue"] else None
            if len(running) == 2 and waiting:
                return bodies, waiting
            return None

        bodies, waiting = wait_for(
            two_running_third_waiting, timeout_s=120, what="two jobs running and the third waiting"
        )
        assert [b["gpus"] for b in bodies] == [1, 1, 1]
        reason = waiting["queue"]["reason"]
        assert "waits for 1 GPUs" in reason and "0 GPUs" in reason, reason

        for exp_id in ids:
            wait_for(
                lambda exp_id=exp_id: get(client, admin, exp_id)["state"] in ("succeeded", "failed"),
                timeout_s=120,
                what=f"{exp_id} to finish",
            )
        nodes = {}
        for exp_id in ids:
            body = get(client, admin, exp_id)
            assert body["state"] == "succeeded", body
            logs = client.get(f"/v1/experiments/{exp_id}/logs", headers={"Authorization": f"Bearer {admin}"})
            line = next(line for line in logs.text.splitlines() if line.startswith("held "))
            assert line.startswith(f"held {GPU} on node ")
            nodes[exp_id] = line.rsplit(" ", 1)[1]
            job = ray_job(ray_multinode, exp_id)
            assert job is not None and job.driver_node_id == head_id  # drivers on the head, work elsewhere
        assert set(nodes.values()) <= set(workers), (nodes, workers)
        assert nodes[first] != nodes[second]  # one fake GPU per node: the two ran side by side
        # the third started only once one of the first two had finished
        started = {i: get(client, admin, i)["started_at"] for i in ids}
        finished = {i: get(client, admin, i)["finished_at"] for i in ids}
        assert started[third] >= min(finished[first], finished[second])
