"""A local Ray head for `lbgat serve` without LBGAT_RAY_ADDRESS (a laptop, the quickstart), and for
the tests and benchmarks.

`ray start --head --block` in a child process, every port chosen free (two Ray instances on one
machine otherwise fight over the dashboard agent's fixed port 52365, and the loser cannot run jobs:
"No available agent to submit job"). The head runs with token auth, its token generated once per
state directory (`<state_dir>/ray_auth_token`, see workers/ray_auth.py), and listens on 127.0.0.1
only. SIGTERM to the child stops the whole head; the child also gets SIGTERM when the process that
started it dies, however it dies, so a killed `lbgat serve` leaves no Ray behind. The service never
joins the cluster itself; it talks to the dashboard's Job Submission API like with a remote cluster.

`LocalRayCluster` is a real multi-node cluster on one machine for the tests and benchmarks: a head
with no job resources (`--num-cpus=0`, no GPUs) and worker nodes joined with `ray start --address`,
each with CPUs of its own and a custom resource standing for a GPU, all on 127.0.0.1 with the same
token. A worker node (`LocalRayNode`) can be drained through the GCS (`ray drain-node`), have its
raylet killed outright, or be stopped on its own.
"""

from __future__ import annotations

import contextlib
import json
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


def _spawn(cmd: list[str], env: dict[str, str], log: object) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() reaches every process of the node
        preexec_fn=_die_with_parent,
    )


def _stop_node(process: subprocess.Popen, timeout_s: float) -> None:
    """Stop every process of a `ray start --block` node within about `timeout_s`: `ray start` stops its
    processes in order on SIGTERM; whatever is still alive after that (a worker Ray lost track of) is
    killed."""
    tree = descendants(process.pid)
    if process.poll() is None:
        # `ray start --block` stops its processes in order on SIGTERM (signalling the whole group at
        # once would take the GCS down first and make the node's drain wait for it)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything left of the node's process group
    for pid, start_time in tree:  # and of its tree, where a process started a session of its own
        kill_if_same(pid, start_time)


