"""The whole system on loopback: uvicorn serving the service in a child process (so a test can kill
it), the session's real local Ray (its Job Submission API) and the SeaweedFS S3 server, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import secrets
import sys
from collections.abc import Iterator

import pytest

from service.local_service import LocalService


@pytest.fixture
def service_env(database_url, ray_cluster, ray_auth_token, s3_server, tmp_path) -> dict[str, str]:
    store = s3_server.settings()
    admin = "lbg_admin_" + secrets.token_hex(16)
    env = {
        **store.as_env(),
        "LBGAT_DATABASE_URL": database_url,
        "LBGAT_RAY_ADDRESS": ray_cluster,
        "LBGAT_RAY_AUTH_TOKEN": ray_auth_token,
        "LBGAT_ADMIN_TOKEN": admin,
        "LBGAT_WORKER_PYTHON": sys.executable,
        "LBGAT_POLL_INTERVAL_S": "0.2",
        "LBGAT_METRICS_INTERVAL_S": "0.5",
        "LBGAT_LOST_JOB_GRACE_S": "5",
        "LBGAT_MAX_RUNNING_JOBS": "1",
        "LBGAT_USER_MAX_RUNNING_JOBS": "1",
        "LBGAT_DEFAULT_MAX_ATTEMPTS": "1",
        "OMP_NUM_THREADS": "1",
    }
    return env


@pytest.fixture
def service(service_env, tmp_path) -> Iterator[LocalService]:
    proc = LocalService(service_env, tmp_path / "service.log").start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
