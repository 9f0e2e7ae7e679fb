"""The artifact store against a local folder and a real S3 server (SeaweedFS, see conftest.py)."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from workers import storage
from workers.settings import StoreSettings
from workers.storage import (
    ArtifactStore,
    KeyNotFound,
    LinkRefused,
    LocalStore,
    ObjectInfo,
    S3Store,
    StoreError,
    StoreUnavailable,
    experiment_prefix,
    open_store,
)

REPO = Path(__file__).resolve().parents[2]
LBGAT_VARS = [
    "LBGAT_ARTIFACT_STORE",
    "LBGAT_S3_ENDPOINT",
    "LBGAT_S3_ACCESS_KEY",
    "LBGAT_S3_SECRET_KEY",
    "LBGAT_S3_SECURE",
    "LBGAT_S3_REGION",
    "LBGAT_STORE_RETRIES",
    "LBGAT_STORE_TIMEOUT_S",
    "LBGAT_STORE_BACKOFF_S",
]


@pytest.fixture(params=["local", "s3"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    return request.getfixturevalue("store")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """No LBGAT_* variables and no .env file from the developer's machine."""
    for name in LBGAT_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


# -- both stores -----------------------------------------------------------------------------------


def test_bytes_and_json_round_trip(any_store: ArtifactStore) -> None:
    any_store.put_bytes("experiments/e1/t0/blob.bin", b"\x00\x01binary\xff")
    assert any_store.get_bytes("experiments/e1/t0/blob.bin") == b"\x00\x01binary\xff"
    summary = {"name": "e1", "final": {"clean_accuracy": 0.5, "attacks": [1, 2]}, "ok": True}
    any_store.put_json("experiments/e1/t0/summary.json", summary)
    assert any_store.get_json("experiments/e1/t0/summary.json") == summary
    assert any_store.get_bytes("experiments/e1/t0/summary.json") == json.dumps(summary, indent=2).encode()
    any_store.put_bytes("experiments/e1/t0/blob.bin", b"")  # replaced whole, empty objects allowed
    assert any_store.get_bytes("experiments/e1/t0/blob.bin") == b""


def test_put_file_and_get_file(any_store: ArtifactStore, tmp_path: Path) -> None:
    src = tmp_path / "ckpt.pt"
    src.write_bytes(os.urandom(300_000))
    any_store.put_file("experiments/e1/t0/checkpoints/last.pt", src)
    target = tmp_path / "down" / "deeper" / "last.pt"
    assert any_store.get_file("experiments/e1/t0/checkpoints/last.pt", target) == target
    assert target.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.pt"]  # no temporaries left


def test_exists(any_store: ArtifactStore) -> None:
    assert not any_store.exists("experiments/e1/metrics.jsonl")
    any_store.put_bytes("experiments/e1/metrics.jsonl", b"{}\n")
    assert any_store.exists("experiments/e1/metrics.jsonl")
    assert not any_store.exists("experiments/e1")  # a folder is not an object
    assert not any_store.exists("experiments/e1/metrics")


def test_list_is_sorted_relative_and_filtered(any_store: ArtifactStore) -> None:
    for key in ["b/2", "a/10", "a/1", "a/2/x.json", "c", "ab/z"]:
        any_store.put_bytes(key, key.encode())
    listed = any_store.list()
    assert [o.key for o in listed] == ["a/1", "a/10", "a/2/x.json", "ab/z", "b/2", "c"]
    assert ObjectInfo("a/2/x.json", len(b"a/2/x.json")) in listed
    assert [o.key for o in any_store.list("a/")] == ["a/1", "a/10", "a/2/x.json"]
    assert [o.key for o in any_store.list("a")] == ["a/1", "a/10", "a/2/x.json", "ab/z"]  # string prefix
    assert [o.key for o in any_store.list("a/1")] == ["a/1", "a/10"]
    assert any_store.list("nothing/here/") == []


def test_append_line_builds_jsonl_in_order(any_store: ArtifactStore) -> None:
    key = experiment_prefix("e1", "t0") + "metrics.jsonl"
    for epoch in range(5):
        any_store.append_line(key, json.dumps({"epoch": epoch, "loss": 1.0 / (epoch + 1)}))
    text = any_store.get_bytes(key).decode()
    assert text.endswith("\n")
    assert [json.loads(line)["epoch"] for line in text.splitlines()] == [0, 1, 2, 3, 4]
    any_store.append_line(key, '{"epoch": 5}\n')  # a trailing newline is not doubled
    assert any_store.get_bytes(key).decode().splitlines()[-1] == '{"epoch": 5}'
    with pytest.raises(ValueError, match="newline"):
        any_store.append_line(key, "a\nb")


