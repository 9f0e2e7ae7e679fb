"""Load benchmark of the control plane on loopback: submission latency and throughput with 100
concurrent clients, resident memory with 10,000 queued jobs, submit-to-running time next to Ray's
own Job Submission API, and a scheduler round's duration with 1,000 to 100,000 queued jobs on SQLite
and PostgreSQL with the service's memory at the largest (benchmarks/scheduler_rounds.py), and the
listings over such queues (benchmarks/listing.py). With `--preemption`, also preemption latency:
real digits training on a local multi-node Ray (benchmarks/preemption_latency.py). It starts (and
stops) everything it measures; see benchmarks/README.md.

    python benchmarks/service_load.py            # the figures the issue's targets refer to
    python benchmarks/service_load.py --quick    # fewer requests and jobs: a minute or two
    python benchmarks/service_load.py --skip-load --skip-memory --skip-dispatch --skip-listing   # the rounds alone
    python benchmarks/service_load.py --skip-load --skip-memory --skip-dispatch --skip-rounds    # the listings alone
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import listing  # noqa: E402  (benchmarks/, beside this script)
import preemption_latency  # noqa: E402
import scheduler_rounds  # noqa: E402

from api_schemas.presets import PRESETS  # noqa: E402
from service.local_service import LocalService  # noqa: E402

SLEEP_ENTRYPOINT = 'python -c "import time; time.sleep({seconds})"'
TERMINAL = {"succeeded", "failed", "cancelled"}


def log(verbose: bool, *parts: object) -> None:
    if verbose:
        print(*parts, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------ service


@dataclass
class Service:
    url: str
    pid: int
    admin_token: str
    process: subprocess.Popen
    tokens: list[str] = field(default_factory=list)


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB (10^6 bytes), from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024 / 1e6  # kB (KiB) -> MB
    return values["VmRSS"], values["VmHWM"]


@contextmanager
def service(
    workdir: Path, *, scheduler: bool, extra_env: dict[str, str] | None = None, verbose: bool = False
) -> Iterator[Service]:
    """`uvicorn --factory service.app:create_app` in a subprocess on a free port, SQLite and a local
    store under `workdir`, an admin token made up here; stopped (SIGTERM, then SIGKILL) on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = "lbg_bench_" + secrets.token_urlsafe(24)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "LBGAT_DATABASE_URL": f"sqlite:///{workdir / 'lbgat.db'}",
        "LBGAT_ARTIFACT_STORE": f"file://{workdir / 'artifacts'}",
        "LBGAT_ADMIN_TOKEN": token,
        "LBGAT_SCHEDULER_ENABLED": "true" if scheduler else "false",
        "LBGAT_WORKER_PYTHON": sys.executable,
        **(extra_env or {}),
    }
    proc = LocalService(env, workdir / "service.log", cwd=workdir)
    try:
        proc.start()
        yield Service(url=proc.url, pid=proc.pid, admin_token=token, process=proc.process)
    finally:
        proc.stop(timeout_s=15)
        if verbose:
            print(proc.log_tail(200), file=sys.stderr)


def make_users(svc: Service, n: int) -> list[str]:
    """n users in one team (the clients are spread over them, as a team would be); their tokens."""
    tokens = []
    with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.admin_token}"}) as http:
        for i in range(n):
            r = http.post("/v1/users", json={"name": f"bench{i}", "team": "bench"})
            r.raise_for_status()
            tokens.append(r.json()["token"]["token"])
    return tokens


# ------------------------------------------------------------------------------------------ load


def _body() -> bytes:
    return json.dumps({"spec": PRESETS["digits"].data, "priority": 0}).encode()


async def _post(http: httpx.AsyncClient, token: str, body: bytes) -> int:
    r = await http.post(
        "/v1/experiments",
        content=body,
        headers={
            "Authorization": f"Bearer {token}",
            "Content-Type": "application/json",
            "Idempotency-Key": str(uuid.uuid4()),
        },
    )
    return r.status_code


