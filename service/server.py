"""`lbgat serve`: the API and the scheduler in one process, in front of a Ray cluster.

With LBGAT_RAY_ADDRESS (or --ray-address) it attaches to that cluster's dashboard, and refuses to
start when the cluster wants a token it was not given; without, it starts a local Ray head (token
auth with the state directory's own token, loopback only) in a child process and stops it on exit,
whether the exit comes from SIGINT, SIGTERM or SIGHUP. On a fresh database with no
LBGAT_ADMIN_TOKEN it creates the admin with a new token and keeps it in the state directory
(`<state dir>/credentials.json`, mode 0600), where the CLI finds it when run from the same folder;
nothing is written to the user's home.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Iterator

from service.shutdown import STOP_SIGNALS, Stopped, StopSignals

log = logging.getLogger("service.server")


def _bootstrap_admin(settings, url: str) -> None:  # type: ignore[no-untyped-def]
    """Give a fresh local installation an admin whose token the CLI can find."""
    from sqlalchemy import select

    from service.auth import create_user, issue_token
    from service.client import credentials
    from service.db.engine import make_engine, run_tx, session_factory
    from service.db.migrate import upgrade
    from service.db.models import User

    engine = make_engine(settings.database_url)
    try:
        upgrade(engine)

        def go(session):  # type: ignore[no-untyped-def]
            if session.scalar(select(User.id).limit(1)) is not None:
                return None
            admin = create_user(session, name="admin", team="default", is_admin=True)
            return issue_token(session, admin, label="lbgat serve")[1]

        token = run_tx(session_factory(engine), go)
    finally:
        engine.dispose()
    if token is not None:
        path = credentials.save(url, token, user="admin", folder=settings.state_dir)
        print(
            f"created user `admin`; its token for {url} is in {path} (the CLI reads it when run from "
            f"this folder; `lbgat login --server {url}` stores it for your user)",
            flush=True,
        )


def _check_ray(settings) -> str | None:  # type: ignore[no-untyped-def]
    """None when the cluster answers, or is only unreachable for now (the scheduler waits for it);
    the reason when it refuses us for want of a token, which waiting does not cure."""
    from service.ray_jobs import RayAuthError, RayJobs, RayUnavailable

    token = settings.ray_auth_token.get_secret_value() if settings.ray_auth_token else None
    try:
        RayJobs(settings.ray_address, token=token).check()
    except RayAuthError as exc:
        return str(exc)
    except RayUnavailable as exc:
        log.warning("%s; the scheduler keeps trying", exc)
    return None


def _uvicorn_server(app, host: str, port: int):  # type: ignore[no-untyped-def]
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's own handlers re-raise SIGINT/SIGTERM after its shutdown, which kills the process
        before the local Ray is stopped, and leave SIGHUP at its default (die at once). Here all three
        start the graceful shutdown, and `run()` returns."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return Server(uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False))


def main(args: argparse.Namespace) -> int:
    from pydantic import SecretStr

    from service.app import create_app
    from service.local_ray import LocalRay
    from service.settings import ServiceSettings
    from workers.ray_auth import RayTokenError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    overrides: dict[str, object] = {}
    if getattr(args, "ray_address", None):
        overrides["ray_address"] = args.ray_address
    if getattr(args, "no_scheduler", False):
        overrides["scheduler_enabled"] = False
    settings = ServiceSettings(**overrides)
    url = f"http://{args.host}:{args.port}"
    local_ray = None
    with StopSignals() as signals:
        try:
            if settings.ray_address is None and settings.scheduler_enabled:
                print("LBGAT_RAY_ADDRESS is not set: starting a local Ray ...", flush=True)
                local_ray = LocalRay(state_dir=settings.state_dir, num_cpus=getattr(args, "num_cpus", None))
                print(
                    f"local Ray dashboard: {local_ray.dashboard_url} (token auth: the token is in "
                    f"{local_ray.token_file})",
                    flush=True,
                )
                settings = settings.model_copy(
                    update={
                        "ray_address": local_ray.dashboard_url,
                        "ray_auth_token": SecretStr(local_ray.token),
                        "worker_python": sys.executable,
                    }
                )
            elif settings.ray_address is not None:
                problem = _check_ray(settings)
                if problem is not None:
                    print(f"error: {problem}", file=sys.stderr, flush=True)
                    return 2
            if settings.admin_token is None:
                _bootstrap_admin(settings, url)
            app = create_app(settings)
            print(f"lbgat service on {url} (API docs: {url}/docs)", flush=True)
            _uvicorn_server(app, args.host, args.port).run()
        except Stopped as stop:
            print(f"{signal.Signals(stop.signum).name}: stopping", flush=True)
        except RayTokenError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 2
        finally:
            signals.begin()
            if local_ray is not None:
                print("stopping the local Ray ...", flush=True)
                local_ray.stop()
                print("the local Ray is stopped", flush=True)
    return 0