def test_delete_prefix_counts(any_store: ArtifactStore) -> None:
    for key in [
        "experiments/e1/t0/a",
        "experiments/e1/t0/checkpoints/b",
        "experiments/e1/t1/c",
        "experiments/e10/d",
    ]:
        any_store.put_bytes(key, b"x")
    assert any_store.delete_prefix("experiments/e1/t0/") == 2
    assert [o.key for o in any_store.list()] == ["experiments/e1/t1/c", "experiments/e10/d"]
    assert any_store.delete_prefix("experiments/e1/") == 1
    assert any_store.delete_prefix("experiments/e1/") == 0
    assert [o.key for o in any_store.list()] == ["experiments/e10/d"]
    with pytest.raises(ValueError, match="everything"):
        any_store.delete_prefix("")


def test_missing_keys_raise_key_not_found(any_store: ArtifactStore, tmp_path: Path) -> None:
    any_store.put_bytes("present", b"x")  # so the bucket exists; the missing-bucket case is below
    for call in (
        lambda: any_store.get_bytes("experiments/nope/summary.json"),
        lambda: any_store.get_json("experiments/nope/summary.json"),
        lambda: any_store.get_file("experiments/nope/summary.json", tmp_path / "out.json"),
    ):
        with pytest.raises(KeyNotFound, match=r"experiments/nope/summary\.json") as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
    assert not (tmp_path / "out.json").exists()


def test_iter_chunks_streams_the_object(any_store: ArtifactStore) -> None:
    payload = os.urandom(2 * 65536 + 1000)
    any_store.put_bytes("experiments/e1/main/checkpoints/last.pt", payload)
    chunks = list(any_store.iter_chunks("experiments/e1/main/checkpoints/last.pt", 65536))
    assert [len(c) for c in chunks] == [65536, 65536, 1000]
    assert b"".join(chunks) == payload
    any_store.put_bytes("experiments/e1/empty", b"")
    assert list(any_store.iter_chunks("experiments/e1/empty")) == []

    # a missing key fails when the stream is opened, before a caller has sent anything
    with pytest.raises(KeyNotFound, match="nope"):
        any_store.iter_chunks("experiments/e1/nope")
    with pytest.raises(ValueError, match="chunk_size"):
        any_store.iter_chunks("experiments/e1/main/checkpoints/last.pt", 0)
    with pytest.raises(ValueError, match=r"'\.\.' segments"):
        any_store.iter_chunks("experiments/../secret")

    # closing a stream early releases it; the store keeps working (S3: the connection goes back)
    for _ in range(12):
        stream = any_store.iter_chunks("experiments/e1/main/checkpoints/last.pt", 1024)
        assert len(next(stream)) == 1024
        stream.close()
    assert any_store.get_bytes("experiments/e1/main/checkpoints/last.pt") == payload


def test_presigned_get(any_store: ArtifactStore) -> None:
    import httpx

    any_store.put_bytes("experiments/e1/main/summary.json", b'{"ok": true}')
    if isinstance(any_store, LocalStore):
        with pytest.raises(NotImplementedError, match="s3://"):
            any_store.presigned_get("experiments/e1/main/summary.json", 60)
        return
    url = any_store.presigned_get("experiments/e1/main/summary.json", 120)
    assert "X-Amz-Expires=120" in url and "X-Amz-Signature=" in url
    assert any_store._secret.get_secret_value() not in url
    assert httpx.get(url, timeout=10).content == b'{"ok": true}'  # no credentials needed
    tampered = url.replace("X-Amz-Expires=120", "X-Amz-Expires=999")
    assert httpx.get(tampered, timeout=10).status_code == 403
    with pytest.raises(ValueError, match="expires_s"):
        any_store.presigned_get("experiments/e1/main/summary.json", 0)


