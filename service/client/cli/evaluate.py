"""Evaluations on the control plane: `evaluate` (one target, an uploaded checkpoint, an extension, a
transfer, a transfer matrix, or every finished experiment) and `protocols`.

    lbgat evaluate EXP[:best|last|averaged] --protocol NAME [--workers N --gpus G --priority P ...]
    lbgat evaluate --checkpoint FILE [--model NAME --dataset D] --protocol P
    lbgat evaluate --extend EVAL_ID --attack '{kind: pgd, steps: 100, step_size: 0.003}'
    lbgat evaluate --transfer-from SRC TGT...
    lbgat evaluate --transfer-matrix EXP...
    lbgat evaluate --all --protocol NAME [--dataset D] [--dry-run]
    lbgat protocols [--show ID]

Each queued evaluation's id goes to stdout (one per line), what it evaluates to stderr. A refused
request is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from service.client.cli.common import (
    console,
    json_parent,
    one_line_errors,
    open_client,
    positive_int,
    print_json,
    server_parent,
    service_command,
)

WEIGHTS = ("best", "last", "averaged")
#: the protocol of a transfer evaluation when none is named: a suite with PGD attacks to transfer
TRANSFER_PROTOCOL = {"digits": "digits"}
TRANSFER_PROTOCOL_DEFAULT = "lbgat"


class UsageError(Exception):
    """Bad arguments: one line on stderr and exit code 2."""


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _structured(text: str, what: str) -> Any:
    """JSON or YAML given inline, or the path of a file holding it."""
    from api_schemas.yaml_safe import YAMLLimitError, load_yaml

    path = Path(text)
    try:
        raw = path.read_text() if len(text) < 4096 and path.is_file() else text
    except OSError as exc:
        raise UsageError(f"{what}: cannot read {text}: {exc}") from None
    try:
        return load_yaml(raw.encode())
    except (YAMLLimitError, ValueError, RecursionError) as exc:
        raise UsageError(
            f"{what}: not JSON or YAML ({exc}); e.g. {what} '{{kind: pgd, steps: 50}}'"
        ) from None
    except Exception as exc:  # yaml.YAMLError and its kin: a parse error of the user's text
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(
            f"{what}: not JSON or YAML ({first}); e.g. {what} '{{kind: pgd, steps: 50}}'"
        ) from None


def _attacks(values: list[str]) -> list[dict[str, Any]]:
    attacks: list[dict[str, Any]] = []
    for value in values:
        data = _structured(value, "--attack")
        items = data if isinstance(data, list) else [data]
        for item in items:
            if not isinstance(item, dict):
                raise UsageError("--attack: an attack is a mapping, e.g. '{kind: pgd, steps: 100}'")
            attacks.append(item)
    return attacks


def _mode(args: argparse.Namespace) -> str:
    modes = [
        name
        for name, on in (
            ("--checkpoint", args.checkpoint is not None),
            ("--extend", args.extend is not None),
            ("--transfer-from", args.transfer_from is not None),
            ("--transfer-matrix", args.transfer_matrix),
            ("--all", args.all),
        )
        if on
    ]
    if len(modes) > 1:
        raise UsageError(f"{' and '.join(modes)} exclude each other: give one")
    mode = modes[0] if modes else "target"
    if args.attack and mode != "--extend":
        raise UsageError("--attack adds attacks to an evaluation: use it with --extend EVAL_ID")
    if mode in ("--checkpoint", "--extend", "--all") and args.targets:
        raise UsageError(f"{mode} takes no experiment arguments (got {' '.join(args.targets)})")
    if mode == "target" and not args.targets:
        raise UsageError("name what to evaluate: EXP[:best|last|averaged], or --checkpoint FILE (see --help)")
    if mode == "--transfer-from" and not args.targets:
        raise UsageError(
            "--transfer-from SRC needs the target experiments: lbgat evaluate --transfer-from SRC TGT..."
        )
    if mode == "--transfer-matrix" and len(set(args.targets)) < 2:
        raise UsageError(
            "--transfer-matrix needs at least two experiments: lbgat evaluate --transfer-matrix A B ..."
        )
    if mode == "--extend" and not args.attack:
        raise UsageError("--extend EVAL_ID needs the attacks to add: --attack '{kind: pgd, steps: 100}'")
    if mode in ("target", "--checkpoint", "--all") and not (
        args.protocol or (args.suite and mode != "--all")
    ):
        hint = "--protocol NAME" if mode == "--all" else "--protocol NAME (or --suite FILE)"
        raise UsageError(f"give {hint}; `lbgat protocols` lists them")
    if args.protocol and args.suite:
        raise UsageError("--protocol and --suite exclude each other: give one")
    if mode == "--extend" and (args.protocol or args.suite):
        raise UsageError("--extend keeps the extended evaluation's suite: drop --protocol/--suite")
    if args.dry_run and mode != "--all":
        raise UsageError("--dry-run is for --all (what would be queued)")
    return mode


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluate() keywords shared by every mode."""
    return {
        "n_examples": args.n_examples,
        "shard_size": args.shard_size,
        "num_workers": args.workers,
        "gpus_per_worker": args.gpus,
        "cpus_per_worker": args.cpus,
        "use_gpu": False if args.cpu else None,
        "priority": args.priority,
        "max_attempts": args.max_attempts,
        "tags": args.tags,
        "name": args.name,
        "save_adversarial": args.save_adversarial,
    }


