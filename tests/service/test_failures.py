"""Failed attempts (issue 11): the stored error is one clean line, the log's end is kept apart
(`error_log_tail`, migration 0002), and a bad input (the worker's exit code 2) is not retried.

The end-to-end test runs the real service (uvicorn, the real scheduler) on SQLite and PostgreSQL
against the session's real Ray, with an entrypoint that prints what a failing worker prints: a
colourful log, then `error: ...` on stderr.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from service.db.engine import make_engine
from service.db.migrate import current_revision, downgrade, upgrade
from service.db.models import Base
from service.ray_jobs import RayJobs
from service.scheduler import LOG_TAIL_CHARS, LOG_TAIL_LINES, MAX_ERROR_CHARS, describe_failure
from tests.service.conftest import digits_spec, running_api
from tests.waiting import wait_for
from workers.run import EXIT_BAD_INPUT

PY = shlex.quote(sys.executable)

# What a worker that refuses its input prints (workers.run: `error: ...` on stderr, exit code 2),
# after coloured log lines as Ray Train's.
NOISY_WORKER = r"""
import sys
for i in range(80):
    print(f"\x1b[36m(RayTrainWorker pid={1000 + i})\x1b[0m \x1b[1mepoch {i}\x1b[0m: loss \x1b[32m0.{i:02d}\x1b[0m")
print("\x1b[33mWARNING\x1b[0m the spec was stored by an older service", file=sys.stderr)
print("error: job bad-input: invalid spec: optimization.lr: Input should be greater than 0", file=sys.stderr)
sys.exit(int(sys.argv[1]))
"""
ERROR_LINE = "error: job bad-input: invalid spec: optimization.lr: Input should be greater than 0"


def test_bad_input_fails_at_once_with_one_clean_error_line(
    database_url: str, tmp_path: Path, ray_cluster: str
) -> None:
    script = tmp_path / "noisy_worker.py"
    script.write_text(NOISY_WORKER)
    entry = f"{PY} {shlex.quote(str(script))} {EXIT_BAD_INPUT}"
    with running_api(
        database_url,
        tmp_path,
        scheduler=True,
        ray_address=ray_cluster,
        worker_entrypoint=entry,
        poll_interval_s=0.1,
    ) as api:
        alice = api.person()
        r = alice.http.post("/v1/experiments", json={"spec": digits_spec("bad-input"), "max_attempts": 3})
        assert r.status_code == 201, r.text
        exp_id = r.json()["id"]

        def failed() -> dict[str, Any] | None:
            detail = alice.http.get(f"/v1/experiments/{exp_id}").json()
            return detail if detail["state"] == "failed" else None

        detail = wait_for(failed, timeout_s=60, what=f"{exp_id} to fail")
        listed = alice.http.get("/v1/experiments").json()["items"]

    assert (detail["attempts"], detail["max_attempts"]) == (1, 3)  # not retried
    assert detail["error"] == ERROR_LINE
    log_tail = detail["error_log_tail"]
    assert "\x1b" not in log_tail and "\r" not in log_tail
    assert log_tail.splitlines()[-1] == ERROR_LINE
    assert "(RayTrainWorker pid=1079) epoch 79: loss 0.79" in log_tail
    assert "epoch 0:" not in log_tail  # only the end: at most LOG_TAIL_LINES lines
    assert len(log_tail.splitlines()) <= LOG_TAIL_LINES and len(log_tail) <= LOG_TAIL_CHARS
    states = [h["to_state"] for h in detail["history"]]
    assert [s for s in states if s != "running"] == ["queued", "dispatching", "failed"]
    assert "bad input (exit code 2)" in detail["history"][-1]["reason"]
    # the list shows the error line; the log tail is for the detail only
    [row] = [e for e in listed if e["id"] == exp_id]
    assert row["error"] == ERROR_LINE and "error_log_tail" not in row
    assert RayJobs(ray_cluster).state(f"{exp_id}-a2") is None  # no second attempt was submitted


def test_describe_failure_keeps_one_clean_bounded_line() -> None:
    colourful = "".join(f"\x1b[31mline {i}\x1b[0m\r\n" for i in range(500))
    # Ray's message quotes the log's end, colour codes and all (2,239 characters in the issue)
    message = f"Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n{colourful}"

    with_error = describe_failure("e-a1", message, colourful + "error: loss is NaN at epoch 3\n", None)
    assert with_error.error == "error: loss is NaN at epoch 3"
    assert with_error.exit_code == 1 and not with_error.bad_input  # read from Ray's message

    without = describe_failure("e-a1", message, colourful, 1)
    assert without.error == (
        "Ray job e-a1: Job entrypoint command failed with exit code 1; last log line: line 499"
    )
    assert "\x1b" not in without.log_tail and without.log_tail.splitlines()[-1] == "line 499"

    no_logs = describe_failure("e-a1", message, "", None)  # the Job API gave no log: the message's
    assert no_logs.log_tail.splitlines()[-1] == "line 499" and "truncated" not in no_logs.log_tail

    huge = describe_failure("e-a1", None, "error: " + "\x1b[1mx\x1b[0m " * 5000 + "\n\tdetail", 2)
    assert huge.bad_input and "\n" not in huge.error and len(huge.error) <= MAX_ERROR_CHARS
    assert huge.error.startswith("error: x x") and huge.error.endswith("...")
    assert len(huge.log_tail) <= LOG_TAIL_CHARS

    silent = describe_failure("e-a1", None, "", None)
    assert (silent.error, silent.log_tail, silent.exit_code) == (
        "Ray job e-a1: the Ray job failed",
        None,
        None,
    )


def test_migration_0002_adds_error_log_tail(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        upgrade(engine, "0001")
        assert "error_log_tail" not in {c["name"] for c in inspect(engine).get_columns("experiments")}
        upgrade(engine, "0002")
        assert current_revision(engine) == "0002"
        assert "error_log_tail" in {c["name"] for c in inspect(engine).get_columns("experiments")}
        upgrade(engine)
        with engine.connect() as conn:  # the models and the migrated schema (head) agree
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        downgrade(engine, "0001")
        assert "error_log_tail" not in {c["name"] for c in inspect(engine).get_columns("experiments")}
    finally:
        engine.dispose()
