"""A local Ray cluster for `lbgat serve` without LBGAT_RAY_ADDRESS (a laptop, the quickstart).

It runs in a child process (`python -m service.local_ray`) that starts Ray with its dashboard (the
Job Submission API the service talks to), prints the dashboard URL, and shuts Ray down when told
to (SIGTERM/SIGINT) or when its parent goes away, so the service process itself never joins Ray.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

READY = "LBGAT_LOCAL_RAY_READY "


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRay:
    """Handle on the child process; `stop()` shuts Ray down and waits for it."""

    def __init__(
        self, *, num_cpus: int | None = None, num_gpus: int | None = None, timeout_s: float = 120
    ) -> None:
        cmd = [sys.executable, "-m", "service.local_ray", "--dashboard-port", str(_free_port())]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        if num_gpus is not None:
            cmd += ["--num-gpus", str(num_gpus)]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        self.dashboard_url = self._wait_ready(timeout_s)

    def _wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"local Ray exited with code {self.process.wait()} before it was ready")
            if line.startswith(READY):
                threading.Thread(target=self._drain, daemon=True).start()
                return line[len(READY) :].strip()
            sys.stdout.write(line)
        self.stop()
        raise RuntimeError(f"local Ray was not ready within {timeout_s:.0f} s")

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            sys.stdout.write(line)

    def stop(self, timeout_s: float = 60) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.local_ray")
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--num-cpus", type=int)
    parser.add_argument("--num-gpus", type=int)
    args = parser.parse_args(argv)

    import ray

    context = ray.init(
        num_cpus=args.num_cpus,
        num_gpus=args.num_gpus,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=args.dashboard_port,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}},
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(READY + f"http://{context.dashboard_url}", flush=True)

    def watch_parent() -> None:  # stdin closes when the parent dies, even by SIGKILL
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()
    stop.wait()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
