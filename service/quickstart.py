"""The main job on embedded defaults, through the whole system: a local Ray, the service (SQLite and
a local artifact directory), and the REST API.

It submits an LBGAT and a TRADES experiment on scikit-learn's bundled digits, follows both with a
progress bar, prints the comparison (clean, PGD, CW, AutoAttack accuracy and NRR), writes the
clean-vs-robust plot, and stops everything it started. `scripts/quickstart.sh` runs it after the
install; `--epochs` shortens it (the test suite runs it that way).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from api_schemas.jobs import Comparison, JobState
from api_schemas.presets import get_preset

DEFAULT_OUT = "runs/quickstart"


def quickstart_specs(epochs: int | None = None) -> dict[str, dict[str, Any]]:
    """LBGAT+TRADES(alpha=0) (the `digits` preset) and TRADES(alpha=6) with the same robust model,
    threat model, schedule and evaluation suite, so that only the method differs."""
    common: list[str] = []
    if epochs is not None:
        common += [
            f"optimization.epochs={epochs}",
            f"optimization.schedule.milestones=[{max(1, epochs - 1)}]",
        ]
    common += ["resources.num_workers=1", "resources.cpus_per_worker=1", "runtime.progress=false"]
    lbgat = get_preset("digits", ["name=quickstart-lbgat", *common])
    trades = get_preset(
        "digits",
        [
            "name=quickstart-trades",
            "description=TRADES (alpha=6) on the bundled handwritten digits (CPU demo)",
            "method={name: trades, alpha: 6.0}",
            "model.teacher=null",
            *common,
        ],
    )
    return {"LBGAT": lbgat.model_dump(mode="json"), "TRADES": trades.model_dump(mode="json")}


def follow(client: Any, ids: dict[str, str], epochs: dict[str, int], timeout_s: float) -> dict[str, Any]:
    """Poll both experiments until they finish, with one progress bar each."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    final: dict[str, Any] = {}
    deadline = time.monotonic() + timeout_s
    columns = (TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[status]}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns) as progress:
        tasks = {label: progress.add_task(label, total=epochs[label], status="queued") for label in ids}
        while len(final) < len(ids):
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"experiments still running after {timeout_s:.0f} s: {sorted(set(ids) - set(final))}"
                )
            for label, exp_id in ids.items():
                if label in final:
                    continue
                exp = client.get(exp_id)
                metrics = exp.latest_metrics or {}
                status = exp.state.value
                if metrics:
                    val = metrics.get("val") or {}
                    status += f" · loss {metrics.get('loss', float('nan')):.3f}"
                    if "pgd_acc" in val:
                        status += f" · val clean {val.get('clean_acc', 0):.1%} / PGD {val['pgd_acc']:.1%}"
                if exp.state is JobState.queued and exp.queue is not None:
                    status += f" ({exp.queue.reason})"
                progress.update(tasks[label], completed=metrics.get("epoch", 0), status=status)
                if exp.state.terminal:
                    final[label] = exp
                    if exp.state is JobState.succeeded:
                        progress.update(tasks[label], completed=epochs[label], status="succeeded · evaluated")
            time.sleep(1.0)
    return final


def comparison_table(comparison: Comparison, labels: dict[str, str]) -> Any:
    from rich.table import Table

    table = Table(title="LBGAT vs TRADES on digits (test set; robust = lowest accuracy over the attacks)")
    table.add_column("method")
    table.add_column("experiment", no_wrap=True)
    table.add_column("clean", justify="right")
    # AutoAttack gets its own column (the leaderboard's); the other attacks one column each
    attacks = [a for a in comparison.attacks if not a.startswith("autoattack")]
    for attack in attacks:
        table.add_column(attack, justify="right")
    table.add_column("AutoAttack", justify="right")
    table.add_column("NRR", justify="right")
    by_id = {v: k for k, v in labels.items()}
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for row in comparison.rows:
        table.add_row(
            by_id.get(row.experiment_id, row.method), row.experiment_id, pct(row.clean_accuracy),
            *[pct(row.attacks.get(a)) for a in attacks], pct(row.autoattack_accuracy), pct(row.nrr),
        )  # fmt: skip
    return table