@pytest.mark.parametrize(
    "bad", ["../x", "a/../../x", "/abs", "/etc/passwd", "a//b", "a/./b", "a/", "", "a\\b"]
)
def test_key_validation(any_store: ArtifactStore, bad: str) -> None:
    expected = "invalid store key" if bad else "non-empty"
    for call in (
        lambda: any_store.put_bytes(bad, b"x"),
        lambda: any_store.get_bytes(bad),
        lambda: any_store.exists(bad),
        lambda: any_store.append_line(bad, "{}"),
    ):
        with pytest.raises(ValueError, match=expected) as info:
            call()
        assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="invalid store prefix"):
        any_store.list("../")


def test_pyarrow_filesystem_round_trip(any_store: ArtifactStore) -> None:
    """What Ray Train does with RunConfig(storage_filesystem=fs, storage_path=base/...)."""
    import pyarrow.fs

    fs, base = any_store.pyarrow_filesystem()
    folder = f"{base}/experiments/e1/t0/checkpoints/checkpoint_000001"
    fs.create_dir(folder)
    with fs.open_output_stream(f"{folder}/model.pt") as f:
        f.write(b"weights" * 1000)
    assert fs.get_file_info(f"{folder}/model.pt").type == pyarrow.fs.FileType.File
    key = "experiments/e1/t0/checkpoints/checkpoint_000001/model.pt"
    assert any_store.get_bytes(key) == b"weights" * 1000
    any_store.put_bytes("experiments/e1/t0/summary.json", b"{}")
    with fs.open_input_stream(f"{base}/experiments/e1/t0/summary.json") as f:
        assert f.read() == b"{}"
    # Folder markers pyarrow may write are not listed as objects.
    assert [o.key for o in any_store.list("experiments/")] == [key, "experiments/e1/t0/summary.json"]


def test_experiment_prefix() -> None:
    assert experiment_prefix("exp-1.a_b") == "experiments/exp-1.a_b/"
    assert experiment_prefix("e1", "trial_00003") == "experiments/e1/trial_00003/"
    for bad_id in ["", "a/b", "..", ".", "a b", "ü"]:
        with pytest.raises(ValueError, match="experiment id"):
            experiment_prefix(bad_id)
    with pytest.raises(ValueError, match="trial"):
        experiment_prefix("e1", "../t")


# -- local only ------------------------------------------------------------------------------------


def test_local_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "store")
    store.put_bytes("a/summary.json", b"old")
    assert store.url == (tmp_path / "store").resolve().as_uri()

    def fail(*args: object, **kwargs: object) -> None:  # the store renames with src_dir_fd/dst_dir_fd
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        store.put_bytes("a/summary.json", b"new")
    monkeypatch.undo()
    assert store.get_bytes("a/summary.json") == b"old"
    assert [p.name for p in (tmp_path / "store" / "a").iterdir()] == ["summary.json"]  # no temporary left
    store.check()


@pytest.fixture(params=["openat", "lstat"])
def link_store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalStore:
    """A LocalStore walking paths with openat + O_NOFOLLOW (Linux, macOS), or with the lstat checks it
    falls back to where the OS has no openat."""
    if request.param == "lstat":
        monkeypatch.setattr(storage, "_DIR_FD", False)
    return LocalStore(tmp_path / "store")


