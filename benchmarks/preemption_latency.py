"""Preemption latency on a real local Ray cluster (issue 13): from the scheduler's decision to stop a
low-priority training for a high-priority job, how long until the victim's just-in-time checkpoint is
written and until the preempting job runs on the GPU it frees. Part 5 of service_load.py
(`--preemption`), or on its own:

    python benchmarks/preemption_latency.py             # 3 runs, medians
    python benchmarks/preemption_latency.py --runs 5 --json

It starts what it measures and stops it at the end, all in a temporary folder: a Ray cluster on
127.0.0.1 (`service.local_ray.LocalRayCluster`: a head with no job resources and one worker node with
1 CPU and one `fake_gpu`, the custom resource standing for a GPU; token auth with a token made here)
and the service (`service.local_service.LocalService`, SQLite, a local artifact store, preemption on,
the real worker entrypoint `python -m workers.run`). Each run: a priority-0 digits training (1 worker,
3-step PGD) takes the only GPU; after its first epoch (its step time is read from that epoch's
metrics line) a priority-5 digits training asking for the same GPU is submitted; both are cancelled
once the figures are in. Times are seconds after the decision (the victim's `preempting for ...`
state event); see benchmarks/README.md for what each figure is.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from api_schemas.presets import get_preset  # noqa: E402
from service.local_ray import LocalRayCluster  # noqa: E402
from service.local_service import LocalService  # noqa: E402

GPU = "fake_gpu"
#: the victim: a short-step digits run that checkpoints every epoch and would run for minutes
VICTIM = [
    "optimization.epochs=30",
    "optimization.schedule.milestones=[25]",
    "threat_model.steps=3",
    "runtime.progress=false",
    "runtime.device=cpu",
    "evaluation.attacks=[{kind: fgsm}]",
    "evaluation.n_examples=64",
    "evaluation.on_best=false",
    "checkpoint.every_n_epochs=1",
    "resources.cpus_per_worker=1",
]
PREEMPTOR = [*VICTIM, "optimization.epochs=1", "optimization.schedule.milestones=[]"]
TERMINAL = {"succeeded", "failed", "cancelled"}
FIGURES = (
    ("checkpoint_s", "decision -> victim's checkpoint written (preempted.json saved_at)"),
    ("preemptor_dispatched_s", "decision -> preempting job dispatched (submitted to Ray)"),
    ("preemptor_running_s", "decision -> preempting job running (its Ray job RUNNING)"),
    ("preemptor_training_s", "decision -> preempting job's worker on the freed GPU (main/spec.json)"),
    ("victim_ray_ended_s", "decision -> victim's Ray job ended"),
    ("victim_requeued_s", "decision -> victim back in the queue"),
    ("victim_step_s", "victim's training step (batch / its first epoch's images/s)"),
)


def log(verbose: bool, *parts: object) -> None:
    if verbose:
        print(*parts, file=sys.stderr, flush=True)


def wait_for(fn: Callable[[], Any], *, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}; last: {last!r}")


def at(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


class Bench:
    def __init__(self, tmp: Path, *, grace_s: float, poll_s: float, verbose: bool) -> None:
        self.tmp, self.verbose = tmp, verbose
        self.store = tmp / "artifacts"
        log(verbose, "starting a Ray cluster: a head and one worker node (1 CPU, 1 fake_gpu)")
        self.cluster = LocalRayCluster(
            state_dir=tmp / "ray-state", workers=1, cpus_per_worker=1, gpu_resource=GPU, log_dir=tmp
        )
        self.admin = "lbg_admin_preemption_bench_0123456789"
        env = {
            "LBGAT_DATABASE_URL": f"sqlite:///{tmp / 'lbgat.db'}",
            "LBGAT_ARTIFACT_STORE": f"file://{self.store}",
            "LBGAT_RAY_ADDRESS": self.cluster.head.dashboard_url,
            "LBGAT_RAY_AUTH_TOKEN": self.cluster.head.token,
            "LBGAT_GPU_RESOURCE": GPU,
            "LBGAT_ADMIN_TOKEN": self.admin,
            "LBGAT_WORKER_PYTHON": sys.executable,
            # the drivers start in the repository, where the preset's relative data/ lives
            "LBGAT_WORKER_ENTRYPOINT": f"cd {shlex.quote(str(ROOT))} && {{python}} -m workers.run --job-id {{job_id}}",
            "LBGAT_POLL_INTERVAL_S": str(poll_s),
            "LBGAT_METRICS_INTERVAL_S": "0.5",
            "LBGAT_LOST_JOB_GRACE_S": "20",
            "LBGAT_MAX_RUNNING_JOBS": "4",
            "LBGAT_USER_MAX_RUNNING_JOBS": "4",
            "LBGAT_DEFAULT_MAX_ATTEMPTS": "2",
            "LBGAT_PREEMPTION_ENABLED": "true",
            "LBGAT_PREEMPT_MIN_PRIORITY": "1",
            "LBGAT_PREEMPT_MIN_RUN_S": "0",
            "LBGAT_PREEMPTION_GRACE_S": str(grace_s),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.service = LocalService(env, tmp / "service.log", cwd=tmp)
        try:
            self.service.start()
        except BaseException:
            self.cluster.stop()
            raise
        self.http = httpx.Client(
            base_url=self.service.url, timeout=30, headers={"Authorization": f"Bearer {self.admin}"}
        )

    def close(self) -> None:
        self.http.close()
        self.service.stop()
        self.service.kill()
        if self.verbose:
            print(self.service.log_tail(100), file=sys.stderr)
        self.cluster.stop()

    def submit(self, name: str, overrides: list[str], priority: int) -> str:
        spec = get_preset("digits", [*overrides, f"name={name}"]).model_dump(mode="json")
        r = self.http.post("/v1/experiments", json={"spec": spec, "priority": priority})
        r.raise_for_status()
        return r.json()["id"]

    def get(self, exp_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/experiments/{exp_id}")
        r.raise_for_status()
        return r.json()

    def ray_job_end(self, submission_id: str) -> float | None:
        from ray.job_submission import JobSubmissionClient

        client = JobSubmissionClient(
            self.cluster.head.dashboard_url, headers={"Authorization": f"Bearer {self.cluster.head.token}"}
        )
        info = client.get_job_info(submission_id)
        return info.end_time / 1000 if info.end_time else None

    def run_once(self, i: int) -> dict[str, float | None]:
        low = self.submit(f"victim-{i}", VICTIM, 0)
        metrics = self.store / "experiments" / low / "main" / "metrics.jsonl"
        first = wait_for(
            lambda: metrics.exists() and metrics.read_text().strip(),
            timeout_s=300,
            what="the victim's first epoch",
            interval_s=0.2,
        )
        row = json.loads(first.splitlines()[0])
        batch = get_preset("digits", VICTIM).optimization.batch_size
        step_s = batch / row["images_per_second"]
        victim_attempt = self.get(low)["ray_job_id"]
        high = self.submit(f"preemptor-{i}", PREEMPTOR, 5)
        log(self.verbose, f"run {i}: {low} trained an epoch ({step_s:.3f} s a step); {high} submitted")
        worker_started = self.store / "experiments" / high / "main" / "spec.json"

        def handed_over() -> tuple[dict, dict] | None:
            victim, preemptor = self.get(low), self.get(high)
            requeued = victim["state"] == "queued" and victim["history"][-1]["to_state"] == "queued"
            if requeued and preemptor["started_at"] and worker_started.exists():
                return victim, preemptor
            if preemptor["state"] in TERMINAL:
                raise RuntimeError(f"{high} ended {preemptor['state']}: {preemptor['error']}")
            return None

        victim, preemptor = wait_for(handed_over, timeout_s=300, what=f"{high} running, {low} requeued")
        decided = next(
            at(h["at"]) for h in victim["history"] if (h["reason"] or "").startswith(f"preempting for {high}")
        )
        requeued = next(
            at(h["at"]) for h in victim["history"] if (h["reason"] or "").startswith(f"preempted by {high}")
        )
        dispatched = next(at(h["at"]) for h in preemptor["history"] if h["to_state"] == "dispatching")
        marker = json.loads((self.store / "experiments" / low / "main" / "preempted.json").read_text())
        ended = self.ray_job_end(victim_attempt)
        figures = {
            "checkpoint_s": marker["saved_at"] - decided,
            "preemptor_dispatched_s": dispatched - decided,
            "preemptor_running_s": at(preemptor["started_at"]) - decided,
            "preemptor_training_s": worker_started.stat().st_mtime - decided,
            "victim_ray_ended_s": None if ended is None else ended - decided,
            "victim_requeued_s": requeued - decided,
            "victim_step_s": step_s,
        }
        log(
            self.verbose,
            f"run {i}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items() if v is not None),
        )
        for exp_id in (high, low):
            self.http.post(f"/v1/experiments/{exp_id}/cancel")
        wait_for(
            lambda: all(self.get(e)["state"] in TERMINAL for e in (high, low)),
            timeout_s=180,
            what="both cancelled",
            interval_s=0.2,
        )
        return figures


def run(*, runs: int, tmp: Path, grace_s: float = 60, poll_s: float = 0.2, verbose: bool = False) -> dict:
    """`runs` preemptions on one cluster and service; every run's figures and their medians."""
    tmp.mkdir(parents=True, exist_ok=True)
    bench = Bench(tmp, grace_s=grace_s, poll_s=poll_s, verbose=verbose)
    try:
        each = [bench.run_once(i + 1) for i in range(runs)]
    finally:
        bench.close()
    medians = {}
    for key, _ in FIGURES:
        values = [r[key] for r in each if r[key] is not None]
        medians[key] = statistics.median(values) if values else None
    return {"runs": each, "median": medians, "grace_s": grace_s, "poll_s": poll_s, "cpus": os.cpu_count()}


