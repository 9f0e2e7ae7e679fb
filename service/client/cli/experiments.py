"""Experiments on the control plane: `submit` (and follow with `--wait`), `ls`, `show`, `logs`,
`cancel`, `retry`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from api_schemas import SpecError
from service.client.cli.common import (
    STATE_STYLE,
    add_spec_source,
    console,
    json_parent,
    metric_text,
    num,
    open_client,
    pct,
    positive_int,
    print_json,
    results_table,
    server_parent,
    service_command,
    styled_state,
    timestamp,
)

if TYPE_CHECKING:
    from rich.console import Console


def page_url(base_url: str, experiment_id: str) -> str:
    """The experiment's web page on the service (the service serves its pages itself: service/web)."""
    from urllib.parse import quote

    return f"{base_url.rstrip('/')}/experiments/{quote(experiment_id, safe='')}"


# -- submit -----------------------------------------------------------------------------------------


def _resolve_submission(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(spec dict to send, validated ExperimentSpec); a bad spec raises SpecError before any request."""
    from api_schemas import apply_overrides, parse_spec, read_spec_file
    from api_schemas.presets import PRESETS, get_preset

    if bool(args.spec) == bool(args.preset):
        raise SpecError(
            [{"loc": "", "msg": "give either a spec file or --preset NAME (see `lbgat presets`)"}],
            "command line",
        )
    if args.preset:
        spec = get_preset(args.preset, args.overrides)  # raises for an unknown name
        data = apply_overrides(PRESETS[args.preset].data, args.overrides)
        return data, spec
    data = read_spec_file(args.spec)
    if args.overrides:
        data = apply_overrides(data, args.overrides)
    return data, parse_spec(data, source=args.spec)


class _WaitView:
    """The `submit --wait` display: one progress bar per trial (epoch x/N, loss, accuracies) fed by
    the experiment's SSE stream, and state changes printed above the bars."""

    def __init__(self, experiment_id: str, epochs: int, output: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.experiment_id = experiment_id
        self.epochs = epochs
        self.state = "queued"
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("epoch"),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=output,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self._task("main")

    def _task(self, trial: str) -> Any:
        if trial not in self.tasks:
            if list(self.tasks) == ["main"] and trial != "main" and not self.progress.tasks[0].completed:
                # a sweep: its trials get bars of their own, the idle `main` bar goes away
                self.progress.remove_task(self.tasks.pop("main"))
            self.tasks[trial] = self.progress.add_task(self._label(trial), total=self.epochs, stats="")
        return self.tasks[trial]

    def _label(self, trial: str) -> str:
        return f"{trial} [{STATE_STYLE.get(self.state, '')}]{self.state}[/]"

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "state":
            old, new = data.get("from"), data.get("to")
            if new:
                self.state = new
            reason = f" ({data['reason']})" if data.get("reason") else ""
            arrow = f"{old} → {new}" if old and old != new else f"{new}"
            self.progress.console.print(f"{self.experiment_id}: {arrow}{reason}")
            for trial, task in self.tasks.items():
                self.progress.update(task, description=self._label(trial))
        elif event == "metric":
            trial = data.get("trial") or "main"
            task = self._task(trial)
            epoch = data.get("epoch")
            self.progress.update(
                task,
                completed=epoch if isinstance(epoch, (int, float)) else None,
                stats=metric_text({k: v for k, v in data.items() if k != "epoch"}),
                description=self._label(trial),
            )


@service_command
def _cmd_submit(args: argparse.Namespace) -> int:
    data, spec = _resolve_submission(args)
    with open_client(args) as client:
        exp = client.submit(
            data,
            priority=args.priority,
            max_attempts=args.max_attempts,
            idempotency_key=args.idempotency_key,
            tags=args.tags,
        )
        if not args.wait:
            if args.json:
                print_json(exp)
            else:
                print(exp.id)
                if exp.queue is not None:
                    print(f"queued at position {exp.queue.position}: {exp.queue.reason}", file=sys.stderr)
                print(f"page: {page_url(client.base_url, exp.id)}", file=sys.stderr)
            return 0
        if not args.json:
            print(exp.id)
            print(f"page: {page_url(client.base_url, exp.id)}", file=sys.stderr)
        err = console(stderr=True)
        view = _WaitView(exp.id, spec.optimization.epochs, err)
        try:
            with view.progress:
                final = client.wait(exp.id, on_event=view, timeout=args.timeout)
        except (KeyboardInterrupt, TimeoutError) as exc:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            print(
                f"{why}; the experiment goes on: `lbgat show {exp.id}`, `lbgat cancel {exp.id}`",
                file=sys.stderr,
            )
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
    if args.json:
        print_json(final)
    else:
        _print_final(final)
    return 0 if final.state.value == "succeeded" else 1


def _print_final(detail: Any) -> None:
    out = console()
    out.print(f"{detail.id}: {styled_state(detail.state)}" + (f" — {detail.error}" if detail.error else ""))
    if detail.results is not None:
        out.print(results_table([detail.results], title=f"results of {detail.id}"))


# -- ls / show --------------------------------------------------------------------------------------


def _experiments_table(items: list[Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("id", "name", "owner", "state", "method", "dataset", "prio", "created", "progress"):
        table.add_column(
            column, no_wrap=column in ("id", "state"), justify="right" if column == "prio" else "left"
        )
    for e in items:
        if e.queue is not None:
            progress = f"#{e.queue.position}: {e.queue.reason}"
        elif e.error and e.state.value in ("failed", "retrying"):
            progress = e.error.splitlines()[0][:80]
        else:
            progress = metric_text(e.latest_metrics)
        table.add_row(
            e.id,
            e.name,
            e.owner,
            styled_state(e.state),
            e.method,
            e.dataset,
            str(e.priority),
            timestamp(e.created_at),
            progress,
        )
    return table


@service_command
def _cmd_ls(args: argparse.Namespace) -> int:
    filters = {
        "user": args.user,
        "team": args.team,
        "state": args.state or None,
        "method": args.method,
        "dataset": args.dataset,
    }
    with open_client(args) as client:
        if args.all:
            items = list(client.iter_experiments(page_size=args.limit, **filters))
            more = None
        else:
            page = client.list(limit=args.limit, **filters)
            items, more = page.items, page.next_cursor
    if args.json:
        print_json(items)
        return 0
    console().print(_experiments_table(items, title=f"experiments ({len(items)})"))
    if more:
        print("more: use --all, or --limit N", file=sys.stderr)
    return 0


@service_command
def _cmd_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    with open_client(args) as client:
        d = client.get(args.id)
        page = page_url(client.base_url, d.id)
    if args.json:
        print_json(d)
        return 0
    out = console()
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("id", d.id)
    info.add_row("name", d.name)
    info.add_row("owner", f"{d.owner} (team {d.team})")
    info.add_row("state", styled_state(d.state))
    info.add_row("page", page)
    if d.queue is not None:
        info.add_row("queue", f"position {d.queue.position}: {d.queue.reason}")
        if d.queue.estimated_start is not None:
            info.add_row("expected start", timestamp(d.queue.estimated_start))
    info.add_row("priority", str(d.priority))
    info.add_row("method", d.method)
    info.add_row("dataset", d.dataset)
    info.add_row("threat model", f"{d.norm} eps={d.eps:g}")
    info.add_row("resources", f"{d.gpus:g} GPU, {d.cpus:g} CPU" + (" (sweep)" if d.is_sweep else ""))
    info.add_row("attempts", f"{d.attempts}/{d.max_attempts}")
    if d.tags:
        info.add_row("tags", ", ".join(d.tags))
    info.add_row("created", timestamp(d.created_at))
    info.add_row("started", timestamp(d.started_at))
    info.add_row("finished", timestamp(d.finished_at))
    if d.error:
        info.add_row("error", d.error)
    if d.ray_job_id:
        info.add_row("ray job", d.ray_job_id)
    if d.dashboard_url:
        info.add_row("dashboard", d.dashboard_url)
    out.print(info)

    if d.history:
        history = Table(title="history")
        for column in ("at", "from", "to", "reason"):
            history.add_column(column, no_wrap=column != "reason")
        for change in d.history:
            history.add_row(
                timestamp(change.at),
                change.from_state.value if change.from_state else "-",
                styled_state(change.to_state),
                change.reason or "",
            )
        out.print(history)

    latest = [(t.name, t.latest_metrics) for t in d.trials if t.latest_metrics]
    if not latest and d.latest_metrics:
        latest = [(d.latest_metrics.get("trial", "main"), d.latest_metrics)]
    if latest:
        table = Table(title="latest metrics")
        for column in ("trial", "epoch", "loss", "train adv", "test clean", "val clean", "val pgd"):
            table.add_column(column, justify="left" if column == "trial" else "right")
        for name, row in latest:
            val = row.get("val") or {}
            table.add_row(
                name,
                str(row.get("epoch", "-")),
                num(row.get("loss")),
                pct(row.get("train_adv_accuracy")),
                pct(row.get("test_clean_accuracy")),
                pct(val.get("clean_acc")),
                pct(val.get("pgd_acc")),
            )
        out.print(table)
    if d.results is not None:
        out.print(results_table([d.results], title="results"))
    return 0


# -- logs / cancel / retry --------------------------------------------------------------------------


@service_command
def _cmd_logs(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if not args.follow:
            text = client.logs(args.id)
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
            return 0
        for line in client.follow_logs(args.id):
            print(line, flush=True)
    return 0


@service_command
def _cmd_cancel(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        exp = client.cancel(args.id)
    if args.json:
        print_json(exp)
    elif exp.state.value == "cancelled":
        print(f"{exp.id}: cancelled")
    else:
        print(f"{exp.id}: {exp.state.value}, cancel requested; the service is stopping its Ray job")
    return 0


@service_command
def _cmd_retry(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        exp = client.retry(args.id)
    if args.json:
        print_json(exp)
    else:
        where = f" at position {exp.queue.position}" if exp.queue is not None else ""
        print(f"{exp.id}: {exp.state.value}{where} (resumes from its last checkpoint)")
    return 0


# -- parsers ----------------------------------------------------------------------------------------


def register(sub: Any) -> None:
    server = server_parent()
    both = [server, json_parent()]

    submit = sub.add_parser("submit", parents=both, help="queue a spec on the service (validated here first)")
    add_spec_source(submit)
    submit.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first (default 0)")
    submit.add_argument("--max-attempts", type=positive_int, help="Ray job attempts before `failed`")
    submit.add_argument("--tag", dest="tags", action="append", default=[], help="a label (repeatable)")
    submit.add_argument(
        "--idempotency-key", help="submitting twice with the same key queues once (default: a fresh key)"
    )
    submit.add_argument(
        "--wait", action="store_true", help="follow it to the end: progress bar, then the results"
    )
    submit.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    submit.set_defaults(func=_cmd_submit)

    ls = sub.add_parser("ls", parents=both, help="list experiments (your team's; all for an admin)")
    ls.add_argument("--user", help="only this user's")
    ls.add_argument("--team", help="only this team's")
    ls.add_argument(
        "--state",
        action="append",
        choices=["queued", "dispatching", "running", "retrying", "succeeded", "failed", "cancelled"],
        help="only in this state (repeatable)",
    )
    ls.add_argument("--method", help="only this method (e.g. lbgat)")
    ls.add_argument("--dataset", help="only this dataset (e.g. cifar10)")
    ls.add_argument("--limit", type=positive_int, default=20, help="page size (default 20)")
    ls.add_argument("--all", action="store_true", help="every page, not only the newest")
    ls.set_defaults(func=_cmd_ls)

    show = sub.add_parser(
        "show", parents=both, help="one experiment: state, queue, history, metrics, results"
    )
    show.add_argument("id")
    show.set_defaults(func=_cmd_show)

    logs = sub.add_parser("logs", parents=[server], help="the experiment's Ray job logs")
    logs.add_argument("id")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the job ends"
    )
    logs.set_defaults(func=_cmd_logs)

    cancel = sub.add_parser("cancel", parents=both, help="cancel an experiment (stops its Ray job)")
    cancel.add_argument("id")
    cancel.set_defaults(func=_cmd_cancel)
    retry = sub.add_parser(
        "retry", parents=both, help="queue a failed or cancelled experiment again (from its last checkpoint)"
    )
    retry.add_argument("id")
    retry.set_defaults(func=_cmd_retry)
