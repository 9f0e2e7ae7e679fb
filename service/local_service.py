"""The service in a child process on loopback: `uvicorn --factory service.app:create_app` on a free
port. Used by the quickstart, the end-to-end tests (which kill it to test restarts) and the load
benchmark, so all three start it the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from service.local_ray import free_port


class LocalService:
    def __init__(self, env: dict[str, str], log_path: str | Path, *, cwd: str | Path | None = None) -> None:
        self.env = env
        self.cwd = cwd
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def start(self, timeout_s: float = 60) -> LocalService:
        """Start it and wait until /healthz answers (the app's startup, migrations included, is done)."""
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "service.app:create_app", "--host", "127.0.0.1",
               "--port", str(self.port), "--log-level", "warning", "--no-access-log"]  # fmt: skip
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                cmd, cwd=self.cwd, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the service exited with code {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(
            f"the service did not answer /healthz within {timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM (uvicorn's graceful shutdown stops the scheduler), SIGKILL if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, as when the machine or the container dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    def __enter__(self) -> LocalService:
        return self.start() if self.process is None else self

    def __exit__(self, *_: object) -> None:
        self.stop()
