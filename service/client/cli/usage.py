"""`lbgat usage`, `lbgat budget` and `lbgat webhooks`: GPU-/CPU-hours per user, team or method with the
hours lost to preemption and failures apart, team budgets (set them: admin), and webhooks."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.client.cli.common import (
    console,
    json_parent,
    open_client,
    print_json,
    server_parent,
    service_command,
)

GROUPS = ("user", "team", "method")
EVENTS = ("job.succeeded", "job.failed", "job.preempted", "evaluation.succeeded", "budget.warning")


def _hours(value: float) -> str:
    return f"{value:.2f}"


def _budget_line(b: Any) -> str:
    state = "SPENT" if b.exceeded else ("warning" if b.warning else "ok")
    return (
        f"team {b.team}: {b.used_gpu_hours:.1f} of {b.gpu_hours:g} GPU-hours this {b.period} "
        f"({100 * b.fraction:.0f}%, {state}; once spent: {b.action.replace('_', ' ')}; "
        f"period ends {b.period_end:%Y-%m-%d %H:%M} UTC)"
    )


@service_command
def _cmd_usage(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        report = client.usage(since=args.since, until=args.until, group_by=args.group_by, team=args.team)
    if args.json:
        print_json(report)
        return 0
    from rich.table import Table

    scope = f"team {report.team}" if report.team else "all teams"
    table = Table(
        title=f"usage of {scope} by {report.group_by}, {report.since:%Y-%m-%d %H:%M} to "
        f"{report.until:%Y-%m-%d %H:%M} UTC"
    )
    columns = [report.group_by, *(["team"] if report.group_by == "user" else [])]
    columns += ["GPU-hours", "CPU-hours", "lost: preemption", "lost: failures", "attempts", "running"]
    for column in columns:
        table.add_column(column, justify="left" if column in (report.group_by, "team") else "right")
    for row in [*report.rows, report.total]:
        cells = [row.key, *([row.team or ""] if report.group_by == "user" else [])]
        cells += [
            _hours(row.gpu_hours),
            _hours(row.cpu_hours),
            _hours(row.lost_preemption_gpu_hours),
            _hours(row.lost_failure_gpu_hours),
            str(row.attempts),
            str(row.running),
        ]
        table.add_row(*cells, style="bold" if row is report.total else None)
    out = console()
    out.print(table)
    for budget in report.budgets:
        out.print(
            _budget_line(budget),
            style="bold red" if budget.exceeded else ("yellow" if budget.warning else None),
        )
    return 0


@service_command
def _cmd_budget(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.budget_command == "set":
            budget = client.set_budget(args.team, args.gpu_hours, period=args.period, action=args.action)
        elif args.budget_command == "rm":
            client.delete_budget(args.team)
            print(f"team {args.team} has no budget now")
            return 0
        else:
            budget = client.budget(args.team)
    if args.json:
        print_json(budget)
    else:
        print(_budget_line(budget))
    return 0


@service_command
def _cmd_webhooks(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.webhooks_command == "add":
            hook = client.create_webhook(
                args.url, scope=args.scope, team=args.team, events=args.events or None
            )
            if args.json:
                print_json(hook)
            else:
                print(
                    f"webhook {hook.id}: {hook.url} ({hook.scope} {hook.user or hook.team}; {', '.join(hook.events)})"
                )
                print(hook.secret)
                print(
                    "the secret is shown only once: requests carry X-Lbgat-Signature: sha256=HMAC-SHA256("
                    "secret, X-Lbgat-Timestamp + '.' + body)",
                    file=sys.stderr,
                )
            return 0
        if args.webhooks_command == "rm":
            client.delete_webhook(args.webhook_id)
            print(f"webhook {args.webhook_id} removed")
            return 0
        hooks = client.webhooks()
    if args.json:
        print_json(hooks)
        return 0
    from rich.table import Table

    table = Table(title="webhooks")
    for column in ("id", "url", "scope", "of", "events", "by"):
        table.add_column(column)
    for h in hooks:
        table.add_row(str(h.id), h.url, h.scope, h.user or h.team or "", ", ".join(h.events), h.created_by)
    console().print(table)
    return 0


def register(sub: Any) -> None:
    server = server_parent()
    both = [server, json_parent()]

    usage = sub.add_parser(
        "usage",
        parents=both,
        help="GPU- and CPU-hours per user, team or method, with the hours lost to preemption and failures",
    )
    usage.add_argument("--team", help="one team (yours by default; any: admin)")
    usage.add_argument(
        "--since",
        metavar="DATE",
        help="from (2026-11-01 or an ISO time; default: the budget period or 30 days)",
    )
    usage.add_argument("--until", metavar="DATE", help="to, exclusive (default: now)")
    usage.add_argument("--group-by", choices=GROUPS, default="user", help="one row per ... (default: user)")
    usage.set_defaults(func=_cmd_usage)

    budget = sub.add_parser("budget", help="a team's GPU-hour budget per day, week or month")
    budget_sub = budget.add_subparsers(dest="budget_command", required=True)
    show = budget_sub.add_parser("show", parents=both, help="the budget and its use this period")
    show.add_argument("team")
    put = budget_sub.add_parser("set", parents=both, help="(admin) set the budget")
    put.add_argument("team")
    put.add_argument("gpu_hours", type=float, metavar="GPU_HOURS")
    put.add_argument("--period", choices=("day", "week", "month"), default="month")
    put.add_argument(
        "--action", choices=("lower_priority", "hold"), help="once spent (default: the service's setting)"
    )
    rm = budget_sub.add_parser("rm", parents=[server], help="(admin) remove the budget")
    rm.add_argument("team")
    budget.set_defaults(func=_cmd_budget)

    hooks = sub.add_parser(
        "webhooks", help="URLs told when your (or your team's) jobs finish, fail, are preempted"
    )
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    add = hooks_sub.add_parser("add", parents=both, help="a new webhook (its signing secret is shown once)")
    add.add_argument("url")
    add.add_argument("--scope", choices=("user", "team"), default="user")
    add.add_argument("--team", help="scope team: the team (default: yours)")
    add.add_argument(
        "--event", dest="events", action="append", choices=EVENTS, help="repeatable (default: all)"
    )
    hooks_sub.add_parser("ls", parents=both, help="your webhooks and your team's")
    remove = hooks_sub.add_parser("rm", parents=[server], help="remove a webhook by its id")
    remove.add_argument("webhook_id", type=int, metavar="ID")
    hooks.set_defaults(func=_cmd_webhooks)
