"""A real S3-compatible server for the storage tests: SeaweedFS, started by `workers.dev_s3.seaweedfs`.

One server per test session on 127.0.0.1, every port chosen free (see workers/dev_s3.py), so parallel
runs and other sessions on the machine do not collide. Tests that need it are skipped when `weed` is
not installed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from workers.dev_s3 import S3Server, free_port
from workers.settings import StoreSettings
from workers.storage import S3Store


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


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> StoreSettings:
    """LBGAT_* variables pointing this process at a fresh bucket on the session's S3 server."""
    settings = s3_server.settings()
    for key, value in settings.as_env().items():
        monkeypatch.setenv(key, value)
    return settings
