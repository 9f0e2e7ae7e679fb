"""What experiments produced: `results` (the team's leaderboard, or a comparison) and `artifacts`
(list an experiment's files, download one or print a presigned link)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.client.cli.common import (
    console,
    human_size,
    json_parent,
    open_client,
    positive_int,
    print_json,
    results_table,
    server_parent,
    service_command,
    timestamp,
)


@service_command
def _cmd_results(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.compare:
            comparison = client.compare(args.compare)
            if args.json:
                print_json(comparison)
            else:
                console().print(results_table(comparison.rows, title="comparison"))
            return 0
        rows = client.leaderboard(
            dataset=args.dataset, norm=args.norm, eps=args.eps, method=args.method, limit=args.limit
        )
    if args.json:
        print_json(rows)
        return 0
    what = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("dataset", args.dataset),
            ("norm", args.norm),
            ("eps", args.eps),
            ("method", args.method),
        )
        if v is not None
    )
    console().print(results_table(rows, title="leaderboard" + (f" ({what})" if what else ""), rank=True))
    if not rows:
        print("no finished experiments with results match", file=sys.stderr)
    return 0


@service_command
def _cmd_artifacts(args: argparse.Namespace) -> int:
    action = args.action
    if action and (action[0] != "get" or len(action) != 2):
        print("error: usage: lbgat artifacts ID [get PATH [-o OUT] [--url]]", file=sys.stderr)
        return 2
    with open_client(args) as client:
        if not action:
            items = client.artifacts(args.id)
            if args.json:
                print_json(items)
                return 0
            from rich.table import Table

            table = Table(title=f"artifacts of {args.id} ({len(items)})")
            table.add_column("path", no_wrap=True)
            table.add_column("size", justify="right")
            table.add_column("modified")
            for item in items:
                table.add_row(item.path, human_size(item.size), timestamp(item.modified))
            console().print(table)
            return 0
        path = action[1]
        if args.link:
            link = client.artifact_link(args.id, path)
            if args.json:
                print_json(link)
            else:
                print(link.url)
                print(f"valid for {link.expires_in_s} s", file=sys.stderr)
            return 0
        target = client.download(args.id, path, args.output)
    size = target.stat().st_size
    if args.json:
        print_json({"path": path, "file": str(target), "size": size})
    else:
        print(f"{path} -> {target} ({human_size(size)})")
    return 0


def register(sub: Any) -> None:
    as_json = json_parent()

    results = sub.add_parser(
        "results", parents=[server_parent(), as_json], help="the team's leaderboard, or a comparison"
    )
    results.add_argument("--leaderboard", action="store_true", help="the leaderboard (the default)")
    results.add_argument("--compare", nargs="+", metavar="ID", help="compare these experiments")
    results.add_argument("--dataset")
    results.add_argument("--norm", choices=["linf", "l2"])
    results.add_argument("--eps", type=float)
    results.add_argument("--method")
    results.add_argument("--limit", type=positive_int, default=50)
    results.set_defaults(func=_cmd_results)

    artifacts = sub.add_parser(
        "artifacts",
        parents=[server_parent(url_alias=False), as_json],
        help="list an experiment's artifacts, or `get PATH` one",
        usage="lbgat artifacts ID [get PATH [-o OUT] [--url]] [--json] [--server URL]",
    )
    artifacts.add_argument("id")
    artifacts.add_argument("action", nargs="*", metavar="get PATH", help="download PATH (see the listing)")
    artifacts.add_argument(
        "-o", "--output", metavar="OUT", help="file or folder to write (default: its name)"
    )
    artifacts.add_argument(
        "--url",
        "--presign",
        dest="link",
        action="store_true",
        help="print a presigned URL instead (S3 stores)",
    )
    artifacts.set_defaults(func=_cmd_artifacts)
