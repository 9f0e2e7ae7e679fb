"""`lbgat login` and `lbgat logout`: the API tokens kept on this machine (`service.client.credentials`).
The service's users and tokens themselves are in `accounts`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from service.client.cli.common import server_parent, service_command


@service_command
def _cmd_login(args: argparse.Namespace) -> int:
    import getpass

    from service.client import credentials
    from service.client.sdk import ApiError, Client

    url = credentials.normalize_url(args.server) if args.server else credentials.default_url()
    token = args.token or getpass.getpass(f"API token for {url}: ").strip()
    if not token:
        print("error: no token given", file=sys.stderr)
        return 2
    with Client(url, token) as client:
        try:
            me = client.me()
        except ApiError as exc:
            if exc.status == 401:
                print(f"error: {url} refused this token ({exc.detail}); nothing stored", file=sys.stderr)
                return 2
            raise
    path = credentials.save(url, token, user=me.name)
    admin = ", admin" if me.is_admin else ""
    print(f"logged in to {url} as {me.name} (team {me.team}{admin}); token stored in {path}")
    return 0


def _cmd_logout(args: argparse.Namespace) -> int:
    from service.client import credentials

    url = credentials.normalize_url(args.server) if args.server else credentials.default_url()
    if credentials.forget(url):
        print(f"logged out of {url}")
    else:
        print(f"no token stored for {url}", file=sys.stderr)
    return 0


def register(sub: Any) -> None:
    server = server_parent()
    login = sub.add_parser("login", parents=[server], help="store an API token for a service (checked first)")
    login.add_argument(
        "--token", help="the token (default: asked for without echo; or LBGAT_TOKEN for scripts)"
    )
    login.set_defaults(func=_cmd_login)
    logout = sub.add_parser("logout", parents=[server], help="forget the token stored for a service")
    logout.set_defaults(func=_cmd_logout)
