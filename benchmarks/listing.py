"""Listings over a long queue: `GET /v1/experiments?state=queued&limit=50` and `GET /v1/queue`, a part
of benchmarks/service_load.py (`--skip-listing` leaves it out).

For each backend (SQLite file; a scratch PostgreSQL database, as benchmarks/scheduler_rounds.py makes
them) and each queue size, the queue is filled the same way as for the scheduler rounds (bulk insert,
100 users in 10 teams, 4 running jobs holding the cluster). The service itself (uvicorn, no Ray) is
then started on it twice: scheduler off (an API replica: positions come from a plan it makes on
demand) and scheduler on (its rounds plan over the whole queue, back to back). Each request is made
`repeat` times, by the admin (every team) and by a member of one team (a tenth of the queue); the
median and the slowest are printed (`--json`: every request's time, and how many rows had a position).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import httpx

REQUESTS = (
    ("queued, limit 50", "/v1/experiments", {"state": "queued", "limit": 50}),
    ("queued, page 2", "/v1/experiments", {"state": "queued", "limit": 50, "cursor": None}),
    ("all states, limit 50", "/v1/experiments", {"limit": 50}),
    ("queue, limit 50", "/v1/queue", {"limit": 50}),
    ("queue, default limit", "/v1/queue", {}),
)


def _timed(http: httpx.Client, path: str, params: dict[str, Any]) -> tuple[float, httpx.Response]:
    t0 = time.perf_counter()
    r = http.get(path, params=params)
    elapsed = time.perf_counter() - t0
    r.raise_for_status()
    return elapsed, r


def time_requests(url: str, token: str, repeat: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=300) as http:
        first_page = http.get("/v1/experiments", params={"state": "queued", "limit": 50}).json()
        cursor = first_page["next_cursor"]
        for label, path, params in REQUESTS:
            if "cursor" in params:
                params = {**params, "cursor": cursor}
            times, body = [], None
            for _ in range(repeat):
                elapsed, r = _timed(http, path, params)
                times.append(elapsed)
                body = r.json()
            rows = body.get("items", body.get("waiting", [])) if body else []
            out[label] = {
                "times_s": times,
                "median_s": statistics.median(times),
                "max_s": max(times),
                "rows": len(rows),
                "with_position": sum(1 for e in rows if (e.get("queue") or e).get("position") is not None),
            }
    return out


def run(
    sizes: list[int],
    backends: list[str],
    tmp: Path,
    *,
    repeat: int = 5,
    modes: tuple[str, ...] = ("off", "on"),
    verbose: bool = False,
) -> list[dict[str, Any]]:
    import scheduler_rounds
    from service_load import service

    from service.db.engine import make_engine, session_factory
    from service.db.migrate import upgrade
    from service.settings import ServiceSettings

    results = []
    for backend in backends:
        for n in sizes:
            folder = tmp / f"listing-{backend}-{n}"
            folder.mkdir(parents=True, exist_ok=True)
            with scheduler_rounds.scratch_database(backend, folder) as url:
                if verbose:
                    print(f"listing: {backend}, filling {n} queued", flush=True)
                engine = make_engine(url)
                try:
                    upgrade(engine)
                    settings = ServiceSettings(_env_file=None, database_url=url)  # type: ignore[call-arg]
                    t0 = time.perf_counter()
                    scheduler_rounds.fill(session_factory(engine), settings, n)
                    fill_s = time.perf_counter() - t0
                finally:
                    engine.dispose()
                member = None
                for mode in modes:
                    env = {"LBGAT_DATABASE_URL": url, "LBGAT_POLL_INTERVAL_S": "1"}
                    with service(
                        folder / f"svc-{mode}", scheduler=mode == "on", extra_env=env, verbose=verbose
                    ) as svc:
                        if member is None:  # one user of team t0 (a tenth of the queue), made once
                            with httpx.Client(
                                base_url=svc.url, headers={"Authorization": f"Bearer {svc.admin_token}"}
                            ) as http:
                                r = http.post("/v1/users", json={"name": "viewer", "team": "t0"})
                                r.raise_for_status()
                                member = r.json()["token"]["token"]
                        if mode == "on":
                            time.sleep(2)  # the scheduler's first rounds
                        for viewer, token in (("admin", svc.admin_token), ("team member", member)):
                            if verbose:
                                print(f"listing: {backend}, {n}, scheduler {mode}, {viewer}", flush=True)
                            results.append(
                                {
                                    "backend": backend,
                                    "queued": n,
                                    "fill_s": fill_s,
                                    "scheduler": mode,
                                    "viewer": viewer,
                                    "requests": time_requests(svc.url, token, repeat),
                                }
                            )
    return results


def print_listing(results: list[dict[str, Any]], console: Any, repeat: int) -> None:
    from rich.table import Table

    table = Table(title=f"listings over a long queue (median / slowest of {repeat} requests, seconds)")
    for column in ("database", "queued", "scheduler", "viewer", *[label for label, _, _ in REQUESTS]):
        table.add_column(column, justify="left" if column in ("database", "scheduler", "viewer") else "right")
    for r in results:
        table.add_row(
            r["backend"],
            f"{r['queued']:,}",
            r["scheduler"],
            r["viewer"],
            *[
                f"{r['requests'][label]['median_s']:.3f} / {r['requests'][label]['max_s']:.3f}"
                for label, _, _ in REQUESTS
            ],
        )
    console.print(table)
