"""`lbgat serve` as a user starts it on a new machine: a local Ray with token auth, every socket on
loopback, nothing in the user's home, and every process of the head gone after SIGTERM, SIGINT or
SIGHUP (a second signal during the shutdown included). Against a cluster that wants a token it was
not given, it refuses to start with a message that says what to set."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")

from service.local_ray import free_port  # noqa: E402

SERVE_START_S, STOP_S = 180, 30


def lbgat_command() -> list[str]:
    script = Path(sys.executable).with_name("lbgat")
    return (
        [str(script)]
        if script.exists()
        else [sys.executable, "-c", "from service.client.cli import main; main()"]
    )


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    """A new user's environment: an empty home, no Ray token and no LBGAT setting anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LBGAT_", "XDG_"))}
    for name in ("AUTOSCALER_METRIC_PORT", "DASHBOARD_METRIC_PORT"):
        env.pop(name, None)
    return {**env, "HOME": str(home), "OMP_NUM_THREADS": "1", **extra}


def http_status(url: str, token: str | None = None) -> int:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0  # nothing listens (yet)


class Serve:
    """`lbgat serve` in a child process (its own folder, an empty home), its output in a file."""

    def __init__(self, tmp: Path) -> None:
        self.home, self.work = tmp / "home", tmp / "work"
        self.home.mkdir()
        self.work.mkdir()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "serve.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*lbgat_command(), "serve", "--port", str(self.port), "--num-cpus", "1"],
                cwd=self.work,
                env=fresh_env(self.home),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self) -> str:
        """Wait for /healthz; returns the local Ray's dashboard URL from the output."""
        deadline = time.monotonic() + SERVE_START_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"lbgat serve exited:\n{self.output()}"
            if http_status(self.url + "/healthz") == 200:
                line = next(x for x in self.output().splitlines() if x.startswith("local Ray dashboard: "))
                return line.split()[3]
            time.sleep(0.5)
        raise AssertionError(f"lbgat serve did not come up:\n{self.output()}")

    def tree(self) -> list[psutil.Process]:
        root = psutil.Process(self.process.pid)
        return [root, *root.children(recursive=True)]

    def kill(self) -> None:
        for proc in self.tree() if self.process.poll() is None else []:
            with contextlib.suppress(psutil.Error):
                proc.kill()


def listening(processes: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket, from the process table."""
    found = []
    for proc in processes:
        try:
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def wait_gone(processes: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    return alive


def stop_and_check(serve: Serve, first: int, second: int | None = None) -> None:
    processes = serve.tree()
    ray_processes = [p for p in processes if p.pid != serve.process.pid]
    assert any("gcs_server" in p.name() for p in ray_processes), [p.name() for p in ray_processes]
    started = time.monotonic()
    serve.process.send_signal(first)
    if second is not None:
        time.sleep(1.0)  # while it stops the local Ray
        serve.process.send_signal(second)
    try:
        serve.process.wait(STOP_S)
    except subprocess.TimeoutExpired:
        serve.kill()
        raise AssertionError(
            f"lbgat serve still running {STOP_S} s after the signal:\n{serve.output()}"
        ) from None
    alive = wait_gone(processes, max(1.0, STOP_S - (time.monotonic() - started)))
    if alive:
        for proc in alive:
            proc.kill()
        raise AssertionError(f"left behind: {[(p.pid, p.name()) for p in alive]}\n{serve.output()}")
    if first == signal.SIGKILL:  # no cleanup of its own: the head stops on its parent-death signal
        assert serve.process.returncode == -signal.SIGKILL
        return
    assert serve.process.returncode == 0, serve.output()
    assert "the local Ray is stopped" in serve.output()


@pytest.fixture
def serve(tmp_path):
    proc = Serve(tmp_path)
    try:
        yield proc
    finally:
        proc.kill()


def test_serve_starts_a_token_auth_loopback_ray_and_sigterm_stops_all_of_it(serve):
    dashboard = serve.wait_ready()
    token_file = serve.work / ".lbgat" / "ray_auth_token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 64

    # the head wants the token: a Job Submission request without it, or with another, is refused
    assert http_status(dashboard + "/api/jobs/") == 401
    assert http_status(dashboard + "/api/jobs/", "0" * 64) in (401, 403)
    assert http_status(dashboard + "/api/jobs/", token) == 200

    # every socket of the service and of its Ray listens on loopback only (README: "Network")
    sockets = listening(serve.tree())
    assert {name for name, _, _ in sockets} >= {"gcs_server", "raylet"}, sockets
    assert [s for s in sockets if not is_loopback(s[1])] == [], sockets

    # the admin it made is kept in its state folder; the user's home is not touched
    credentials = serve.work / ".lbgat" / "credentials.json"
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert serve.url in credentials.read_text()

    stop_and_check(serve, signal.SIGTERM)
    assert list(serve.home.rglob("*")) == []


@pytest.mark.parametrize(
    "first, second",
    [(signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM), (signal.SIGKILL, None)],
    ids=["sigint-twice", "sighup-then-sigterm", "sigkill"],
)
def test_serve_stops_its_ray_on_other_signals_and_a_second_signal_leaves_no_orphans(serve, first, second):
    serve.wait_ready()
    stop_and_check(serve, first, second)
    assert list(serve.home.rglob("*")) == []


def test_serve_against_a_cluster_that_wants_a_token_it_lacks_fails_at_once(ray_cluster, tmp_path):
    for extra in ({}, {"LBGAT_RAY_AUTH_TOKEN": "0" * 64}):
        env = fresh_env(tmp_path, LBGAT_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite'}", **extra)
        result = subprocess.run(
            [*lbgat_command(), "serve", "--port", str(free_port()), "--ray-address", ray_cluster],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, result.stdout + result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the Ray cluster at ") and "LBGAT_RAY_AUTH_TOKEN" in last, last
        assert "Traceback" not in result.stderr