def plot(comparison: Comparison, labels: dict[str, str], path: Path) -> Path | None:
    """Clean accuracy against AutoAttack accuracy: the trade-off the papers plot."""
    from workers.settings import keep_matplotlib_out_of_home

    keep_matplotlib_out_of_home()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_id = {v: k for k, v in labels.items()}
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for row in comparison.rows:
        robust = row.autoattack_accuracy if row.autoattack_accuracy is not None else row.robust_accuracy
        if row.clean_accuracy is None or robust is None:
            continue
        ax.scatter([100 * row.clean_accuracy], [100 * robust], s=60)
        ax.annotate(by_id.get(row.experiment_id, row.method), (100 * row.clean_accuracy, 100 * robust),
                    textcoords="offset points", xytext=(6, 4))  # fmt: skip
    ax.margins(0.3)  # room for the labels
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel("AutoAttack accuracy (%)")
    ax.set_title("digits, l_inf eps=0.1: clean vs robust")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="shorter runs (default: the digits preset's 30)")
    parser.add_argument(
        "--out", default=DEFAULT_OUT, help=f"where the table and plot go (default {DEFAULT_OUT})"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    args = parser.parse_args(argv)

    from rich.console import Console

    from service.settings import ServiceSettings
    from service.shutdown import Stopped, StopSignals
    from workers.settings import StoreSettings

    console = Console(width=None if sys.stdout.isatty() else 140)  # a CI log is wider than 80 columns
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings, store = ServiceSettings(), StoreSettings()
    specs = quickstart_specs(args.epochs)
    console.print(f"database {settings.database_url} · artifacts {store.store_url} · output {out}/")
    with StopSignals() as signals:
        try:
            return _run(console, args, out, specs, settings, signals)
        except Stopped as stop:
            console.print(f"{signal.Signals(stop.signum).name}: stopped")
            return 128 + stop.signum


def _run(console, args, out: Path, specs, settings, signals) -> int:  # type: ignore[no-untyped-def]
    """Start a local Ray and the service, run the two experiments, stop both (also on a signal)."""
    from service.client import Client
    from service.local_ray import LocalRay
    from service.local_service import LocalService

    console.print("starting a local Ray ...")
    ray = LocalRay(
        state_dir=settings.state_dir, num_cpus=max(2, os.cpu_count() or 2), log_path=out / "ray.log"
    )
    service = None
    try:
        token = "lbg_quickstart_" + secrets.token_urlsafe(24)  # this run's admin token; never printed
        env = {
            "LBGAT_RAY_ADDRESS": ray.dashboard_url,
            "LBGAT_RAY_AUTH_TOKEN": ray.token,
            "LBGAT_ADMIN_TOKEN": token,
            "LBGAT_WORKER_PYTHON": sys.executable,
            "LBGAT_MAX_RUNNING_JOBS": "2",
            "LBGAT_USER_MAX_RUNNING_JOBS": "2",
            "LBGAT_POLL_INTERVAL_S": "0.5",
        }
        service = LocalService(env, out / "service.log").start()
        client = Client(service.url, token)
        console.print(
            f"service on {service.url} (Ray dashboard {ray.dashboard_url}); submitting over REST ..."
        )
        ids = {label: client.submit(spec, tags=["quickstart"]).id for label, spec in specs.items()}
        for label, exp_id in ids.items():
            console.print(f"  {label}: {exp_id}")
        epochs = {label: spec["optimization"]["epochs"] for label, spec in specs.items()}
        final = follow(client, ids, epochs, timeout_s=args.timeout)
        failed = {label: exp for label, exp in final.items() if exp.state is not JobState.succeeded}
        for label, exp in failed.items():
            console.print(f"[red]{label} ({exp.id}) {exp.state.value}: {exp.error}[/red]")
        if failed:
            console.print(f"the service's log: {out / 'service.log'}; Ray's: {out / 'ray.log'}")
            return 1
        comparison = client.compare(list(ids.values()))
        console.print(comparison_table(comparison, ids))
        (out / "comparison.json").write_text(json.dumps(comparison.model_dump(mode="json"), indent=2))
        figure = plot(comparison, ids, out / "clean_vs_robust.png")
        console.print(
            f"wrote {out / 'comparison.json'}" + (f" and {figure}" if figure else " (no matplotlib: no plot)")
        )
        return 0
    finally:
        signals.begin()
        if service is not None:
            service.stop()
        ray.stop()
        console.print("stopped the service and the local Ray")


if __name__ == "__main__":
    sys.exit(main())
