"""`lbgat queue`: the queue as a table (GET /v1/queue): what runs and until when, what waits, in which
order, why, and when it is expected to start."""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from typing import Any

from service.client.cli.common import (
    console,
    json_parent,
    open_client,
    positive_int,
    print_json,
    server_parent,
    service_command,
    styled_state,
)


def _when(value: datetime | None, now: datetime) -> str:
    """`14:05 (in 12m)` for a time ahead, `now` for one past."""
    if value is None:
        return "-"
    delta = (value - now).total_seconds()
    if delta <= 30:
        return "now"
    minutes = round(delta / 60)
    rel = f"{minutes}m" if minutes < 120 else f"{minutes / 60:.1f}h"
    return f"{value.astimezone():%H:%M} (in {rel})"


def _priority(entry: Any) -> str:
    if entry.effective_priority != entry.priority:
        return f"{entry.priority} ({entry.effective_priority})"
    return str(entry.priority)


def _share(entry: Any) -> str:
    fs = entry.fair_share
    return f"{fs.user_gpu_hours:.1f}h/{fs.team_gpu_hours:.1f}h ({100 * fs.team_share:.0f}%)"


def queue_tables(out: Any) -> list[Any]:
    from rich.table import Table

    now = datetime.now(timezone.utc)
    running = Table(title=f"running ({len(out.running)})", title_justify="left")
    for column in ("id", "kind", "state", "prio", "owner", "team", "GPUs", "CPUs", "started", "expected end"):
        running.add_column(column, no_wrap=column in ("id", "expected end"))
    for e in out.running:
        state = styled_state(e.state) + (
            f" [yellow](preempting for {e.preempted_by})[/]" if e.preempted_by else ""
        )
        running.add_row(
            e.id,
            e.kind,
            state,
            _priority(e),
            e.owner,
            e.team,
            f"{e.gpus:g}",
            f"{e.cpus:g}",
            f"{e.started_at.astimezone():%H:%M}" if e.started_at else "-",
            _when(e.expected_end, now),
        )
    waiting = Table(
        title=f"waiting ({len(out.waiting) + out.more_waiting})",
        title_justify="left",
        caption=f"fair share: owner's/team's GPU-hours in the last {out.fair_share_window_h:g} h (team's share)",
    )
    for column in (
        "#",
        "id",
        "kind",
        "prio",
        "owner",
        "team",
        "fair share",
        "GPUs",
        "CPUs",
        "est. start",
        "reason",
    ):
        waiting.add_column(column, no_wrap=column in ("id", "est. start"))
    for e in out.waiting:
        waiting.add_row(
            str(e.position) if e.position is not None else "-",
            e.id,
            e.kind,
            _priority(e),
            e.owner,
            e.team,
            _share(e),
            f"{e.gpus:g}",
            f"{e.cpus:g}",
            _when(e.estimated_start, now),
            e.reason or "",
        )
    return [running, waiting]


@service_command
def _cmd_queue(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        out = client.queue(team=args.team, user=args.user, kind=args.kind, limit=args.limit)
    if args.json:
        print_json(out)
        return 0
    con = console()
    for table in queue_tables(out):
        con.print(table)
    if out.more_waiting:
        con.print(f"{out.more_waiting} more waiting jobs not listed (--limit)")
    return 0


def register(sub: Any) -> None:
    queue = sub.add_parser(
        "queue",
        parents=[server_parent(), json_parent()],
        help="the queue: running jobs, waiting jobs in order with reason and estimated start",
    )
    queue.add_argument("--team", help="one team's jobs (admins: any team)")
    queue.add_argument("--user", help="one owner's jobs")
    queue.add_argument("--kind", choices=["training", "evaluation"])
    queue.add_argument("--limit", type=positive_int, default=1000, help="waiting jobs listed (default 1000)")
    queue.set_defaults(func=_cmd_queue)
