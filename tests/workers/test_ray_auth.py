"""The Ray token of a state directory, and where a client looks for a token (never the home file)."""

from __future__ import annotations

import os
import stat
import sys

import pytest

from workers.ray_auth import (
    RayTokenError,
    ensure_token_file,
    find_ray_token,
    local_ray_env,
    missing_token_message,
)


def test_a_state_directory_gets_one_private_token_that_it_keeps(tmp_path):
    path = ensure_token_file(tmp_path / "state")
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0  # 256 bits, hex
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token_file(tmp_path / "state") == path and path.read_text() == token
    assert ensure_token_file(tmp_path / "other").read_text() != token


def test_a_token_file_others_can_read_or_a_symlink_is_refused(tmp_path):
    path = ensure_token_file(tmp_path)
    path.chmod(0o644)
    with pytest.raises(RayTokenError, match="chmod 600"):
        ensure_token_file(tmp_path)
    path.unlink()
    (tmp_path / "elsewhere").write_text("x" * 64)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(RayTokenError, match="not a regular file"):
        ensure_token_file(tmp_path)


def test_the_token_is_looked_for_in_the_environment_only(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-the-home-folder")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert find_ray_token() is None
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / ".ray" / "auth_token"))
    assert find_ray_token() == "from-the-home-folder"  # asked for by name
    monkeypatch.setenv("RAY_AUTH_TOKEN", " from-the-variable\n")
    assert find_ray_token() == "from-the-variable"
    assert find_ray_token("explicit") == "explicit"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(RayTokenError, match="cannot read the Ray token file"):
        find_ray_token()


def test_a_local_ray_gets_token_auth_and_loopback(tmp_path):
    env = local_ray_env(ensure_token_file(tmp_path))
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] == (tmp_path / "ray_auth_token").read_text()
    assert env["RAY_AUTH_TOKEN_PATH"] == str((tmp_path / "ray_auth_token").resolve())
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert {int(env["AUTOSCALER_METRIC_PORT"]), int(env["DASHBOARD_METRIC_PORT"])} & {44217, 44227} == set()


def test_the_missing_token_message_says_what_to_set():
    message = missing_token_message("http://10.0.0.5:8265")
    for hint in ("10.0.0.5:8265", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "ray get-auth-token"):
        assert hint in message
    assert os.path.expanduser("~") not in message


def _fresh_env(**extra: str) -> dict[str, str]:
    """This process's environment as a new machine would have it: no Ray token, no LBGAT setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "LBGAT_"))}
    return {**env, **extra}


def test_workers_run_without_the_clusters_token_fails_at_once_saying_what_to_set(ray_head, tmp_path):
    import subprocess
    import sys
    import time

    from api_schemas.presets import get_preset

    spec = tmp_path / "spec.json"
    spec.write_text(get_preset("digits").model_dump_json())
    cmd = [sys.executable, "-m", "workers.run", "--spec", str(spec), "--ray-address", ray_head.address]
    env = _fresh_env(LBGAT_ARTIFACT_STORE=f"file://{tmp_path / 'store'}", HOME=str(tmp_path))
    for wrong in ({}, {"RAY_AUTH_TOKEN": "0" * 64}):
        started = time.monotonic()
        result = subprocess.run(cmd, env={**env, **wrong}, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr[-2000:]
        assert time.monotonic() - started < 60
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: the Ray cluster at 127.0.0.1:") and "RAY_AUTH_TOKEN" in last
        assert "Traceback" not in result.stderr


def test_the_processes_of_a_local_head_know_their_own_cluster(ray_head):
    """In-cluster lookups with no address (Ray Train's placement-group cleaner asks the state API)
    must find this head, not whatever /tmp/ray/ray_current_cluster names: the newest `ray start` on
    the machine, maybe one that has died since."""
    import ray

    @ray.remote(num_cpus=0)
    def where() -> tuple[str | None, str | None]:
        return os.environ.get("RAY_ADDRESS"), os.environ.get("RAY_AUTH_MODE")

    assert ray.get(where.remote(), timeout=60) == (ray_head.address, "token")


def test_a_job_driver_joins_its_own_head_while_another_head_runs(ray_head, tmp_path):
    """Ray's job supervisor starts every driver with RAY_ADDRESS=auto, resolved from its temp
    folder's ray_current_cluster: in a shared /tmp/ray, the newest head on the machine. Each of our
    heads has a temp folder of its own, so a job's driver joins the head it was submitted to."""
    from ray.job_submission import JobSubmissionClient

    from service.local_ray import LocalRay
    from tests.waiting import wait_for

    newer = LocalRay(state_dir=tmp_path / "state", num_cpus=1, log_path=tmp_path / "newer.log")
    try:
        assert newer.temp_dir != ray_head.temp_dir
        wait_for(
            lambda: (newer.temp_dir / "ray_current_cluster").is_file(), timeout_s=30, what="its address file"
        )
        client = JobSubmissionClient(ray_head.dashboard_url)
        job = client.submit_job(
            entrypoint=f"{sys.executable} -c \"import os; print('address=' + os.environ['RAY_ADDRESS'])\"",
            entrypoint_num_cpus=0,
        )
        wait_for(
            lambda: str(client.get_job_status(job).value) in ("SUCCEEDED", "FAILED"),
            timeout_s=60,
            what="the job to end",
        )
        assert f"address={ray_head.address}" in client.get_job_logs(job)
    finally:
        newer.stop()
    assert not newer.temp_dir.exists()
