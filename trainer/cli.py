"""`lbgat train` and `lbgat eval`: thin wrappers that resolve a spec, call the loop, print tables."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from api_schemas import EvalReport, EvaluationSpec, SpecError, apply_overrides, parse_spec, read_spec_file
from api_schemas.presets import PRESETS, get_preset
from api_schemas.spec import validation_errors


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def _resolve_spec(args: argparse.Namespace):
    if bool(args.spec) == bool(args.preset):
        raise SpecError(
            [{"loc": "", "msg": "give either a spec file or --preset NAME (see `lbgat presets`)"}],
            "command line",
        )
    overrides = list(args.overrides)
    if args.out:  # recorded in spec.json / summary.json, so the run says where it lives
        overrides.append(f"output.dir={json.dumps(str(args.out))}")
    if args.device:
        overrides.append(f"runtime.device={args.device}")
    if args.preset:
        return get_preset(args.preset, overrides)
    data = read_spec_file(args.spec)
    return parse_spec(apply_overrides(data, overrides) if overrides else data, source=args.spec)


def report_table(title: str, report: EvalReport):
    from rich.table import Table

    table = Table(title=title)
    for column in ("attack", "accuracy", "NRR", "mean", "images", "seconds"):
        table.add_column(column, justify="right" if column != "attack" else "left")
    table.add_row("clean", f"{report.clean_accuracy:.4f}", "", "", str(report.n_examples), "")
    for r in report.attacks:
        table.add_row(
            r.name,
            f"{r.accuracy:.4f}",
            f"{r.nrr:.4f}",
            f"{r.mean:.4f}",
            str(r.n_examples),
            f"{r.seconds:.1f}",
        )
    if report.robust_accuracy is not None:
        table.add_row(
            f"worst ({report.worst_attack})",
            f"{report.robust_accuracy:.4f}",
            f"{report.nrr:.4f}",
            f"{report.mean:.4f}",
            "",
            "",
        )
    return table


def train_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    spec = _resolve_spec(args)
    console = Console(stderr=args.json)
    if args.dry_run:
        print(spec.model_dump_json(indent=2))
        return 0
    _setup_logging()
    import signal
    import threading

    from trainer.loop import INTERRUPTED, CheckpointRequested, TrainingRun

    out = spec.output_dir()
    run = TrainingRun(spec, out_dir=out)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a batch system's stop, `kill`): save where the epoch stands, exit 4; continue with --resume
        signal.signal(signal.SIGTERM, lambda signum, frame: run.request_checkpoint("SIGTERM"))
    try:
        summary = run.fit(resume=args.resume)
    except CheckpointRequested as stop:
        print(f"{stop}; saved {run.checkpoint_dir / INTERRUPTED}; continue with --resume", file=sys.stderr)
        return 4
    if args.json:
        print(summary.model_dump_json(indent=2))
        return 0
    console.print(report_table(f"{spec.name}: final model (epoch {summary.epochs})", summary.final))
    if summary.best is not None:
        console.print(report_table(f"{spec.name}: best model (epoch {summary.best_epoch})", summary.best))
    console.print(
        f"summary: {out / 'summary.json'}   metrics: {out / 'metrics.jsonl'}   checkpoint: {summary.last_checkpoint}"
    )
    return 0


def _suite(args: argparse.Namespace, own: EvaluationSpec) -> EvaluationSpec:
    if args.suite in (None, "spec"):
        suite = own
    elif args.suite == "lbgat":
        suite = PRESETS["lbgat-cifar10"].spec().evaluation
    elif (
        args.suite == "cat"
    ):  # CAT's CIFAR protocol: FGSM, PGD-20/100 (no random start), CW_inf-30, Square-5000
        suite = PRESETS["cat-cent-b0.05-cifar10-preact18"].spec().evaluation
    else:
        data = read_spec_file(args.suite)
        if not isinstance(data, dict):
            raise SpecError(
                [{"loc": "", "msg": "a suite file holds a mapping (an `evaluation` section)"}], args.suite
            )
        data = data.get("evaluation", data)
        try:
            suite = EvaluationSpec.model_validate(data)
        except Exception as exc:  # pydantic ValidationError -> field paths
            from pydantic import ValidationError

            if isinstance(exc, ValidationError):
                raise SpecError(validation_errors(exc), args.suite) from None
            raise
    if args.n_examples:
        suite = EvaluationSpec.model_validate({**suite.model_dump(), "n_examples": args.n_examples})
    return suite


def eval_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from trainer.checkpoint import CheckpointError, load_model, read_checkpoint
    from trainer.evaluation import evaluate
    from trainer.loop import Runtime, load_datasets

    _setup_logging()
    weights = getattr(args, "weights", "model")
    try:
        payload = read_checkpoint(args.checkpoint)
        spec = parse_spec(payload["spec"], source=f"checkpoint {args.checkpoint}")
        rt = Runtime.resolve(spec, args.device)
        model = load_model(
            args.checkpoint,
            which=args.which,
            weights="ema" if weights == "averaged" else "model",
            device=rt.device,
        )
    except CheckpointError as exc:  # an untrusted or foreign file: say why, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suite = _suite(args, spec.evaluation)
    test = load_datasets(spec).test
    report = evaluate(model, test, suite, spec.threat_model, device=rt.device, progress=True)
    label = getattr(args, "label", None) or str(args.checkpoint)  # a store URL when fetched from there
    report = report.model_copy(
        update={
            "checkpoint": label,
            "epoch": payload.get("epoch"),
            "weights": weights,
            "training_precision": payload.get("precision"),  # absent from older checkpoints
        }
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(report.model_dump_json(indent=2))
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
    else:
        Console().print(report_table(f"{label} ({args.which}, {weights} weights)", report))
    return 0


if __name__ == "__main__":  # pragma: no cover
    from service.client.cli import main

    sys.exit(main())
