"""`lbgat users` and `lbgat token`: the service's users (create and list: admin) and your API tokens.
Storing a token on this machine is `login`'s."""

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
    timestamp,
)


@service_command
def _cmd_users(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.users_command == "create":
            created = client.create_user(
                args.name,
                team=args.team,
                is_admin=args.admin,
                max_running_jobs=args.max_running_jobs,
                max_gpus=args.max_gpus,
            )
            if args.json:
                print_json(created)
            else:
                u = created.user
                print(f"created user {u.name} (team {u.team}{', admin' if u.is_admin else ''})")
                print(created.token.token)
                print(
                    f"the token is shown only once; {u.name} logs in with "
                    f"`lbgat login --url {client.base_url}` and pastes it",
                    file=sys.stderr,
                )
            return 0
        users = [client.me()] if args.users_command == "me" else client.users()
    if args.json:
        print_json(users[0] if args.users_command == "me" else users)
        return 0
    from rich.table import Table

    table = Table(title="users")
    for column in ("name", "team", "admin", "max running", "max GPUs", "created"):
        table.add_column(column)
    for u in users:
        table.add_row(
            u.name,
            u.team,
            "yes" if u.is_admin else "",
            "default" if u.max_running_jobs is None else str(u.max_running_jobs),
            "default" if u.max_gpus is None else f"{u.max_gpus:g}",
            timestamp(u.created_at),
        )
    console().print(table)
    return 0


@service_command
def _cmd_token(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.token_command == "revoke":
            client.revoke_token(args.token_id)
            print(f"token {args.token_id} revoked")
            return 0
        token = client.create_token(args.label)
    if args.json:
        print_json(token)
    else:
        print(token.token)
        print(f"token {token.id} ({token.label}) for {token.user}; shown only once", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    server = server_parent()
    both = [server, json_parent()]

    users = sub.add_parser("users", help="users of the service (create and list: admin)")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    create = users_sub.add_parser("create", parents=both, help="(admin) a new user and their first token")
    create.add_argument("name")
    create.add_argument("--team", default="default")
    create.add_argument("--admin", action="store_true", help="may see and change everything, create users")
    create.add_argument(
        "--max-running-jobs", type=int, help="limit on running jobs (default: service setting)"
    )
    create.add_argument(
        "--max-gpus", type=float, help="limit on GPUs held at once (default: service setting)"
    )
    users_sub.add_parser("ls", parents=both, help="(admin) every user")
    users_sub.add_parser("me", parents=both, help="who the stored token belongs to")
    users.set_defaults(func=_cmd_users)

    token = sub.add_parser("token", help="your API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_create = token_sub.add_parser("create", parents=both, help="a new token for yourself (shown once)")
    token_create.add_argument("--label", default="cli")
    revoke = token_sub.add_parser("revoke", parents=[server], help="revoke a token by its id")
    revoke.add_argument("token_id", type=int, metavar="ID")
    token.set_defaults(func=_cmd_token)