def _announce(out: Any) -> None:
    print(out.id)
    where = f"queued at position {out.queue.position}: {out.queue.reason}" if out.queue else out.state.value
    extra = f", extends {out.extends}" if out.extends else ""
    source = f", transferred from {out.transfer_source}" if out.transfer_source else ""
    print(
        f"{out.id}: {out.target} under {out.protocol_id}@{out.protocol_version}{source}{extra} ({where})",
        file=sys.stderr,
    )


def _transfer_protocol(client: Any, args: argparse.Namespace, experiment: str) -> str | None:
    if args.protocol or args.suite:
        return args.protocol
    dataset = client.get(experiment.partition(":")[0]).dataset
    protocol = TRANSFER_PROTOCOL.get(dataset, TRANSFER_PROTOCOL_DEFAULT)
    print(
        f"protocol: {protocol} (the default for transfer on {dataset}; --protocol to choose)", file=sys.stderr
    )
    return protocol


@service_command
@one_line_errors
def _cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        mode = _mode(args)
        suite = _structured(args.suite, "--suite") if args.suite else None
        attacks = _attacks(args.attack) if args.attack else []
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = _options(args)
    queued: list[Any] = []
    with open_client(args) as client:
        if mode == "--all":
            result = client.bulk_evaluate(
                args.protocol,
                dataset=args.dataset,
                weights=args.weights or "best",
                num_workers=args.workers,
                gpus_per_worker=args.gpus,
                priority=args.priority,
                dry_run=args.dry_run,
            )
            if args.json:
                print_json(result)
                return 0
            for item in result.queued:
                print(item)
            verb = "would queue" if args.dry_run else "queued"
            print(f"{verb} {len(result.queued)}; skipped {len(result.skipped)}", file=sys.stderr)
            for exp_id, why in result.skipped.items():
                print(f"  {exp_id}: {why}", file=sys.stderr)
            return 0
        if mode == "--checkpoint":
            path = Path(args.checkpoint)
            if not path.is_file():
                print(f"error: --checkpoint {path}: no such file", file=sys.stderr)
                return 2
            uploaded = client.upload_checkpoint(path, model=args.model, dataset=args.dataset, name=args.name)
            print(
                f"checkpoint {uploaded.sha256} ({uploaded.model}, {uploaded.dataset}): "
                + ("stored" if uploaded.created else "already stored"),
                file=sys.stderr,
            )
            queued.append(client.evaluate(uploaded.sha256, protocol=args.protocol, suite=suite, **options))
        elif mode == "--extend":
            queued.append(client.evaluate(extends=args.extend, add_attacks=attacks, **options))
        elif mode == "--transfer-from":
            for target in args.targets:
                protocol = _transfer_protocol(client, args, target)
                queued.append(
                    client.evaluate(
                        target,
                        weights=args.weights,
                        trial=args.trial,
                        protocol=protocol,
                        suite=suite,
                        transfer_from=args.transfer_from,
                        **options,
                    )
                )
        elif mode == "--transfer-matrix":
            experiments = list(dict.fromkeys(args.targets))
            protocol = _transfer_protocol(client, args, experiments[0])
            for source in experiments:
                for target in experiments:
                    if source != target:
                        queued.append(
                            client.evaluate(
                                target,
                                weights=args.weights,
                                protocol=protocol,
                                suite=suite,
                                transfer_from=source,
                                **options,
                            )
                        )
        else:
            for target in args.targets:
                queued.append(
                    client.evaluate(
                        target,
                        weights=args.weights,
                        trial=args.trial,
                        protocol=args.protocol,
                        suite=suite,
                        **options,
                    )
                )
    if args.json:
        print_json(queued)
        return 0
    for out in queued:
        _announce(out)
    if mode == "--transfer-matrix":
        names = " ".join(dict.fromkeys(args.targets))
        print(f"once they finish: lbgat results --transfer-matrix {names}", file=sys.stderr)
    return 0


