"""Where artifacts live, read from the environment (`LBGAT_*`, or a `.env` file in the working directory).

The same settings serve the Ray workers and the control plane, so this module imports only pydantic.

    LBGAT_ARTIFACT_STORE   file://<path> (relative to the working directory) or s3://<bucket>[/<prefix>]
    LBGAT_S3_ENDPOINT      host:port of the S3-compatible server (MinIO, SeaweedFS, ...), no scheme
    LBGAT_S3_ACCESS_KEY    access key id
    LBGAT_S3_SECRET_KEY    secret key (a SecretStr: it prints as '**********')
    LBGAT_S3_SECURE        TLS on (true) or off (false, the default: a MinIO inside the cluster)
    LBGAT_S3_REGION        region; empty lets the client ask the server
    LBGAT_STORE_RETRIES    attempts per request before the store counts as unavailable
    LBGAT_STORE_TIMEOUT_S  connect and read timeout of one request
    LBGAT_STORE_BACKOFF_S  pause after the first failed attempt; it doubles after each further one

Secrets: `repr()`, `str()` and `model_dump()` show the secret key masked. Only `as_env()` gives its
value, to hand to a child process environment (a Ray runtime_env); never log or return what it gives.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LBGAT_"

# S3 bucket names: 3-63 characters, lower-case letters, digits, dots and hyphens, a letter or digit at both ends.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def env_name(field: str) -> str:
    """The environment variable that sets `field` (e.g. 's3_endpoint' -> 'LBGAT_S3_ENDPOINT')."""
    return f"{ENV_PREFIX}{field.upper()}"


class StoreSettings(BaseSettings):
    """Artifact store location, credentials and the retry policy of its client."""

    # extra="ignore": the same environment / .env also holds the service's LBGAT_* settings.
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    artifact_store: str = Field(
        "file://.lbgat/artifacts",
        description="file://<path> (relative paths are relative to the working directory) or s3://<bucket>[/<prefix>]",
    )
    s3_endpoint: str | None = Field(None, description="host:port of the S3 server, without http(s)://")
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_secure: bool = Field(False, description="use TLS (https) to reach the S3 server")
    s3_region: str | None = None
    store_retries: int = Field(5, ge=1, description="attempts per request (1 = no retry)")
    store_timeout_s: float = Field(10.0, gt=0, description="connect and read timeout per request, seconds")
    store_backoff_s: float = Field(0.2, ge=0, description="first backoff between attempts; doubles each time")

    @field_validator("artifact_store")
    @classmethod
    def _strip_store(cls, value: str) -> str:
        return value.strip()

    @field_validator("s3_endpoint", "s3_access_key", "s3_region", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        # `LBGAT_S3_REGION=` in a .env file means "not set", not the empty string.
        if isinstance(value, str) and not value.strip():
            return None
        return value.strip() if isinstance(value, str) else value

    @field_validator("s3_secret_key", mode="before")
    @classmethod
    def _empty_secret_is_none(cls, value: object) -> object:
        if isinstance(value, str) and not value:
            return None
        return value

    @model_validator(mode="after")
    def _check_store(self) -> StoreSettings:
        url = self.artifact_store
        scheme = self.scheme  # refuses unknown schemes
        if scheme == "file":
            if not url[len("file://") :]:
                raise ValueError(
                    f"{env_name('artifact_store')}={url!r} names no directory; "
                    "use file://<path>, e.g. file://.lbgat/artifacts"
                )
            return self
        self._split_s3()  # validates the bucket and prefix
        store = f"{env_name('artifact_store')} is s3://..."
        if not self.s3_endpoint:
            raise ValueError(
                f"{env_name('s3_endpoint')} is required when {store} (host:port of the S3 server)"
            )
        if "://" in self.s3_endpoint or "/" in self.s3_endpoint:
            raise ValueError(
                f"{env_name('s3_endpoint')}={self.s3_endpoint!r} must be host:port without a scheme or path; "
                f"set {env_name('s3_secure')}=true for https"
            )
        if not self.s3_access_key:
            raise ValueError(f"{env_name('s3_access_key')} is required when {store}")
        if self.s3_secret_key is None or not self.s3_secret_key.get_secret_value():
            raise ValueError(f"{env_name('s3_secret_key')} is required when {store}")
        return self

    # -- the parsed location -------------------------------------------------------------------------

    @property
    def scheme(self) -> Literal["file", "s3"]:
        url = self.artifact_store
        if url.startswith("file://"):
            return "file"
        if url.startswith("s3://"):
            return "s3"
        shown = url.split("://", 1)[0] + "://" if "://" in url else repr(url)
        raise ValueError(
            f"{env_name('artifact_store')} has an unsupported scheme {shown}: "
            "use file://<path> or s3://<bucket>[/<prefix>]"
        )

    @property
    def local_root(self) -> Path:
        """The directory of a file:// store, made absolute against the current working directory."""
        if self.scheme != "file":
            raise ValueError(f"{self.artifact_store!r} is not a file:// store")
        return Path(self.artifact_store[len("file://") :]).expanduser().resolve()

    @property
    def s3_bucket(self) -> str:
        return self._split_s3()[0]

    @property
    def s3_prefix(self) -> str:
        """Key prefix inside the bucket, without leading or trailing '/' ('' for none)."""
        return self._split_s3()[1]

    def _split_s3(self) -> tuple[str, str]:
        if self.scheme != "s3":
            raise ValueError(f"{self.artifact_store!r} is not an s3:// store")
        rest = self.artifact_store[len("s3://") :]
        bucket, _, prefix = rest.partition("/")
        if not _BUCKET_RE.match(bucket) or ".." in bucket:
            raise ValueError(
                f"{env_name('artifact_store')}={self.artifact_store!r}: {bucket!r} is not a valid bucket name "
                "(3-63 characters: lower-case letters, digits, '.', '-')"
            )
        prefix = prefix.strip("/")
        if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
            raise ValueError(
                f"{env_name('artifact_store')}={self.artifact_store!r}: the prefix {prefix!r} "
                "may not hold empty, '.' or '..' segments"
            )
        return bucket, prefix

    @property
    def store_url(self) -> str:
        """The store's location without credentials (safe to log): file:///abs/path or s3://bucket[/prefix]."""
        if self.scheme == "file":
            return self.local_root.as_uri()
        bucket, prefix = self._split_s3()
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    def as_env(self) -> dict[str, str]:
        """The LBGAT_* variables that recreate these settings in another process (a Ray runtime_env).

        This INCLUDES THE SECRET KEY in clear: it is meant for process environments only, never for
        logs, error messages or API responses. A file:// store is given with an absolute path, since the
        child process may run in another working directory.
        """
        env = {
            env_name("artifact_store"): (
                f"file://{self.local_root}" if self.scheme == "file" else self.artifact_store
            ),
            env_name("s3_secure"): "true" if self.s3_secure else "false",
            env_name("store_retries"): str(self.store_retries),
            env_name("store_timeout_s"): repr(self.store_timeout_s),
            env_name("store_backoff_s"): repr(self.store_backoff_s),
        }
        if self.s3_endpoint is not None:
            env[env_name("s3_endpoint")] = self.s3_endpoint
        if self.s3_access_key is not None:
            env[env_name("s3_access_key")] = self.s3_access_key
        if self.s3_secret_key is not None:
            env[env_name("s3_secret_key")] = self.s3_secret_key.get_secret_value()
        if self.s3_region is not None:
            env[env_name("s3_region")] = self.s3_region
        return env


#: The Ray resource a job asks for as its GPUs. "GPU" on real clusters; a custom resource (the tests'
#: multi-node cluster's "fake_gpu") stands for one where there are none: the control plane admits
#: jobs by how much of it the nodes report, and the workers ask for it but train on CPUs.
GPU_RESOURCE_ENV = env_name("gpu_resource")


def gpu_resource() -> str:
    """LBGAT_GPU_RESOURCE (default "GPU"), the Ray resource that counts as a GPU."""
    import os

    name = os.environ.get(GPU_RESOURCE_ENV, "").strip() or "GPU"
    if name in ("CPU", "memory", "object_store_memory"):
        raise ValueError(f"{GPU_RESOURCE_ENV}={name!r} cannot stand for a GPU; use GPU or a custom resource")
    return name


def keep_matplotlib_out_of_home() -> None:
    """Point matplotlib's config and font cache (default ~/.config/matplotlib, ~/.cache/matplotlib)
    at a folder of ours under the system's temporary directory, unless MPLCONFIGDIR already says
    where: nothing the project runs writes to the user's home. Call before importing matplotlib."""
    import os
    import tempfile

    uid = os.getuid() if hasattr(os, "getuid") else "user"
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / f"lbgat-matplotlib-{uid}"))
