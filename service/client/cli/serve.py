"""`lbgat serve`: the control plane (REST API + scheduler). The server (`service.server`: FastAPI,
SQLAlchemy, uvicorn, Ray) is imported when the command runs, never when the CLI starts."""

from __future__ import annotations

import argparse
from typing import Any

from service.client.cli.common import positive_int


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from service.server import main as serve
    except ImportError as exc:
        raise SystemExit(
            f"`lbgat serve` needs the service's dependencies: {exc}. "
            "Install them with `pip install 'lbgat-orchestrator[service]'`."
        ) from None
    return int(serve(args) or 0)


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def register(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="run the control plane: REST API + scheduler (needs the service extra)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--ray-address",
        help="Ray dashboard / Job API address, e.g. http://ray-head:8265 "
        "(default: LBGAT_RAY_ADDRESS, else start a local Ray)",
    )
    serve.add_argument(
        "--num-cpus", type=positive_int, help="CPUs of the local Ray started without --ray-address"
    )
    serve.add_argument(
        "--no-scheduler",
        action="store_true",
        help="serve the API only; another replica dispatches the queue",
    )
    serve.set_defaults(func=_cmd_serve)