@service_command
@one_line_errors
def _cmd_protocols(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        if args.show:
            protocol = client.protocol(args.show)
            if args.json:
                print_json(protocol)
                return 0
            _print_protocol(protocol)
            return 0
        protocols = client.protocols()
    if args.json:
        print_json(protocols)
        return 0
    from rich.table import Table

    table = Table(title=f"evaluation protocols ({len(protocols)})")
    for column in ("protocol", "datasets", "threat", "attacks", "examples", "title"):
        table.add_column(column, no_wrap=column == "protocol")
    for p in protocols:
        threat = p.suite.threat_model
        table.add_row(
            f"{p.id}@{p.version}",
            ", ".join(p.datasets),
            f"{threat.norm} {threat.eps:.4g}",
            ", ".join(a.label() for a in p.suite.attacks),
            str(p.suite.n_examples or "all"),
            p.title,
        )
    console().print(table)
    print("details: lbgat protocols --show ID", file=sys.stderr)
    return 0


def _print_protocol(protocol: Any) -> None:
    import yaml

    out = console()
    suite = protocol.suite
    out.print(f"[bold]{protocol.id}@{protocol.version}[/]: {protocol.title}")
    out.print(f"source: {protocol.source}")
    out.print(f"datasets: {', '.join(protocol.datasets)}")
    out.print(
        f"threat model: {suite.threat_model.norm} eps {suite.threat_model.eps:.6g}; split {suite.split}, "
        f"{suite.n_examples or 'all'} examples, seed {suite.seed}, shards of {suite.shard_size}"
    )
    out.print("attacks (in order; each runs on the examples still robust):")
    attacks = [{a.label(): a.model_dump(mode="json", exclude_none=True)} for a in suite.resolved_attacks()]
    print(yaml.safe_dump(attacks, sort_keys=False).rstrip())
    if protocol.notes:
        out.print(f"notes: {protocol.notes}")


def register(sub: Any) -> None:
    as_json = json_parent()

    evaluate = sub.add_parser(
        "evaluate",
        parents=[server_parent(), as_json],
        help="queue evaluations: an experiment's weights or a checkpoint under a protocol",
        description="Queue evaluation jobs on the control plane. Each queued evaluation's id is printed "
        "on stdout; follow it with `lbgat show ID`, rank results with `lbgat results --protocol P`.",
        usage="lbgat evaluate EXP[:best|last|averaged]... --protocol NAME [options]\n"
        "       lbgat evaluate --checkpoint FILE [--model NAME --dataset D] --protocol NAME\n"
        "       lbgat evaluate --extend EVAL_ID --attack JSON_OR_YAML [--attack ...]\n"
        "       lbgat evaluate --transfer-from SRC TGT... [--protocol NAME]\n"
        "       lbgat evaluate --transfer-matrix EXP EXP... [--protocol NAME]\n"
        "       lbgat evaluate --all --protocol NAME [--dataset D] [--dry-run]",
    )
    evaluate.add_argument(
        "targets", nargs="*", metavar="EXP[:WEIGHTS]", help="experiments (weights: best by default)"
    )
    evaluate.add_argument(
        "--protocol", metavar="NAME", help="a protocol ('lbgat', 'digits@1'); see `lbgat protocols`"
    )
    evaluate.add_argument(
        "--suite", metavar="JSON_OR_YAML", help="an explicit suite instead (inline or a file)"
    )
    evaluate.add_argument(
        "--checkpoint", metavar="FILE", help="upload this checkpoint file, then evaluate it"
    )
    evaluate.add_argument("--model", help="the architecture of an uploaded plain state dict")
    evaluate.add_argument(
        "--dataset", help="the dataset of an uploaded plain state dict; with --all: only this one"
    )
    evaluate.add_argument(
        "--extend", metavar="EVAL_ID", help="strengthen a finished evaluation with --attack"
    )
    evaluate.add_argument(
        "--attack", action="append", default=[], metavar="JSON_OR_YAML", help="an attack to add (repeatable)"
    )
    evaluate.add_argument(
        "--transfer-from", metavar="SRC", help="black-box: attacks made on SRC, applied to each EXP"
    )
    evaluate.add_argument(
        "--transfer-matrix",
        action="store_true",
        help="queue every ordered pair of the experiments (source, target)",
    )
    evaluate.add_argument(
        "--all", action="store_true", help="every finished experiment of your team lacking --protocol"
    )
    evaluate.add_argument("--dry-run", action="store_true", help="with --all: list, queue nothing")
    evaluate.add_argument("--weights", choices=WEIGHTS, help="which weights (default: best, or EXP:WEIGHTS)")
    evaluate.add_argument("--trial", help="a sweep's trial (default: main)")
    evaluate.add_argument("--workers", type=positive_int, help="shards evaluated in parallel (Ray workers)")
    evaluate.add_argument("--gpus", type=non_negative_float, help="GPUs per worker")
    evaluate.add_argument("--cpus", type=non_negative_float, help="CPUs per worker")
    evaluate.add_argument("--cpu", action="store_true", help="run on CPUs even where the cluster has GPUs")
    evaluate.add_argument("--priority", type=int, default=0, help="-100..100; higher runs first")
    evaluate.add_argument("--max-attempts", type=positive_int)
    evaluate.add_argument("--n-examples", type=positive_int, help="fewer than the protocol's: marked partial")
    evaluate.add_argument(
        "--shard-size", type=positive_int, help="examples per shard (the unit of resumption)"
    )
    evaluate.add_argument("--save-adversarial", action="store_true", help="also store the adversarial images")
    evaluate.add_argument("--name")
    evaluate.add_argument("--tag", dest="tags", action="append", default=[])
    evaluate.set_defaults(func=_cmd_evaluate)

    protocols = sub.add_parser(
        "protocols",
        parents=[server_parent(), as_json],
        help="the evaluation protocols results are ranked under",
    )
    protocols.add_argument("--show", metavar="ID", help="one protocol ('lbgat' or 'lbgat@1') in full")
    protocols.set_defaults(func=_cmd_protocols)
