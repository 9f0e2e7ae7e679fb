"""`lbgat serve`: the API and the scheduler in one process, in front of a Ray cluster.

With LBGAT_RAY_ADDRESS (or --ray-address) it attaches to that cluster's dashboard; without, it
starts a local Ray in a child process and stops it on exit. On a fresh database with no
LBGAT_ADMIN_TOKEN it creates the admin with a new token and stores it in the CLI's credentials
file for this URL, so `lbgat submit` works on the same machine at once.
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("service.server")


def _bootstrap_admin(settings, url: str) -> None:  # type: ignore[no-untyped-def]
    """Give a fresh local installation an admin whose token the CLI already holds."""
    from sqlalchemy import select

    from service import credentials
    from service.auth import create_user, issue_token
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
        path = credentials.save(url, token, user="admin")
        print(f"created user `admin`; its token is saved for {url} in {path}", flush=True)


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.local_ray import LocalRay
    from service.settings import ServiceSettings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    overrides: dict[str, object] = {}
    if getattr(args, "ray_address", None):
        overrides["ray_address"] = args.ray_address
    if getattr(args, "no_scheduler", False):
        overrides["scheduler_enabled"] = False
    settings = ServiceSettings(**overrides)
    local_ray = None
    if settings.ray_address is None and settings.scheduler_enabled:
        print("LBGAT_RAY_ADDRESS is not set: starting a local Ray ...", flush=True)
        local_ray = LocalRay(num_cpus=getattr(args, "num_cpus", None))
        print(f"local Ray dashboard: {local_ray.dashboard_url}", flush=True)
        settings = settings.model_copy(
            update={"ray_address": local_ray.dashboard_url, "worker_python": sys.executable}
        )
    url = f"http://{args.host}:{args.port}"
    try:
        if settings.admin_token is None:
            _bootstrap_admin(settings, url)
        app = create_app(settings)
        print(f"lbgat service on {url} (API docs: {url}/docs)", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=False)
    finally:
        if local_ray is not None:
            print("stopping the local Ray ...", flush=True)
            local_ray.stop()
    return 0