async def _closed(url: str, tokens: list[str], per_client: int, start_at: float) -> dict[str, Any]:
    """Each client submits back to back `per_client` times."""
    body = _body()
    lat: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=len(tokens), max_keepalive_connections=len(tokens))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        await asyncio.sleep(max(0.0, start_at - time.time()))

        async def one_client(token: str) -> None:
            for _ in range(per_client):
                t0 = time.perf_counter()
                try:
                    status = await _post(http, token, body)
                except httpx.HTTPError as exc:
                    errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                    continue
                if status == 201:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors[str(status)] = errors.get(str(status), 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(t) for t in tokens))
        wall = time.perf_counter() - t0
    return {"latencies": lat, "errors": errors, "wall": wall}


async def _open(
    url: str, tokens: list[str], offsets: list[float], period: float, duration: float, start_at: float
) -> dict[str, Any]:
    """Each client submits every `period` seconds from its offset on, whether or not its previous
    request has been answered (open loop); latency counts from the scheduled send time."""
    body = _body()
    lat: list[float] = []
    errors: dict[str, int] = {}
    pending: list[asyncio.Task] = []
    limits = httpx.Limits(max_connections=4 * len(tokens), max_keepalive_connections=len(tokens))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:

        async def one_request(token: str, due: float) -> None:
            try:
                status = await _post(http, token, body)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                return
            if status == 201:
                lat.append(time.perf_counter() - due)
            else:
                errors[str(status)] = errors.get(str(status), 0) + 1

        async def one_client(token: str, offset: float) -> None:
            k = 0
            while True:
                due_wall = start_at + offset + k * period
                if due_wall - start_at >= duration:
                    return
                await asyncio.sleep(max(0.0, due_wall - time.time()))
                due = time.perf_counter() - max(0.0, time.time() - due_wall)
                pending.append(asyncio.create_task(one_request(token, due)))
                k += 1

        await asyncio.gather(*(one_client(t, o) for t, o in zip(tokens, offsets)))
        await asyncio.gather(*pending)
        wall = time.time() - start_at  # until the last answer: a service that falls behind shows it
    return {"latencies": lat, "errors": errors, "wall": wall}


def _worker(job: tuple) -> dict[str, Any]:
    kind, args = job[0], job[1:]
    return asyncio.run(_closed(*args) if kind == "closed" else _open(*args))


