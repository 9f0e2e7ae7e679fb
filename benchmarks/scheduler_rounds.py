"""Scheduler rounds over a large queue (issue 13), a part of benchmarks/service_load.py.

For each backend (SQLite file; a scratch database on the PostgreSQL server at 127.0.0.1:5432, created
and dropped here) and each queue size, the queue is filled by bulk insert (copies of one job created
the normal way, spread over 100 users in 10 teams, priorities 0-2, distinct submission times), with
4 running jobs holding the cluster's 4 GPUs, so that every queued job waits for capacity: the steady
state of a busy cluster, where each round plans over the whole queue and admits nobody. Ray is a
stand-in answering "running" for the holders (the round's cost is the service's, not the
dashboard's). A round is `Scheduler.run_round()` (reconcile the holders, plan, claim nothing); its
plan alone (`Scheduler.schedule()`) is timed too.

Resident memory at the largest size: the service itself (uvicorn, scheduler on, every round planning
over the full queue) started on the filled SQLite database, after a few rounds and the queue views.
"""

from __future__ import annotations

import os
import secrets
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

PG_ADMIN_URL = os.environ.get("LBGAT_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
HOLDERS = 4  # running jobs, one GPU each: the whole cluster
USERS, TEAMS = 100, 10


class StandInRay:
    """What the scheduler asks Ray, answered at once: the holders run, the cluster has HOLDERS GPUs."""

    address = "stand-in"

    def __init__(self) -> None:
        from service.ray_jobs import Capacity

        self._capacity = Capacity(gpus=HOLDERS, cpus=64, nodes=2, gpu_resource="GPU", has_gpu_resource=True)
        self.submitted: list[str] = []

    def capacity(self):
        return self._capacity

    def state(self, submission_id: str):
        from service.ray_jobs import RayJobState

        return RayJobState("RUNNING", None, None, None, None)

    def submit(self, *, submission_id: str, **_: Any) -> str:
        self.submitted.append(submission_id)
        return submission_id

    def stop(self, submission_id: str) -> bool:
        return True

    def logs(self, submission_id: str) -> str:
        return ""

    def check(self) -> None:
        pass


@contextmanager
def scratch_database(backend: str, folder: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'rounds.db'}"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lbgat_bench_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fill(sessions, settings, n_queued: int) -> None:
    """n_queued queued jobs and HOLDERS running ones, by bulk insert of copies of one real job."""
    from sqlalchemy import insert, select

    from api_schemas import parse_spec
    from api_schemas.presets import get_preset
    from service.auth import create_user
    from service.db.engine import run_tx
    from service.db.models import Experiment
    from service.jobs import create_experiment

    owners = [
        run_tx(sessions, lambda s, i=i: create_user(s, name=f"u{i}", team=f"t{i % TEAMS}"))
        for i in range(USERS)
    ]
    spec = parse_spec(
        get_preset("digits", ["name=bench", "resources.cpus_per_worker=1"]).model_dump(mode="json")
    )
    first = run_tx(
        sessions, lambda s: create_experiment(s, owner=owners[0], spec=spec, settings=settings)[0].id
    )
    table = Experiment.__table__
    with sessions() as s:
        template = dict(s.execute(select(table).where(table.c.id == first)).mappings().one())
        users = [(u.id, u.team_id) for u in s.scalars(select(type(owners[0])))]
    base = template["created_at"]
    rows = []
    for i in range(n_queued + HOLDERS):
        owner_id, team_id = users[i % len(users)]
        row = {
            **template,
            "id": f"b{i:07d}{secrets.token_hex(3)}",
            "owner_id": owner_id,
            "team_id": team_id,
            "priority": i % 3,
            "created_at": base + timedelta(milliseconds=i),
            "updated_at": base + timedelta(milliseconds=i),
            "idempotency_key": None,
        }
        if i < HOLDERS:
            row.update(
                state="running",
                gpus=1.0,
                attempts=1,
                ray_job_id=f"{row['id']}-a1",
                dispatched_at=base - timedelta(hours=1),
                started_at=base - timedelta(hours=1),
            )
        rows.append(row)
    with sessions() as s, s.begin():
        s.execute(table.delete().where(table.c.id == first))
        for k in range(0, len(rows), 5000):
            s.execute(insert(table), rows[k : k + 5000])


def time_rounds(database_url: str, n_queued: int, store_root: Path, rounds: int) -> dict[str, Any]:
    from service.db.engine import make_engine, session_factory
    from service.db.migrate import upgrade
    from service.scheduler import Scheduler
    from service.settings import ServiceSettings
    from workers.settings import StoreSettings
    from workers.storage import LocalStore

    settings = ServiceSettings(  # type: ignore[call-arg]
        _env_file=None, database_url=database_url, ray_address="stand-in", max_running_jobs=HOLDERS + 4
    )
    engine = make_engine(database_url)
    try:
        upgrade(engine)
        sessions = session_factory(engine)
        t0 = time.perf_counter()
        fill(sessions, settings, n_queued)
        fill_s = time.perf_counter() - t0
        store_settings = StoreSettings(_env_file=None, artifact_store=f"file://{store_root}")  # type: ignore[call-arg]
        ray = StandInRay()
        scheduler = Scheduler(
            sessions=sessions,
            settings=settings,
            store=LocalStore(store_settings.local_root),
            ray=ray,  # type: ignore[arg-type]
            store_settings=store_settings,
        )
        full, plan_only = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            scheduler.run_round()
            full.append(time.perf_counter() - t0)
        for _ in range(rounds):
            t0 = time.perf_counter()
            scheduler.schedule()
            plan_only.append(time.perf_counter() - t0)
        waiting = len(scheduler.queue_view()) if hasattr(scheduler, "queue_view") else None
        assert not ray.submitted, "the benchmark's cluster is full: nothing may be dispatched"
        return {
            "queued": n_queued,
            "fill_s": fill_s,
            "round_median_s": statistics.median(full),
            "round_max_s": max(full),
            "plan_median_s": statistics.median(plan_only),
            "rounds": rounds,
            "waiting_in_view": waiting,
        }
    finally:
        engine.dispose()


def service_memory(database_url: str, folder: Path, n_queued: int, verbose: bool) -> dict[str, Any]:
    """RSS of the service (scheduler on) over the filled database, after a few rounds over it."""
    import httpx
    from service_load import rss_mb, service  # the benchmark script's own helpers (benchmarks/)

    # no Ray: the scheduler's rounds still plan over every queued job ("Ray is not reachable")
    env = {"LBGAT_DATABASE_URL": database_url, "LBGAT_POLL_INTERVAL_S": "1"}
    with service(folder / "mem", scheduler=True, extra_env=env, verbose=verbose) as svc:
        time.sleep(1)
        start, _ = rss_mb(svc.pid)
        with httpx.Client(
            base_url=svc.url, headers={"Authorization": f"Bearer {svc.admin_token}"}, timeout=120
        ) as h:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the first rounds over the whole queue
                page = h.get("/v1/experiments", params={"state": "queued", "limit": 50}).json()
                items = page.get("items") or []
                if items and items[0].get("queue"):
                    break
                time.sleep(1)
            time.sleep(5)
            h.get("/v1/queue")
            h.get("/v1/experiments", params={"state": "queued", "limit": 200})
        rss, hwm = rss_mb(svc.pid)
    return {"queued": n_queued, "rss_start_mb": start, "rss_mb": rss, "peak_rss_mb": hwm}


def run(
    sizes: list[int], backends: list[str], tmp: Path, *, rounds: int = 5, verbose: bool = False
) -> dict[str, Any]:
    out: dict[str, Any] = {"rounds": [], "memory": None}
    for backend in backends:
        for n in sizes:
            folder = tmp / f"rounds-{backend}-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            with scratch_database(backend, folder) as url:
                if verbose:
                    print(f"rounds: {backend}, {n} queued", flush=True)
                figures = time_rounds(url, n, folder / "store", rounds)
                out["rounds"].append({"backend": backend, **figures})
                if backend == "sqlite" and n == max(sizes):
                    out["memory"] = service_memory(url, folder, n, verbose)
    return out


def print_rounds(figures: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"scheduler round, {HOLDERS} running jobs holding the cluster, the rest queued")
    for column in ("database", "queued jobs", "round median s", "round max s", "plan only s", "fill s"):
        table.add_column(column, justify="left" if column == "database" else "right")
    for r in figures["rounds"]:
        table.add_row(
            r["backend"],
            f"{r['queued']:,}",
            f"{r['round_median_s']:.3f}",
            f"{r['round_max_s']:.3f}",
            f"{r['plan_median_s']:.3f}",
            f"{r['fill_s']:.1f}",
        )
    console.print(table)
    mem = figures.get("memory")
    if mem:
        console.print(
            f"service RSS with {mem['queued']:,} queued (SQLite, scheduler on): {mem['rss_mb']:.0f} MB "
            f"(peak {mem['peak_rss_mb']:.0f} MB, {mem['rss_start_mb']:.0f} MB at start); target < 500 MB"
        )
