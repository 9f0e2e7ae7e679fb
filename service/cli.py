"""The `lbgat` command. Torch-free at import: subcommands that train import the trainer lazily,
so `lbgat presets` (and the control-plane commands) work where only the service is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from api_schemas import SpecError
from api_schemas.presets import list_presets


def _cmd_presets(args: argparse.Namespace) -> int:
    presets = list_presets()
    if args.json:
        print(
            json.dumps(
                [{"name": p.name, "description": p.description, "source": p.source} for p in presets],
                indent=2,
            )
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="lbgat presets")
    for column in ("name", "method", "dataset", "source"):
        table.add_column(column, no_wrap=column == "name")  # names must stay copy-pastable
    for p in presets:
        method = p.data["method"]
        label = method["name"] + (
            f" ({method['regularizer']}, alpha={method.get('alpha', 0)})" if method.get("regularizer") else ""
        )
        table.add_row(p.name, label, p.data["dataset"]["name"], p.source)
    Console().print(table)
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _trainer_cli():
    try:
        from trainer import cli
    except ImportError as exc:
        raise SystemExit(
            f"this command needs the trainer (torch): {exc}. Install it with `pip install 'lbgat-orchestrator[trainer]'`."
        ) from None
    return cli


def _cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a local checkpoint, or fetch one from the artifact store (LBGAT_* settings) first."""
    cli = _trainer_cli()
    if "://" not in args.checkpoint:
        return cli.eval_command(args)
    import tempfile

    from workers.storage import StoreError, open_store

    store = open_store()
    if not args.checkpoint.startswith(store.url.rstrip("/") + "/"):
        print(
            f"error: {args.checkpoint} is not in the configured artifact store {store.url}", file=sys.stderr
        )
        return 2
    key = args.checkpoint[len(store.url.rstrip("/")) + 1 :]
    with tempfile.TemporaryDirectory(prefix="lbgat-eval-") as folder:
        try:
            local = store.get_file(key, f"{folder}/checkpoint.pt")
        except StoreError as exc:
            print(f"error: cannot fetch {args.checkpoint}: {exc}", file=sys.stderr)
            return 3
        return cli.eval_command(
            argparse.Namespace(**{**vars(args), "checkpoint": str(local), "label": args.checkpoint})
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbgat", description="LBGAT-family adversarial training: train, evaluate, list presets."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train one spec in this process and evaluate it")
    train.add_argument("spec", nargs="?", help="spec file (YAML or JSON)")
    train.add_argument("--preset", help="a named preset instead of a spec file (see `lbgat presets`)")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set optimization.epochs=5 (repeatable)",
    )
    train.add_argument("--out", help="output folder (default: the spec's output.dir or runs/<name>)")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override runtime.device")
    train.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CHECKPOINT",
        help="continue from a checkpoint (default: the newest one in OUT/checkpoints)",
    )
    train.add_argument("--json", action="store_true", help="print the summary as JSON")
    train.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved spec, train nothing"
    )
    train.set_defaults(func=lambda a: _trainer_cli().train_command(a))

    ev = sub.add_parser("eval", help="run an evaluation suite on a checkpoint")
    ev.add_argument(
        "checkpoint", help="checkpoint written by `lbgat train` (e.g. runs/digits/checkpoints/last.pt)"
    )
    ev.add_argument(
        "--suite",
        help="evaluation suite: 'spec' (the checkpoint's own, default), 'lbgat' (the paper's "
        "FGSM/PGD-20/CW-20/AutoAttack), or a YAML/JSON file holding an `evaluation` section",
    )
    ev.add_argument("--n-examples", type=_positive_int, help="evaluate on the first N test images")
    ev.add_argument("--which", choices=["robust", "teacher"], default="robust")
    ev.add_argument(
        "--weights",
        choices=["model", "averaged"],
        default="model",
        help="the model's weights or their moving average (optimization.weight_averaging)",
    )
    ev.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ev.add_argument("--out", help="write the report JSON here as well")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(func=_cmd_eval)

    presets = sub.add_parser("presets", help="list named presets and the paper table each reproduces")
    presets.add_argument("--json", action="store_true")
    presets.set_defaults(func=_cmd_presets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