def test_local_store_follows_no_symbolic_links(link_store: LocalStore, tmp_path: Path) -> None:
    """Issue 11: a link under an experiment's prefix served /etc/passwd. Links to a file and a folder
    outside the store, to another experiment (absolute and relative), and an experiment folder that is
    itself a link are all refused for reading, writing and listing; deleting removes only the links."""
    store = link_store
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("SECRET")
    store.put_bytes("experiments/a/main/metrics.jsonl", b"{}\n")
    store.put_bytes("experiments/b/main/summary.json", b"team b")
    experiments = store.root / "experiments"
    (experiments / "a" / "linkfile").symlink_to(outside / "secret.txt")
    (experiments / "a" / "linkdir").symlink_to(outside)
    (experiments / "a" / "etc").symlink_to("/etc")
    (experiments / "a" / "other").symlink_to(experiments / "b")
    (experiments / "a" / "main" / "rel.json").symlink_to("../../b/main/summary.json")
    (experiments / "c").symlink_to(experiments / "b")  # a whole experiment's folder
    os.mkfifo(experiments / "a" / "main" / "fifo")  # not a regular file either: must not block a reader

    refused = {
        "experiments/a/linkfile": "experiments/a/linkfile",
        "experiments/a/linkdir/secret.txt": "experiments/a/linkdir",
        "experiments/a/etc/passwd": "experiments/a/etc",
        "experiments/a/other/main/summary.json": "experiments/a/other",
        "experiments/a/main/rel.json": "experiments/a/main/rel.json",
        "experiments/c/main/summary.json": "experiments/c",
    }
    for key, link in refused.items():
        for read in (store.get_bytes, store.iter_chunks, lambda k: store.get_file(k, tmp_path / "copy")):
            with pytest.raises(LinkRefused, match=f"{link!r} is a symbolic link") as info:
                read(key)
            assert isinstance(info.value, KeyNotFound)  # the API answers 404
        assert not store.exists(key)
    with pytest.raises(KeyNotFound):
        store.get_bytes("experiments/a/main/fifo")
    assert not (tmp_path / "copy").exists()

    for key in ["experiments/a/linkdir/new.txt", "experiments/c/main/new.txt"]:
        with pytest.raises(LinkRefused):
            store.put_bytes(key, b"written through a link")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]

    listed = ["experiments/a/main/metrics.jsonl", "experiments/b/main/summary.json"]
    assert [o.key for o in store.list("experiments/")] == listed
    assert [o.key for o in store.list("experiments/a/")] == listed[:1]
    assert store.list("experiments/c/") == [] and store.list("experiments/a/other/") == []

    assert store.delete_prefix("experiments/c/") == 0  # the link's target is another experiment
    assert store.delete_prefix("experiments/a/") == 1  # its one object; its links go, their targets stay
    assert not (experiments / "a").exists()
    assert (outside / "secret.txt").read_text() == "SECRET"
    assert store.get_bytes("experiments/b/main/summary.json") == b"team b"


# -- S3 only ---------------------------------------------------------------------------------------


def test_bucket_is_created_lazily_and_by_check(s3_server) -> None:
    client = s3_server.minio()
    settings = s3_server.settings()
    store = open_store(settings)
    assert isinstance(store, S3Store)
    assert not client.bucket_exists(settings.s3_bucket)
    assert store.list() == [] and not store.exists("x")  # reads of a missing bucket: empty, no error
    with pytest.raises(KeyNotFound):
        store.get_bytes("x")
    store.put_bytes("x", b"1")
    assert client.bucket_exists(settings.s3_bucket)

    other = s3_server.settings()
    open_store(other).check()
    assert client.bucket_exists(other.s3_bucket)


def test_s3_url_and_repr_hide_the_secret(s3_server) -> None:
    settings = s3_server.settings(bucket="lbgat-test-url", prefix="team/runs")
    store = open_store(settings)
    assert store.url == "s3://lbgat-test-url/team/runs"
    for text in (store.url, repr(store), str(settings), repr(settings)):
        assert s3_server.secret_key not in text


def test_s3_prefix_isolates_keys(s3_server) -> None:
    settings = s3_server.settings(prefix="team-a/runs")
    prefixed, plain = open_store(settings), open_store(s3_server.settings(bucket=settings.s3_bucket))
    prefixed.put_bytes("experiments/e1/t0/summary.json", b"{}")
    plain.put_bytes("experiments/e1/t0/summary.json", b"plain")
    raw = sorted(o.object_name for o in s3_server.minio().list_objects(settings.s3_bucket, recursive=True))
    assert raw == ["experiments/e1/t0/summary.json", "team-a/runs/experiments/e1/t0/summary.json"]
    assert [o.key for o in prefixed.list()] == ["experiments/e1/t0/summary.json"]
    assert prefixed.get_bytes("experiments/e1/t0/summary.json") == b"{}"
    assert prefixed.delete_prefix("experiments/") == 1
    assert plain.get_bytes("experiments/e1/t0/summary.json") == b"plain"
    _fs, base = prefixed.pyarrow_filesystem()
    assert base == f"{settings.s3_bucket}/team-a/runs"


