"""`python -m workers.run --spec FILE | --job-id ID`: what a Ray job executes.

Reads the spec (a file, or experiments/<ID>/spec.json in the store, where the control plane puts
it), checks the store before any GPU time is spent, then runs one training run or a sweep on the
Ray cluster it is attached to, and writes results to the store. Exit codes: 0 done, 2 bad input
(spec, arguments), 3 the store is unreachable, 1 the run itself failed; the reason goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from pydantic import ValidationError

from api_schemas import ExperimentSpec, SpecError, load_spec, parse_spec
from workers.settings import StoreSettings
from workers.storage import KeyNotFound, StoreError, StoreUnavailable, experiment_prefix, open_store

log = logging.getLogger("workers.run")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STORE = 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.run", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="spec file (YAML/JSON) to run")
    source.add_argument("--job-id", help="experiment id whose spec.json the control plane stored")
    parser.add_argument("--experiment-id", help="id for --spec runs (default: <spec name>-<UTC time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--ray-address", help="Ray cluster to join (default: the job's cluster, or a local one)"
    )
    return parser


def _fail(code: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = _parser().parse_args(argv)
    try:
        settings = StoreSettings()
    except ValidationError as exc:
        return _fail(EXIT_BAD_INPUT, f"store settings: {exc.errors()[0]['msg']}")
    try:
        store = open_store(settings)
        store.check()
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))
    except StoreError as exc:
        return _fail(EXIT_STORE, f"artifact store {settings.store_url}: {exc}")

    try:
        if args.spec:
            spec = load_spec(args.spec, args.overrides)
            experiment_id = (
                args.experiment_id or f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            )
            store.put_json(experiment_prefix(experiment_id) + "spec.json", spec.model_dump(mode="json"))
        else:
            experiment_id = args.job_id
            try:
                data = store.get_json(experiment_prefix(experiment_id) + "spec.json")
            except KeyNotFound:
                return _fail(
                    EXIT_BAD_INPUT,
                    f"no spec for job {experiment_id} at {store.url}/{experiment_prefix(experiment_id)}spec.json",
                )
            spec = parse_spec(data, source=f"job {experiment_id}")
    except SpecError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))

    import ray

    if not ray.is_initialized():
        ray.init(address=args.ray_address, log_to_driver=True)
    try:
        return _run(spec, experiment_id, store, settings)
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))
    except Exception as exc:  # the job's reason for the control plane / the user, then a stack in the log
        log.exception("run failed")
        return _fail(EXIT_FAILED, f"{experiment_id}: {exc}")


def _run(spec: ExperimentSpec, experiment_id: str, store, settings: StoreSettings) -> int:
    if spec.sweep is not None:
        from workers.sweep import run_sweep

        rows = run_sweep(spec, experiment_id=experiment_id, store=store, settings=settings)
        print(
            json.dumps(
                {"experiment_id": experiment_id, "trials": [r.__dict__ for r in rows]}, indent=2, default=str
            )
        )
        return 0
    from workers.training import run_training

    summary = run_training(spec, experiment_id=experiment_id, trial="main", store=store, settings=settings)
    print(json.dumps({"experiment_id": experiment_id, "summary": summary.model_dump(mode="json")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
