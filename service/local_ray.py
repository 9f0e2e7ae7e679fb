"""A local Ray head for `lbgat serve` without LBGAT_RAY_ADDRESS (a laptop, the quickstart), and for
the tests and benchmarks.

`ray start --head --block` in a child process, every port chosen free (two Ray instances on one
machine otherwise fight over the dashboard agent's fixed port 52365, and the loser cannot run jobs:
"No available agent to submit job"). The head runs with token auth, its token generated once per
state directory (`<state_dir>/ray_auth_token`, see workers/ray_auth.py), and listens on 127.0.0.1
only. SIGTERM to the child stops the whole head; the child also gets SIGTERM when the process that
started it dies, however it dies, so a killed `lbgat serve` leaves no Ray behind. The service never
joins the cluster itself; it talks to the dashboard's Job Submission API like with a remote cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workers.ray_auth import ensure_token_file, free_port, local_ray_env, read_token_file


def _ray_cli() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else "ray"


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


def _proc_stat(pid: int | str) -> list[str] | None:
    try:
        # the command name may hold spaces and parentheses: the fields after the last ")"
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(pid: int) -> list[tuple[int, str]]:
    """(PID, start time) of every live descendant of `pid` (Linux /proc; empty elsewhere). The start
    time tells a process from a later one that got its PID back."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _proc_stat(entry.name)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append((int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def kill_if_same(pid: int, start_time: str) -> None:
    fields = _proc_stat(pid)
    if fields is not None and fields[19] == start_time:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class LocalRay:
    """A Ray head on 127.0.0.1 with token auth; `dashboard_url` for the Job API, `address` (GCS) for
    drivers, `token` for both (drivers in `env`: `LocalRay.env` is what a driver process needs)."""

    def __init__(
        self,
        *,
        state_dir: str | Path,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        timeout_s: float = 120,
    ) -> None:
        self.token_file = ensure_token_file(state_dir)
        self.token = read_token_file(self.token_file)
        #: the variables a driver of this head needs (token auth, loopback-only node address)
        self.env = local_ray_env(self.token_file)
        gcs_port, dashboard_port = free_port(), free_port()
        # Its own Ray temp folder (short: Ray puts Unix sockets in it). Ray's job supervisor starts each
        # job's driver with RAY_ADDRESS=auto, resolved from <temp>/ray_current_cluster, which in the
        # shared /tmp/ray names whichever head started last on this machine: another of ours, a
        # user's own, or one that died. Here it can only name this head.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        cmd = [
            _ray_cli(), "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
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
                **self.env,
                # Processes of this head that look their cluster up by themselves (Ray Train's
                # placement-group cleaner asks the state API with no address) would otherwise read
                # /tmp/ray/ray_current_cluster, which the newest `ray start` on the machine owns: a
                # second head, or one that died, and the cleaner's thread dies with it.
                "RAY_ADDRESS": self.address,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() reaches every process of the head
            preexec_fn=_die_with_parent,
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
            return RayJobs(self.dashboard_url, token=self.token).capacity().nodes > 0
        except RayUnavailable:
            return False

    def stop(self, timeout_s: float = 25) -> None:
        """Stop every process of the head within about `timeout_s`: `ray start` stops its processes in
        order on SIGTERM; whatever is still alive after that (a worker Ray lost track of) is killed."""
        tree = descendants(self.process.pid)
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
        for pid, start_time in tree:  # and of its tree, where a process started a session of its own
            kill_if_same(pid, start_time)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # its sessions' logs and sockets
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> LocalRay:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
