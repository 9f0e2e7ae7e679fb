"""`python -m workers.run --spec FILE | --job-id ID`: what a Ray job executes.

Reads the spec (a file, or experiments/<ID>/spec.json in the store, where the control plane puts
it), checks the store before any GPU time is spent, then runs one training run or a sweep on the
Ray cluster it is attached to, or an evaluation job (spec.json of kind "evaluation":
workers/evaluation.py), and writes results to the store. Exit codes: 0 done, 2 bad input
(spec, arguments), 3 the store is unreachable, 1 the run itself failed, 4 preempted (SIGTERM: a
just-in-time checkpoint or the finished shards are stored; run the job again to resume, see
workers/preemption.py); the reason goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from pydantic import ValidationError

from api_schemas import ExperimentSpec, SpecError, load_spec, parse_spec
from workers.preemption import Preempted, StopSignal
from workers.ray_auth import (
    ENV_MODE,
    RayTokenError,
    ensure_token_file,
    find_ray_token,
    gcs_refuses,
    is_auth_error,
    local_ray_env,
    missing_token_message,
)
from workers.settings import StoreSettings
from workers.storage import KeyNotFound, StoreError, StoreUnavailable, experiment_prefix, open_store

log = logging.getLogger("workers.run")

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_STORE, EXIT_PREEMPTED = 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workers.run", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--spec", help="spec file (YAML/JSON) to run")
    source.add_argument("--job-id", help="experiment id whose spec.json the control plane stored")
    parser.add_argument("--experiment-id", help="id for --spec runs (default: <spec name>-<UTC time>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    parser.add_argument(
        "--ray-address",
        help="Ray cluster to join, or `auto` for the one `ray start` runs here (default: the job's "
        "cluster, else a new local Ray with token auth, its token in .lbgat/ray_auth_token)",
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
            if isinstance(data, dict) and data.get("kind") == "evaluation":
                return _evaluation_job(data, experiment_id, store, settings, args.ray_address)
            spec = parse_spec(data, source=f"job {experiment_id}")
    except SpecError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))

    problem = _missing_data(spec)
    if problem is not None:
        return _fail(EXIT_BAD_INPUT, problem)
    if not _ray_started(args.ray_address):
        return EXIT_BAD_INPUT
    StopSignal(experiment_id).install()
    try:
        return _run(spec, experiment_id, store, settings)
    except Preempted as exc:
        return _fail(EXIT_PREEMPTED, str(exc))
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))
    except Exception as exc:  # the job's reason for the control plane / the user, then a stack in the log
        log.exception("run failed")
        missing = _dataset_not_found(exc)
        if missing is not None:  # the same input fails the same way: no point in another attempt
            return _fail(EXIT_BAD_INPUT, f"{experiment_id}: {missing}")
        return _fail(EXIT_FAILED, f"{experiment_id}: {exc}")


#: datasets read from files under dataset.root (digits and synthetic are made in code)
_FILE_DATASETS = {"cifar10", "cifar100", "tiny_imagenet", "mnist"}


def _missing_data(spec: ExperimentSpec) -> str | None:
    """A dataset root that does not exist, found before any Ray or GPU time is spent: an input
    error (exit 2), which the control plane does not retry."""
    from pathlib import Path

    name = spec.dataset.name.replace("-", "_").lower()
    root = Path(spec.dataset.root)
    if name in _FILE_DATASETS and not spec.dataset.download and not root.is_dir():
        return (
            f"dataset.root {str(root)!r} does not exist (resolved against {Path.cwd()}); put the "
            f"{spec.dataset.name} files there or set dataset.root to where they are"
        )
    return None


def _dataset_not_found(exc: BaseException) -> str | None:
    """The reader's message when the run failed because the dataset's files are not there (Ray Train
    hands a worker's exception back wrapped, sometimes only as text)."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if type(seen).__name__ == "DatasetNotFoundError":
            return str(seen).splitlines()[0] if str(seen) else "dataset not found"
        seen = seen.__cause__ or seen.__context__
    for line in str(exc).splitlines():
        if "DatasetNotFoundError: " in line:
            return line.split("DatasetNotFoundError: ", 1)[1].strip()
    return None


def _ray_started(address: str | None) -> bool:
    """Join the job's cluster (RAY_ADDRESS, which a Ray job has) or `address`; without either, start
    a local Ray with token auth on a token of our state directory (`.lbgat/ray_auth_token`, or
    LBGAT_STATE_DIR) and loopback addresses, so nothing is read from or written to the user's home.
    A cluster that wants a token we do not have is reported in one line (what to set), not after
    minutes of Ray retrying, nor as a traceback."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():
        return True
    joining = address or os.environ.get("RAY_ADDRESS")
    try:
        if not joining and os.environ.get(ENV_MODE, "").lower() != "disabled":
            # before Ray is imported: it reads the loopback flag once, at import
            state_dir = os.environ.get("LBGAT_STATE_DIR") or ".lbgat"
            os.environ.update(local_ray_env(ensure_token_file(state_dir)))
        elif joining and ":" in joining and "://" not in joining and gcs_refuses(joining, find_ray_token()):
            return _refused(joining)
    except RayTokenError as exc:
        _fail(EXIT_BAD_INPUT, str(exc))
        return False
    import ray

    try:
        ray.init(address=address or ("auto" if joining else "local"), log_to_driver=True)
    except Exception as exc:
        if is_auth_error(exc):
            return _refused(joining)
        raise
    return True


def _refused(address: str | None) -> bool:
    _fail(EXIT_BAD_INPUT, missing_token_message(address) + " (or the token given is not this cluster's)")
    return False


def _evaluation_job(data: dict, job_id: str, store, settings: StoreSettings, ray_address: str | None) -> int:
    """An evaluation job (spec.json of kind "evaluation", see workers/evaluation.py): the checkpoint
    and the records it extends are checked before Ray starts; a refused checkpoint never runs."""
    from workers.evaluation import EvaluationInputError, parse_job_spec, prepare, run_evaluation

    try:
        spec = parse_job_spec(data, job_id)
        plan = prepare(spec, evaluation_id=job_id, store=store)
    except EvaluationInputError as exc:
        return _fail(EXIT_BAD_INPUT, str(exc))
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))
    except StoreError as exc:
        return _fail(EXIT_STORE, f"artifact store {store.url}: {exc}")
    if not _ray_started(ray_address):
        return EXIT_BAD_INPUT
    stop = StopSignal(job_id).install()
    try:
        summary = run_evaluation(
            spec, evaluation_id=job_id, store=store, settings=settings, plan=plan, stop=stop.event
        )
    except Preempted as exc:
        return _fail(EXIT_PREEMPTED, str(exc))
    except EvaluationInputError as exc:
        return _fail(EXIT_BAD_INPUT, f"{job_id}: {exc}")
    except StoreUnavailable as exc:
        return _fail(EXIT_STORE, str(exc))
    except Exception as exc:
        log.exception("evaluation failed")
        return _fail(EXIT_FAILED, f"{job_id}: {exc}")
    print(json.dumps({"evaluation_id": job_id, "summary": summary.model_dump(mode="json")}, indent=2))
    return 0


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