def _ray_temp_dir() -> Path:
    # short: Ray puts Unix sockets in it
    return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp" if os.path.isdir("/tmp") else None))


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
        self.temp_dir = _ray_temp_dir()
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
        self._jobs = None
        self.address = f"127.0.0.1:{gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = _spawn(
            cmd,
            {
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
            self._log,
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
        from service.ray_jobs import RayUnavailable

        try:
            return any(n.get("state") == "ALIVE" for n in self.nodes())
        except RayUnavailable:
            return False

    def nodes(self) -> list[dict]:
        """The cluster's nodes as the state API lists them (node_id, node_name, state, resources_total...)."""
        from service.ray_jobs import RayJobs

        if self._jobs is None:
            self._jobs = RayJobs(self.dashboard_url, token=self.token)
        return self._jobs.nodes()

    def stop(self, timeout_s: float = 25) -> None:
        """Stop every process of the head within about `timeout_s`: `ray start` stops its processes in
        order on SIGTERM; whatever is still alive after that (a worker Ray lost track of) is killed."""
        _stop_node(self.process, timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # its sessions' logs and sockets
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> LocalRay:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class _JoinExited(RuntimeError):
    pass


# `ray start` for a worker node, keeping the head's address 127.0.0.1. Ray turns a loopback --address
# into the machine's outward address (192.x...) before connecting, since a real cluster's nodes must
# reach each other; the only switch that stops it (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) also forbids
# worker nodes. The head listens on 127.0.0.1 only, so the CLI runs with that one conversion removed.
_RAY_JOIN_LOOPBACK = (
    "import sys; import ray._private.services as s; s.resolve_ip_for_localhost = lambda host: host; "
    "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())"
)


class LocalRayNode:
    """A worker node joined to `head` (`ray start --address=<head> --block`) on 127.0.0.1: its own CPUs,
    `resources` (a custom resource standing for a GPU, say), temp folder and free ports for every
    listener, named `name` in the state API (`node_name`). Its `node_id` is read from the head once
    the node is alive."""

    def __init__(
        self,
        head: LocalRay,
        *,
        name: str,
        num_cpus: int,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
        log_path: str | Path | None = None,
        object_store_mb: int = 150,
        timeout_s: float = 120,
        wait: bool = True,
    ) -> None:
        self.head, self.name = head, name
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        self._env = env
        self._cmd_args = (num_cpus, resources or {}, object_store_mb)
        self._timeout_s = timeout_s
        self.node_id = ""
        self.drained = False
        self._start()
        if wait:
            self.wait_joined()

    def wait_joined(self) -> str:
        """Wait until the head lists the node alive; its node id. `ray start` gives its raylet a fixed
        30 s to register with the GCS; on a loaded machine (two cores shared by a test suite) that can
        pass, and the CLI exits: it is started once more. Call it on the thread that started the node:
        the node's processes are bound to that thread's life (PR_SET_PDEATHSIG)."""
        for attempt in (1, 2):
            try:
                self.node_id = self._wait_alive(self._timeout_s)
                return self.node_id
            except _JoinExited:
                self.stop(keep_log=attempt == 1)
                if attempt == 2:
                    raise RuntimeError(
                        f"`ray start --address` of {self.name} exited twice; see its log"
                    ) from None
                self._start()
        raise AssertionError("unreachable")

    def _start(self) -> None:
        head, name = self.head, self.name
        num_cpus, resources, object_store_mb = self._cmd_args
        self.temp_dir = _ray_temp_dir()
        cmd = [
            sys.executable, "-c", _RAY_JOIN_LOOPBACK,
            "start", f"--address={head.address}", "--block", "--disable-usage-stats", f"--temp-dir={self.temp_dir}", "--node-ip-address=127.0.0.1", f"--node-name={name}",
            f"--num-cpus={num_cpus}", "--num-gpus=0", f"--resources={json.dumps(resources)}",
            f"--object-store-memory={object_store_mb * 1024 * 1024}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
        ]  # fmt: skip
        self.process = _spawn(
            cmd,
            {
                **os.environ,
                "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
                **(self._env or {}),
                **head.env,
                # a worker node refuses to join with the single-node flag of local_ray_env; the node's
                # address stays loopback through --node-ip-address
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                "RAY_ADDRESS": head.address,
            },
            self._log,
        )

    def _wait_alive(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise _JoinExited(self.name)
            for node in self.head.nodes():
                if node.get("node_name") == self.name and node.get("state") == "ALIVE":
                    return node["node_id"]
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the Ray worker node {self.name} did not join within {timeout_s:.0f} s")

    def state(self) -> str | None:
        """ALIVE or DEAD as the head sees it (None: not listed)."""
        for node in self.head.nodes():
            if node.get("node_id") == self.node_id:
                return node.get("state")
        return None

    def raylet_pid(self) -> int | None:
        for pid, _ in descendants(self.process.pid):
            with contextlib.suppress(OSError):
                if (Path("/proc") / str(pid) / "comm").read_text().strip() == "raylet":
                    return pid
        return None

    def kill_raylet(self) -> None:
        """SIGKILL the node's raylet, as when a machine dies: no drain, no checkpoint; the GCS marks
        the node dead once its health checks fail, and the node's workers exit with their raylet."""
        pid = self.raylet_pid()
        if pid is None:
            raise RuntimeError(f"{self.name} has no raylet running")
        os.kill(pid, signal.SIGKILL)

    def drain(self, *, reason_message: str = "drained by a test", deadline_s: int | None = None) -> str:
        """`ray drain-node` of this node with the preemption reason (what a spot reclaim sends): Ray
        Train's workers on it see `get_preemption_info()`, Ray places nothing new on the node, and the
        node leaves once idle (dead, "Terminated due to preemption"); the deadline is only announced,
        nothing kills the node at it. Returns the command's output; raises when the GCS rejects the
        drain. The node counts as lost from then on (`LocalRayCluster.replace_lost`)."""
        cmd = [
            _ray_cli(), "drain-node", f"--address={self.head.address}", f"--node-id={self.node_id}",
            "--reason=DRAIN_NODE_REASON_PREEMPTION", f"--reason-message={reason_message}",
        ]  # fmt: skip
        if deadline_s is not None:
            cmd.append(f"--deadline-remaining-seconds={deadline_s}")
        done = subprocess.run(
            cmd, env={**os.environ, **self.head.env}, capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"ray drain-node {self.name} failed: {(done.stderr or done.stdout).strip()}")
        self.drained = True
        return done.stdout + done.stderr

    def stop(self, timeout_s: float = 15, *, keep_log: bool = False) -> None:
        _stop_node(self.process, timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self._log is not subprocess.DEVNULL and not keep_log:
            self._log.close()
            self._log = subprocess.DEVNULL


class LocalRayCluster:
    """A head with no job resources and `workers` worker nodes, each with `cpus_per_worker` CPUs and
    one `gpu_resource` (a custom resource standing for a GPU: jobs are admitted by what the nodes
    report and training asks for it, see LBGAT_GPU_RESOURCE), all on 127.0.0.1 with the token of
    `state_dir`. `head.dashboard_url` is the Job API; `nodes` the worker nodes, by name.
    `replace_lost()` starts fresh nodes in place of those killed or drained, so that a cluster shared
    by tests keeps its shape."""

    def __init__(
        self,
        *,
        state_dir: str | Path,
        workers: int = 2,
        cpus_per_worker: int = 1,
        gpu_resource: str = "fake_gpu",
        gpus_per_node: float = 1,
        log_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        timeout_s: float = 120,
    ) -> None:
        self.gpu_resource = gpu_resource
        self.log_dir = Path(log_dir) if log_dir else None
        self.env = {
            # a raylet killed outright is declared dead after ~1.5 s, not Ray's ~30 s
            "RAY_health_check_initial_delay_ms": "1000",
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_timeout_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
            **(env or {}),
        }
        self.timeout_s = timeout_s
        self._started = 0  # worker nodes started so far: the next one is worker-<n+1>
        self.head = LocalRay(
            state_dir=state_dir,
            num_cpus=0,
            num_gpus=0,
            env=self.env,
            log_path=self.log_dir / "head.log" if self.log_dir else None,
            timeout_s=timeout_s,
        )
        self.nodes: dict[str, LocalRayNode] = {}
        try:
            # every node starts now and they join together (each `ray start` mostly waits); started
            # from this thread, which outlives them (their processes die with the thread that
            # started them, see _die_with_parent)
            for _ in range(workers):
                self.add_node(num_cpus=cpus_per_worker, gpus=gpus_per_node, wait=False)
            for node in self.nodes.values():
                node.wait_joined()
        except BaseException:
            self.stop()
            raise

    def add_node(
        self,
        name: str | None = None,
        *,
        num_cpus: int,
        gpus: float = 1,
        env: dict[str, str] | None = None,
        log_dir: Path | None = None,
        timeout_s: float | None = None,
        wait: bool = True,
    ) -> LocalRayNode:
        """Start a worker node (named worker-<n> by default) with the cluster's environment and log
        folder unless given others."""
        self._started += 1
        name = name or f"worker-{self._started}"
        log_dir = log_dir or self.log_dir
        node = LocalRayNode(
            self.head,
            name=name,
            num_cpus=num_cpus,
            resources={self.gpu_resource: gpus} if gpus else {},
            env=self.env if env is None else env,
            log_path=log_dir / f"{name}.log" if log_dir else None,
            timeout_s=self.timeout_s if timeout_s is None else timeout_s,
            wait=wait,
        )
        self.nodes[name] = node
        return node

    def replace_lost(self) -> list[str]:
        """Stop every worker node that is dead or was drained and start a fresh one of the same shape
        (CPUs, resources) in its place; the names of the nodes replaced. Call it on the thread that
        made the cluster (see LocalRayNode.wait_joined)."""
        lost = [name for name, node in self.nodes.items() if node.drained or node.state() != "ALIVE"]
        for name in lost:
            node = self.nodes.pop(name)
            node.stop()
            num_cpus, resources, _ = node._cmd_args
            self.add_node(num_cpus=num_cpus, gpus=resources.get(self.gpu_resource, 0), env=node._env)
        return lost

    def node_of(self, node_id: str) -> LocalRayNode | None:
        return next((n for n in self.nodes.values() if n.node_id == node_id), None)

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.head.stop()

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()
