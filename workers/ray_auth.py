"""Ray token auth for the Ray instances this project starts, and the token for the ones it joins.

Ray >= 2.52 turns token auth on for new clusters and, when no token exists, writes one to
`~/.ray/auth_token`; a client looks in `RAY_AUTH_TOKEN`, then the file `RAY_AUTH_TOKEN_PATH`, then
that same home file. We never rely on the home file: whether the suite or the quickstart works would
then depend on what an earlier Ray left in the user's home. Instead every local head we start gets a
token of its own, generated once per state directory (`<state dir>/ray_auth_token`, mode 0600) and
handed to the head, the Job Submission client and the drivers explicitly. Joining someone else's
cluster needs its token in `RAY_AUTH_TOKEN` / `RAY_AUTH_TOKEN_PATH` (or LBGAT_RAY_AUTH_TOKEN for the
service); where none is given, we say so before Ray does with a traceback.

A local head also binds to loopback only: with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` Ray keeps the
node's address 127.0.0.1 instead of replacing it by the machine's LAN address, and its GCS, raylet,
agents and client server then listen on 127.0.0.1. The flag only forbids other nodes from joining,
which a single-node dev head never wants.

Standard library only: the service (no torch, no Ray driver) imports this too.
"""

from __future__ import annotations

import os
import secrets
import socket
import stat
from pathlib import Path

TOKEN_FILE_NAME = "ray_auth_token"

#: Ray reads these (see ray/_private/authentication): the token itself wins over the file.
ENV_TOKEN, ENV_TOKEN_PATH, ENV_MODE = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"


class RayTokenError(RuntimeError):
    """A Ray cluster needs a token that cannot be found or read; the message says what to set."""


def missing_token_message(address: str | None) -> str:
    where = f"the Ray cluster at {address}" if address else "the Ray cluster"
    return (
        f"{where} has token authentication on and no token was given. Set RAY_AUTH_TOKEN to the "
        "cluster's token, or RAY_AUTH_TOKEN_PATH to a file that holds it (for `lbgat serve`, "
        "LBGAT_RAY_AUTH_TOKEN also works); `ray get-auth-token` on the head node prints it."
    )


def token_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / TOKEN_FILE_NAME


def ensure_token_file(state_dir: str | Path) -> Path:
    """`<state_dir>/ray_auth_token`, created with a new 256-bit token (mode 0600) when missing.

    The same state directory keeps its token across restarts, so drivers and clients started later
    (a `workers.run` beside a running `lbgat serve`) find the same one. A token file that others
    may read, or that is a symlink, is refused rather than silently used."""
    folder = Path(state_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = token_path(folder)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        info = path.lstat()
        if not stat.S_ISREG(info.st_mode):
            raise RayTokenError(f"{path} is not a regular file; remove it and start again") from None
        if info.st_mode & 0o077:
            raise RayTokenError(
                f"{path} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                f"run `chmod 600 {path}` or remove it to have a new token generated"
            ) from None
        if not read_token_file(path):
            raise RayTokenError(f"{path} is empty; remove it to have a new token generated") from None
        return path
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


def read_token_file(path: str | Path) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise RayTokenError(f"cannot read the Ray token file {path}: {exc.strerror or exc}") from None


def find_ray_token(explicit: str | None = None) -> str | None:
    """The token to send to a Ray cluster: `explicit`, else RAY_AUTH_TOKEN, else the file named by
    RAY_AUTH_TOKEN_PATH. Never `~/.ray/auth_token` by itself: point RAY_AUTH_TOKEN_PATH at it to
    use it."""
    if explicit:
        return explicit.strip()
    if os.environ.get(ENV_TOKEN, "").strip():
        return os.environ[ENV_TOKEN].strip()
    if os.environ.get(ENV_TOKEN_PATH):
        return read_token_file(os.environ[ENV_TOKEN_PATH]) or None
    return None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ray_env(token_file: str | Path) -> dict[str, str]:
    """Environment for a single-node Ray started by us (the `ray start --head` process, or a driver
    whose `ray.init()` starts the instance): token auth on with this token, every address loopback,
    and free ports for the two metrics servers Ray otherwise puts on fixed ports (44217, 44227),
    where a second head on the machine would collide."""
    path = Path(token_file).resolve()
    return {
        ENV_MODE: "token",
        ENV_TOKEN: read_token_file(path),
        ENV_TOKEN_PATH: str(path),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "AUTOSCALER_METRIC_PORT": str(free_port()),
        "DASHBOARD_METRIC_PORT": str(free_port()),
    }


def is_auth_error(exc: BaseException) -> bool:
    """Ray's AuthenticationError (or a wrapper of it) anywhere in the exception's chain."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if type(seen).__name__ == "AuthenticationError" or "authentication token" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def gcs_refuses(address: str, token: str | None, timeout_s: float = 10.0) -> bool:
    """True when the Ray cluster whose GCS is at `address` (host:port) refuses `token` (or its
    absence). A driver without the right token does not fail: it retries the GCS for minutes, so we
    ask first with one cheap call (the cluster id). Unreachable or anything else: False, and
    `ray.init` reports it as it always does."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout_s, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
    return False