def test_transient_failure_is_retried(store: S3Store, caplog: pytest.LogCaptureFixture) -> None:
    import urllib3.exceptions

    store.put_bytes("k", b"value")
    real = store._client.get_object
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= 2:
            raise urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))
        return real(*args, **kwargs)

    store._client.get_object = flaky  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="workers.storage"):
        assert store.get_bytes("k") == b"value"
    retries = [r for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 2 and calls["n"] == 3
    assert "ProtocolError" in retries[0].getMessage() and "attempt 1/3" in retries[0].getMessage()
    assert all(store._secret.get_secret_value() not in r.getMessage() for r in caplog.records)


def test_5xx_until_the_last_attempt_is_unavailable(store: S3Store, caplog: pytest.LogCaptureFixture) -> None:
    from minio.error import S3Error

    class Response:
        status = 503

    def busy(*args, **kwargs):
        raise S3Error(Response(), "SlowDown", "reduce your request rate", "/k", "req", "host")  # type: ignore[arg-type]

    store._client.stat_object = busy  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="workers.storage"), pytest.raises(StoreUnavailable) as info:
        store.exists("k")
    assert "3 time(s)" in str(info.value) and "SlowDown" in str(info.value)
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 2


def test_wrong_credentials_fail_at_once_without_the_secret(
    s3_server, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_store(s3_server.settings(s3_secret_key="wrong-secret-value-123", store_backoff_s=5))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="workers.storage"), pytest.raises(StoreError) as info:
        store.put_bytes("k", b"x")
    assert time.monotonic() - start < 4  # not retried (the backoff is 5 s)
    assert not isinstance(info.value, StoreUnavailable)
    assert "LBGAT_S3_SECRET_KEY" in str(info.value)
    assert "wrong-secret-value-123" not in str(info.value)
    assert not caplog.records
    with pytest.raises(StoreUnavailable, match="LBGAT_S3_ACCESS_KEY"):
        store.check()


def test_dead_endpoint_is_unavailable_quickly(
    dead_s3_settings: StoreSettings, caplog: pytest.LogCaptureFixture
) -> None:
    secret = dead_s3_settings.s3_secret_key.get_secret_value()  # type: ignore[union-attr]
    store = open_store(dead_s3_settings)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="workers.storage"), pytest.raises(StoreUnavailable) as info:
        store.check()
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert dead_s3_settings.s3_endpoint in message and "LBGAT_S3_ENDPOINT" in message
    assert "2 time(s)" in message and "s3://lbgat-dead" in message
    assert secret not in message and secret not in caplog.text
    assert len([r for r in caplog.records if "retrying" in r.getMessage()]) == 1
    with pytest.raises(StoreUnavailable):
        store.put_bytes("k", b"x")


