"""What experiments produced: `results` (the team's leaderboard, per protocol or of experiments, a
comparison, a transfer matrix, a RobustBench export) and `artifacts` (list an experiment's files,
download one or print a presigned link)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.client.cli.common import (
    console,
    human_size,
    json_parent,
    one_line_errors,
    open_client,
    pct,
    positive_int,
    print_json,
    protocol_tables,
    results_table,
    server_parent,
    service_command,
    timestamp,
)


@service_command
def _cmd_results(args: argparse.Namespace) -> int:
    if args.export is not None:
        return _export(args)
    with open_client(args) as client:
        if args.transfer_matrix:
            return _transfer_matrix(client, args)
        if args.protocol is not None or args.evaluations:
            return _protocol_board(client, args)
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


@one_line_errors
def _protocol_board(client: Any, args: argparse.Namespace) -> int:
    rows = client.leaderboard(
        dataset=args.dataset,
        norm=args.norm,
        eps=args.eps,
        method=args.method,
        limit=args.limit,
        protocol=args.protocol,
        evaluations=True,
    )
    if args.json:
        print_json(rows)
        return 0
    out = console()
    for table in protocol_tables(rows, title="leaderboard"):
        out.print(table)
    if not rows:
        what = f"protocol {args.protocol}" if args.protocol else "any protocol"
        print(
            f"no finished results under {what} match; `lbgat evaluate --all --protocol P` queues them",
            file=sys.stderr,
        )
    return 0


@one_line_errors
def _export(args: argparse.Namespace) -> int:
    fmt, evaluation_id = args.export
    if fmt != "robustbench":
        print(
            f"error: --export {fmt}: the one format is robustbench (--export robustbench ID)", file=sys.stderr
        )
        return 2
    with open_client(args) as client:
        info = client.export_robustbench(evaluation_id)
    text = json.dumps(info.model_dump(mode="json", exclude_none=True), indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
        print(f"{evaluation_id} -> {args.output} (RobustBench model_info)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


@one_line_errors
def _transfer_matrix(client: Any, args: argparse.Namespace) -> int:
    matrix = client.transfer_matrix(args.transfer_matrix, protocol=args.protocol)
    if args.json:
        print_json(matrix)
        return 0
    from rich.table import Table

    table = Table(
        title="transfer: robust accuracy of the target (column) under attacks made on the source (row)"
        + (f" — {matrix.protocol}" if matrix.protocol else "")
    )
    table.add_column("source \\ target", no_wrap=True)
    for name in matrix.experiments:
        table.add_column(name, justify="right", no_wrap=True)
    for name, row in zip(matrix.experiments, matrix.accuracy):
        table.add_row(name, *(pct(value) for value in row))
    console().print(table)
    if all(value is None for row in matrix.accuracy for value in row):
        names = " ".join(matrix.experiments)
        print(
            f"no finished transfer evaluations yet: lbgat evaluate --transfer-matrix {names}", file=sys.stderr
        )
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
    results.add_argument(
        "--protocol",
        metavar="P",
        help="rank (checkpoint, protocol) results of this protocol ('robustbench-linf', 'lbgat@1')",
    )
    results.add_argument(
        "--evaluations",
        action="store_true",
        help="(checkpoint, protocol) results: the dataset's default protocol, else every protocol",
    )
    results.add_argument(
        "--export", nargs=2, metavar=("FORMAT", "ID"), help="one result as RobustBench's model_info JSON"
    )
    results.add_argument("-o", "--output", metavar="FILE", help="with --export: write it here")
    results.add_argument(
        "--transfer-matrix", nargs="+", metavar="EXP", help="the transfer matrix of these experiments"
    )
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