def print_report(report: dict) -> None:
    runs = report["runs"]
    print(
        f"preemption latency: {len(runs)} runs, {report['cpus']} CPUs, grace {report['grace_s']:g} s, "
        f"scheduler poll {report['poll_s']:g} s; seconds"
    )
    width = max(len(label) for _, label in FIGURES)
    header = " ".join(f"{f'run {i + 1}':>7}" for i in range(len(runs)))
    print(f"{'':<{width}}  {'median':>7} {header}")
    for key, label in FIGURES:
        cells = " ".join(f"{r[key]:7.2f}" if r[key] is not None else f"{'-':>7}" for r in runs)
        median = report["median"][key]
        print(f"{label:<{width}}  {median if median is not None else float('nan'):7.2f} {cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3, help="preemptions measured (medians over them)")
    p.add_argument("--grace-s", type=float, default=60, help="LBGAT_PREEMPTION_GRACE_S")
    p.add_argument("--poll-s", type=float, default=0.2, help="LBGAT_POLL_INTERVAL_S")
    p.add_argument("--json", action="store_true", help="also print every figure as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="progress and the service's log on stderr")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lbgat-preempt-") as tmp:
        report = run(
            runs=args.runs, tmp=Path(tmp), grace_s=args.grace_s, poll_s=args.poll_s, verbose=args.verbose
        )
    print_report(report)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