def test_silent_server_times_out(caplog: pytest.LogCaptureFixture) -> None:
    """A server that accepts connections but never answers: the read timeout bounds each attempt."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        settings = StoreSettings(
            _env_file=None,  # type: ignore[call-arg]
            artifact_store="s3://lbgat-silent",
            s3_endpoint=f"127.0.0.1:{silent.getsockname()[1]}",
            s3_access_key="ak",
            s3_secret_key="sk-silent",
            store_retries=2,
            store_timeout_s=0.5,
            store_backoff_s=0.05,
        )
        start = time.monotonic()
        with (
            caplog.at_level(logging.WARNING, logger="workers.storage"),
            pytest.raises(StoreUnavailable) as info,
        ):
            open_store(settings).get_bytes("k")
        assert time.monotonic() - start < 5
    assert "timed out" in str(info.value).lower()


# -- settings --------------------------------------------------------------------------------------


def test_default_settings_are_a_local_folder(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = StoreSettings()
    assert settings.artifact_store == "file://.lbgat/artifacts"
    assert settings.local_root == (tmp_path / ".lbgat" / "artifacts").resolve()
    store = open_store()
    assert isinstance(store, LocalStore) and store.root == settings.local_root
    clean_env.setenv("LBGAT_ARTIFACT_STORE", f"file://{tmp_path}/abs")
    assert open_store().url == (tmp_path / "abs").resolve().as_uri()


def test_s3_settings_from_env_and_dotenv(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "LBGAT_ARTIFACT_STORE=s3://lbgat/experiments\nLBGAT_S3_ENDPOINT=minio:9000\n"
        "LBGAT_S3_ACCESS_KEY=ak\nLBGAT_DATABASE_URL=sqlite:///x.db\n"
    )
    clean_env.setenv("LBGAT_S3_SECRET_KEY", "from-env-secret")
    clean_env.setenv("LBGAT_S3_SECURE", "true")
    settings = StoreSettings()
    assert (settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint) == (
        "lbgat",
        "experiments",
        "minio:9000",
    )
    assert settings.s3_secure is True and settings.store_url == "s3://lbgat/experiments"
    assert (
        settings.s3_secret_key is not None and settings.s3_secret_key.get_secret_value() == "from-env-secret"
    )


def test_s3_settings_require_endpoint_and_keys(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("LBGAT_ARTIFACT_STORE", "s3://lbgat")
    with pytest.raises(
        ValidationError, match="LBGAT_S3_ENDPOINT is required when LBGAT_ARTIFACT_STORE is s3://"
    ):
        StoreSettings()
    clean_env.setenv("LBGAT_S3_ENDPOINT", "127.0.0.1:9000")
    with pytest.raises(ValidationError, match="LBGAT_S3_ACCESS_KEY is required"):
        StoreSettings()
    clean_env.setenv("LBGAT_S3_ACCESS_KEY", "ak")
    with pytest.raises(ValidationError, match="LBGAT_S3_SECRET_KEY is required"):
        StoreSettings()
    clean_env.setenv("LBGAT_S3_SECRET_KEY", "sk")
    assert StoreSettings().s3_bucket == "lbgat"
    clean_env.setenv("LBGAT_S3_ENDPOINT", "http://127.0.0.1:9000")
    with pytest.raises(ValidationError, match="without a scheme"):
        StoreSettings()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://x", "unsupported scheme ftp://"),
        ("/some/dir", "unsupported scheme"),
        ("file://", "names no directory"),
        ("s3://No_Such_Bucket", "not a valid bucket name"),
        ("s3://lbgat/a/../b", "prefix"),
    ],
)
def test_bad_store_urls_are_refused(clean_env: pytest.MonkeyPatch, url: str, message: str) -> None:
    clean_env.setenv("LBGAT_ARTIFACT_STORE", url)
    clean_env.setenv("LBGAT_S3_ENDPOINT", "127.0.0.1:9000")
    clean_env.setenv("LBGAT_S3_ACCESS_KEY", "ak")
    clean_env.setenv("LBGAT_S3_SECRET_KEY", "sk")
    with pytest.raises(ValidationError, match=message):
        StoreSettings()


def test_secret_never_printed_but_handed_to_child_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = "super-secret-value-42"
    clean_env.setenv("LBGAT_ARTIFACT_STORE", "s3://lbgat/runs")
    clean_env.setenv("LBGAT_S3_ENDPOINT", "127.0.0.1:9000")
    clean_env.setenv("LBGAT_S3_ACCESS_KEY", "ak")
    clean_env.setenv("LBGAT_S3_SECRET_KEY", secret)
    clean_env.setenv("LBGAT_STORE_RETRIES", "7")
    settings = StoreSettings()
    for text in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert secret not in text
    env = settings.as_env()
    assert env["LBGAT_S3_SECRET_KEY"] == secret and env["LBGAT_STORE_RETRIES"] == "7"
    assert all(name.startswith("LBGAT_") for name in env)
    for name in LBGAT_VARS:
        clean_env.delenv(name, raising=False)
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert StoreSettings() == settings  # the child process rebuilds the same settings

    clean_env.setenv("LBGAT_ARTIFACT_STORE", "file://rel/dir")
    local = StoreSettings().as_env()["LBGAT_ARTIFACT_STORE"]
    assert local == f"file://{(tmp_path / 'rel' / 'dir').resolve()}"  # absolute: the child's CWD differs


def test_storage_does_not_import_torch_or_ray() -> None:
    code = (
        "import sys, workers.storage, workers.settings\n"
        "bad = [m for m in ('torch', 'ray', 'pyarrow') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_with_timeout_is_one_short_attempt(dead_s3_settings: StoreSettings, tmp_path: Path) -> None:
    """The scheduler's view of the store: an outage costs it one short attempt, not the retry schedule."""
    patient = S3Store(dead_s3_settings.model_copy(update={"store_retries": 5, "store_backoff_s": 1.0}))
    quick = patient.with_timeout(0.5)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"failed 1 time\(s\)"):
        quick.check()
    assert time.monotonic() - started < 1.0  # the patient store would sleep 1+2+4+8 s between attempts
    assert (patient._attempts, quick._attempts, quick._timeout) == (5, 1, 0.5)
    local = LocalStore(tmp_path / "store")
    assert local.with_timeout(0.5) is local
    with pytest.raises(ValueError, match="timeout_s"):
        local.with_timeout(0)
