"""A local Ray head for `lbgat serve` without LBGAT_RAY_ADDRESS (a laptop, the quickstart), and for
the tests.

`ray start --head --block` in a child process, every port chosen free (two Ray instances on one
machine otherwise fight over the dashboard agent's fixed port 52365, and the loser cannot run jobs:
"No available agent to submit job"). SIGTERM to the child stops the whole head. The service never
joins the cluster itself; it talks to the dashboard's Job Submission API like with a remote cluster.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


class LocalRay:
    """A Ray head on 127.0.0.1; `dashboard_url` for the Job API, `address` (GCS) for drivers."""

    def __init__(
        self,
        *,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        timeout_s: float = 120,
    ) -> None:
        gcs_port, dashboard_port = free_port(), free_port()
        cmd = [
            _ray_cli(), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
        ]  # fmt: skip
        if num_cpus is not None:
            cmd.append(f"--num-cpus={num_cpus}")
        if num_gpus is not None:
            cmd.append(f"--num-gpus={num_gpus}")
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            cmd,
            env={
                **os.environ,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                # a one-node dev head has nothing to drain on SIGTERM (the default waits up to 30 s)
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                **(env or {}),
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches every process of the head
        )
        self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"`ray start --head` exited with code {self.process.returncode}")
            if self._agent_ready():
                return
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local Ray head did not come up within {timeout_s:.0f} s")

    def _agent_ready(self) -> bool:
        """The dashboard answers, with token auth, and lists the node (whose agent runs the jobs)."""
        from service.ray_jobs import RayJobs, RayUnavailable

        try:
            return RayJobs(self.dashboard_url).capacity().nodes > 0
        except RayUnavailable:
            return False

    def stop(self, timeout_s: float = 60) -> None:
        if self.process.poll() is None:
            # `ray start --block` stops its processes in order on SIGTERM (signalling the whole group at
            # once would take the GCS down first and make the node's drain wait for it)
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)  # anything left of the head's process group
        # `ray start` records its address for later `ray.init()` calls on this machine; `ray stop` would
        # remove it, but that stops every Ray here. Forget it only where it still names this head.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        with contextlib.suppress(OSError):
            if current.read_text().strip().endswith(":" + self.address.rsplit(":", 1)[1]):
                current.unlink()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> LocalRay:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
