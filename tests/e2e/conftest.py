"""The whole system on loopback: uvicorn serving the service in a child process (so a test can kill
it), the session's real local Ray (its Job Submission API) and the SeaweedFS S3 server, on SQLite
and on PostgreSQL."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from workers.dev_s3 import free_port


class ServiceProcess:
    """`python -m uvicorn --factory service.app:create_app` with the given LBGAT_* environment."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 60) -> ServiceProcess:
        cmd = [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "service.app:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            cmd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"service did not answer /healthz within {timeout_s} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown hooks run, as when a machine or container dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""


@pytest.fixture
def service_env(database_url, ray_cluster, s3_server, tmp_path) -> dict[str, str]:
    store = s3_server.settings()
    admin = "lbg_admin_" + secrets.token_hex(16)
    env = {
        **store.as_env(),
        "LBGAT_DATABASE_URL": database_url,
        "LBGAT_RAY_ADDRESS": ray_cluster,
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
def service(service_env, tmp_path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(service_env, tmp_path / "service.log").start()
    try:
        yield proc
    finally:
        proc.stop()
        proc.kill()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def wait_for(fn, *, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll `fn` until it returns a truthy value; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last: {last!r}")