def run_clients(
    svc: Service,
    *,
    clients: int,
    procs: int,
    mode: str,
    per_client: int = 0,
    rate: float = 0,
    duration: float = 0,
) -> dict[str, Any]:
    """`clients` concurrent clients over `procs` processes (one Python event loop would itself be
    the bottleneck); all start at the same moment."""
    tokens = [svc.tokens[i % len(svc.tokens)] for i in range(clients)]
    procs = max(1, min(procs, clients))
    start_at = time.time() + 1.5 + 0.2 * procs  # after the processes are up
    period = clients / rate if rate else 0.0
    jobs = []
    for p in range(procs):
        mine = list(range(p, clients, procs))
        if mode == "closed":
            jobs.append(("closed", svc.url, [tokens[i] for i in mine], per_client, start_at))
        else:
            offsets = [period * i / clients for i in mine]  # evenly spread phases
            jobs.append(("open", svc.url, [tokens[i] for i in mine], offsets, period, duration, start_at))
    with multiprocessing.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_worker, jobs)
    lat = [x for part in parts for x in part["latencies"]]
    errors: dict[str, int] = {}
    for part in parts:
        for key, count in part["errors"].items():
            errors[key] = errors.get(key, 0) + count
    wall = max(part["wall"] for part in parts)
    return {"mode": mode, "latencies": lat, "errors": errors, "wall": wall, "ok": len(lat)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def summarize(run: dict[str, Any], offered: float | None = None) -> dict[str, Any]:
    lat = run["latencies"]
    return {
        "mode": run["mode"],
        "requests": run["ok"],
        "errors": run["errors"],
        "offered_per_s": offered,
        "throughput_per_s": run["ok"] / run["wall"] if run["wall"] else math.nan,
        "p50_ms": 1000 * percentile(lat, 50),
        "p95_ms": 1000 * percentile(lat, 95),
        "p99_ms": 1000 * percentile(lat, 99),
        "max_ms": 1000 * max(lat) if lat else math.nan,
    }


def fill_queue(svc: Service, *, target: int, already: int, clients: int, procs: int) -> int:
    """Submit until `target` jobs are queued (the scheduler is off, or admits none); returns the count."""
    queued = already
    while queued < target:
        per_client = math.ceil((target - queued) / clients)
        run = run_clients(svc, clients=clients, procs=procs, mode="closed", per_client=per_client)
        if run["ok"] == 0:
            raise RuntimeError(f"no submission succeeded while filling the queue: {run['errors']}")
        queued += run["ok"]
    return queued


def queued_count(svc: Service) -> int | None:
    """Queued jobs as /metrics reports them (`lbgat_jobs{state="queued"}`), if it answers."""
    headers = {"Authorization": f"Bearer {svc.admin_token}"}
    try:
        r = httpx.get(svc.url + "/metrics", headers=headers, timeout=30)
    except httpx.HTTPError:
        return None
    for line in r.text.splitlines() if r.status_code == 200 else []:
        if line.startswith("lbgat_jobs{") and 'state="queued"' in line:
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def touch_views(svc: Service) -> None:
    """What people do while the queue is long: list it, read one job, scrape /metrics."""
    headers = {"Authorization": f"Bearer {svc.admin_token}"}
    with httpx.Client(base_url=svc.url, headers=headers, timeout=60) as http:
        page = http.get("/v1/experiments", params={"limit": 200}).json()
        if page.get("items"):
            http.get(f"/v1/experiments/{page['items'][-1]['id']}")
        http.get("/v1/experiments", params={"state": "queued", "limit": 50})
        http.get("/metrics")


# ------------------------------------------------------------------------------------------ Ray


def start_ray(tmp: Path) -> Any:
    """A Ray head with 2 CPUs on free ports (`ray start --head`, token auth on with a token of its own
    in `tmp`), as `lbgat serve` starts it."""
    from service.local_ray import LocalRay

    return LocalRay(state_dir=tmp / "ray", num_cpus=2)


def ray_job_client(head: Any) -> Any:
    """Ray's own Job Submission client, with the cluster's token (what a user of Ray alone would run)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers={"Authorization": f"Bearer {head.token}"})


def direct_ray_once(client: Any, entrypoint: str, poll_s: float) -> float:
    from ray.job_submission import JobStatus

    t0 = time.perf_counter()
    sid = client.submit_job(entrypoint=entrypoint)
    while True:
        status = client.get_job_status(sid)
        if status == JobStatus.RUNNING:
            elapsed = time.perf_counter() - t0
            break
        if status.is_terminal():
            raise RuntimeError(f"direct Ray job {sid} ended {status} before running")
        time.sleep(poll_s)
    client.stop_job(sid)
    while not client.get_job_status(sid).is_terminal():
        time.sleep(0.05)
    return elapsed


def ours_once(svc: Service, poll_s: float, timeout_s: float = 120) -> float:
    headers = {"Authorization": f"Bearer {svc.admin_token}", "Idempotency-Key": str(uuid.uuid4())}
    with httpx.Client(base_url=svc.url, headers=headers, timeout=30) as http:
        t0 = time.perf_counter()
        r = http.post("/v1/experiments", json={"spec": PRESETS["digits"].data})
        r.raise_for_status()
        exp_id = r.json()["id"]
        deadline = time.monotonic() + timeout_s
        while True:
            state = http.get(f"/v1/experiments/{exp_id}").json()
            if state["state"] == "running":
                elapsed = time.perf_counter() - t0
                break
            if state["state"] in TERMINAL:
                raise RuntimeError(
                    f"experiment {exp_id} ended {state['state']} before running: {state.get('error')}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"experiment {exp_id} not running after {timeout_s:.0f} s: {state}")
            time.sleep(poll_s)
        http.post(f"/v1/experiments/{exp_id}/cancel").raise_for_status()
        while http.get(f"/v1/experiments/{exp_id}").json()["state"] not in TERMINAL:
            time.sleep(0.05)
    return elapsed


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer requests and jobs (a smoke run)")
    p.add_argument("--clients", type=int, default=100, help="concurrent clients (default 100)")
    p.add_argument("--procs", type=int, default=min(4, os.cpu_count() or 1), help="client processes")
    p.add_argument("--serial", type=int, help="submissions of one client alone first (default 200; quick 50)")
    p.add_argument("--per-client", type=int, help="closed loop: submissions per client (default 20; quick 5)")
    p.add_argument("--rate", type=float, default=100.0, help="open loop: offered submissions/s, all clients")
    p.add_argument("--duration", type=float, help="open loop: seconds (default 20; quick 5)")
    p.add_argument("--users", type=int, default=10, help="users the clients are spread over")
    p.add_argument("--queued", type=int, help="jobs queued for the memory figure (default 10000; quick 2000)")
    p.add_argument("--runs", type=int, help="submit-to-running runs per side (default 5; quick 3)")
    p.add_argument("--poll-ms", type=float, default=20.0, help="status polling period of both sides")
    p.add_argument(
        "--sleep-s", type=int, default=30, help="the Ray job's `time.sleep` (it is stopped once running)"
    )
    p.add_argument("--skip-load", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-dispatch", action="store_true")
    p.add_argument("--skip-rounds", action="store_true")
    p.add_argument(
        "--rounds-sizes",
        help="queued jobs of the scheduler-round part (default 1000,10000,100000; quick 1000,10000)",
    )
    p.add_argument(
        "--rounds-backends", default="sqlite,postgres", help="databases of the scheduler-round part"
    )
    p.add_argument("--rounds-repeat", type=int, default=3, help="rounds timed per size (median and max)")
    p.add_argument("--skip-listing", action="store_true")
    p.add_argument(
        "--listing-sizes",
        help="queued jobs of the listing part (default 1000,10000,100000; quick 1000,10000)",
    )
    p.add_argument("--listing-backends", default="sqlite,postgres", help="databases of the listing part")
    p.add_argument(
        "--listing-repeat", type=int, default=5, help="requests timed per listing (median and max)"
    )
    p.add_argument(
        "--preemption",
        action="store_true",
        help="also measure preemption latency (digits training on a local Ray cluster; needs torch)",
    )
    p.add_argument("--preemption-runs", type=int, help="preemptions measured (default 3; quick 2)")
    p.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="progress and the service's log on stderr")
    args = p.parse_args(argv)
    args.serial = args.serial or (50 if args.quick else 200)
    args.per_client = args.per_client or (5 if args.quick else 20)
    args.duration = args.duration or (5.0 if args.quick else 20.0)
    args.queued = args.queued or (2000 if args.quick else 10_000)
    args.runs = args.runs or (3 if args.quick else 5)
    args.preemption_runs = args.preemption_runs or (2 if args.quick else 3)
    args.rounds_sizes = [
        int(n)
        for n in (args.rounds_sizes or ("1000,10000" if args.quick else "1000,10000,100000")).split(",")
    ]
    args.rounds_backends = [b.strip() for b in args.rounds_backends.split(",") if b.strip()]
    args.listing_sizes = [
        int(n)
        for n in (args.listing_sizes or ("1000,10000" if args.quick else "1000,10000,100000")).split(",")
    ]
    args.listing_backends = [b.strip() for b in args.listing_backends.split(",") if b.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict[str, Any] = {"clients": args.clients, "client_procs": args.procs, "cpus": os.cpu_count()}
    report["args"] = {k: v for k, v in vars(args).items() if k not in ("json", "verbose")}
    with tempfile.TemporaryDirectory(prefix="lbgat-bench-") as tmp:
        if not (args.skip_load and args.skip_memory):
            with service(Path(tmp) / "api", scheduler=False, verbose=args.verbose) as svc:
                svc.tokens = make_users(svc, args.users)
                rss_start, _ = rss_mb(svc.pid)
                report["rss_start_mb"] = rss_start
                submitted = 0
                if not args.skip_load:
                    log(args.verbose, f"serial: 1 client x {args.serial}")
                    serial = run_clients(svc, clients=1, procs=1, mode="closed", per_client=args.serial)
                    log(args.verbose, f"closed loop: {args.clients} clients x {args.per_client}")
                    closed = run_clients(
                        svc, clients=args.clients, procs=args.procs, mode="closed", per_client=args.per_client
                    )
                    log(args.verbose, f"open loop: {args.rate:g}/s for {args.duration:g} s")
                    opened = run_clients(
                        svc, clients=args.clients, procs=args.procs, mode="open", rate=args.rate,
                        duration=args.duration,
                    )  # fmt: skip
                    report["serial"] = summarize(serial)
                    report["closed_loop"] = summarize(closed)
                    report["open_loop"] = summarize(opened, offered=args.rate)
                    submitted = serial["ok"] + closed["ok"] + opened["ok"]
                if not args.skip_memory:
                    log(args.verbose, f"filling the queue to {args.queued} jobs")
                    t0 = time.perf_counter()
                    queued = fill_queue(
                        svc, target=args.queued, already=submitted, clients=args.clients, procs=args.procs
                    )
                    fill_s = time.perf_counter() - t0
                    touch_views(svc)
                    rss, hwm = rss_mb(svc.pid)
                    report["memory"] = {
                        "queued": queued,
                        "queued_per_metrics": queued_count(svc),
                        "rss_mb": rss,
                        "peak_rss_mb": hwm,
                        "fill_s": fill_s,
                    }
        if not args.skip_dispatch:
            report["dispatch"] = dispatch_part(args, Path(tmp))
        if not args.skip_rounds:
            report["scheduler_rounds"] = scheduler_rounds.run(
                args.rounds_sizes,
                args.rounds_backends,
                Path(tmp),
                rounds=args.rounds_repeat,
                verbose=args.verbose,
            )
        if not args.skip_listing:
            report["listing"] = listing.run(
                args.listing_sizes,
                args.listing_backends,
                Path(tmp),
                repeat=args.listing_repeat,
                verbose=args.verbose,
            )
        if args.preemption:
            report["preemption"] = preemption_latency.run(
                runs=args.preemption_runs, tmp=Path(tmp) / "preemption", verbose=args.verbose
            )
    print_report(report, args)
    if "preemption" in report:
        preemption_latency.print_report(report["preemption"])
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    return 0


def dispatch_part(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Submit-to-running: ours (POST -> state `running`) next to a direct Ray Job API submission of
    the same entrypoint, alternating, on one local Ray with free capacity."""

    entrypoint = SLEEP_ENTRYPOINT.format(seconds=args.sleep_s)
    poll = args.poll_ms / 1000
    log(args.verbose, "starting a local Ray (2 CPUs, dashboard on)")
    head = start_ray(tmp)
    dashboard = head.dashboard_url
    try:
        env = {
            "LBGAT_RAY_ADDRESS": dashboard,
            "LBGAT_RAY_AUTH_TOKEN": head.token,
            # the format string's {python}/{job_id} are not used: the same command as the direct side
            "LBGAT_WORKER_ENTRYPOINT": entrypoint,
        }
        direct, ours = [], []
        with service(tmp / "dispatch", scheduler=True, extra_env=env, verbose=args.verbose) as svc:
            ray_client = ray_job_client(head)
            # one warm-up run each (Ray's first job starts its job agent's machinery)
            direct_ray_once(ray_client, entrypoint, poll)
            ours_once(svc, poll)
            for i in range(args.runs):
                direct.append(direct_ray_once(ray_client, entrypoint, poll))
                ours.append(ours_once(svc, poll))
                log(args.verbose, f"run {i + 1}: direct {direct[-1]:.3f} s, ours {ours[-1]:.3f} s")
            memory = None
            if not args.skip_memory:
                memory = scheduler_memory(args, tmp, head)
    finally:
        head.stop()
    med_direct, med_ours = statistics.median(direct), statistics.median(ours)
    return {
        "entrypoint": entrypoint,
        "runs": args.runs,
        "direct_s": direct,
        "ours_s": ours,
        "direct_median_s": med_direct,
        "ours_median_s": med_ours,
        "ratio": med_ours / med_direct if med_direct else math.nan,
        "scheduler_memory": memory,
    }


def scheduler_memory(args: argparse.Namespace, tmp: Path, head: Any) -> dict[str, Any]:
    """Resident memory with the scheduler on and the queue full: LBGAT_MAX_RUNNING_JOBS=0 admits
    nothing, so every round plans over all queued jobs (the steady state of a busy cluster)."""
    env = {
        "LBGAT_RAY_ADDRESS": head.dashboard_url,
        "LBGAT_RAY_AUTH_TOKEN": head.token,
        "LBGAT_MAX_RUNNING_JOBS": "0",
    }
    with service(tmp / "sched-mem", scheduler=True, extra_env=env, verbose=args.verbose) as svc:
        svc.tokens = make_users(svc, args.users)
        start, _ = rss_mb(svc.pid)
        log(args.verbose, f"scheduler on: filling the queue to {args.queued} jobs")
        queued = fill_queue(svc, target=args.queued, already=0, clients=args.clients, procs=args.procs)
        time.sleep(3)  # a few scheduler rounds over the full queue
        touch_views(svc)
        rss, hwm = rss_mb(svc.pid)
        return {"queued": queued, "rss_start_mb": start, "rss_mb": rss, "peak_rss_mb": hwm}


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(110, shutil.get_terminal_size((110, 24)).columns))
    console.print(
        f"lbgat service load benchmark: {report['clients']} clients in {report['client_procs']} processes, "
        f"{report['cpus']} CPUs, SQLite, loopback"
    )
    if "closed_loop" in report:
        table = Table(title="submission (POST /v1/experiments, digits preset)")
        for column in (
            "mode",
            "offered/s",
            "req/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "max ms",
            "requests",
            "errors",
        ):
            table.add_column(column, justify="left" if column == "mode" else "right")
        for key, label in (
            ("serial", "1 client, serial"),
            ("closed_loop", "closed loop"),
            ("open_loop", "open loop"),
        ):
            s = report[key]
            table.add_row(
                label,
                "-" if s["offered_per_s"] is None else f"{s['offered_per_s']:.0f}",
                f"{s['throughput_per_s']:.0f}",
                f"{s['p50_ms']:.1f}",
                f"{s['p95_ms']:.1f}",
                f"{s['p99_ms']:.1f}",
                f"{s['max_ms']:.1f}",
                str(s["requests"]),
                ", ".join(f"{k}: {v}" for k, v in s["errors"].items()) or "0",
            )
        console.print(table)
        console.print(
            f"closed loop: {report['clients']} clients submit back to back (max throughput; latency = "
            f"clients / throughput by Little's law); open loop: each client submits every "
            f"{report['clients']}/offered s whether answered or not, latency from the scheduled send time.\n"
            f"target: p99 < 50 ms at {report['clients']} clients (open loop at an offered rate the service "
            f"sustains)"
        )
    mem = report.get("memory")
    sched_mem = (report.get("dispatch") or {}).get("scheduler_memory")
    if mem or "rss_start_mb" in report:
        table = Table(title="service resident memory (VmRSS)")
        for column in ("when", "queued jobs", "RSS MB", "peak MB"):
            table.add_column(column, justify="left" if column == "when" else "right")
        table.add_row("at start (scheduler off)", "0", f"{report['rss_start_mb']:.0f}", "")
        if mem:
            table.add_row(
                "queue filled (scheduler off)",
                str(mem["queued"]),
                f"{mem['rss_mb']:.0f}",
                f"{mem['peak_rss_mb']:.0f}",
            )
        if sched_mem:
            table.add_row("at start (scheduler on)", "0", f"{sched_mem['rss_start_mb']:.0f}", "")
            table.add_row(
                "queue filled (scheduler on, 0 slots)",
                str(sched_mem["queued"]),
                f"{sched_mem['rss_mb']:.0f}",
                f"{sched_mem['peak_rss_mb']:.0f}",
            )
        console.print(table)
        console.print("target: < 300 MB with 10,000 queued jobs")
    d = report.get("dispatch")
    if d:
        table = Table(title=f"submit to running, {d['runs']} runs each (entrypoint: {d['entrypoint']})")
        for column in ("path", "median s", "runs s"):
            table.add_column(column, justify="left" if column == "path" else "right")
        table.add_row(
            "Ray Job Submission API (submit_job -> RUNNING)",
            f"{d['direct_median_s']:.3f}",
            " ".join(f"{x:.3f}" for x in d["direct_s"]),
        )
        table.add_row(
            "lbgat service (POST -> state running)",
            f"{d['ours_median_s']:.3f}",
            " ".join(f"{x:.3f}" for x in d["ours_s"]),
        )
        table.add_row("ratio ours / direct", f"{d['ratio']:.2f}", "target <= 1.2")
        console.print(table)
    if "scheduler_rounds" in report:
        scheduler_rounds.print_rounds(report["scheduler_rounds"], console)
    if "listing" in report:
        listing.print_listing(report["listing"], console, args.listing_repeat)
    if args.quick:
        console.print(
            "(--quick: fewer requests and jobs; run without it for the figures the targets refer to)"
        )


if __name__ == "__main__":
    sys.exit(main())
