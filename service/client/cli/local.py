"""Local commands: `train`, `eval`, `presets`. `train` and `eval` import the trainer (torch) when they
run, so `lbgat presets` works where only the service is installed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from api_schemas.presets import Preset, list_presets
from service.client.cli.common import add_spec_source, positive_int


def _preset_record(p: Preset) -> dict[str, Any]:
    return {
        "name": p.name,
        "description": p.description,
        "source": p.source,
        "code": p.code,
        "deviations": list(p.deviations),
    }


def _show_preset(name: str, as_json: bool) -> int:
    """`lbgat presets --show NAME`: the spec (YAML), where it comes from and what differs from there."""
    import yaml

    from api_schemas.presets import PRESETS

    preset = PRESETS.get(name)
    if preset is None:
        print(f"unknown preset {name!r}; `lbgat presets` lists them", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({**_preset_record(preset), "spec": preset.data}, indent=2))
        return 0
    print(f"# {preset.name}: {preset.description}")
    print(f"# source: {preset.source}")
    print(f"# code: {preset.code or '(none: follows the paper)'}")
    print("# deviations:" + ("" if preset.deviations else " none known"))
    for note in preset.deviations:
        print(f"#   - {note}")
    print(yaml.safe_dump(preset.data, sort_keys=False, width=100), end="")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    if args.show:
        return _show_preset(args.show, args.json)
    presets = list_presets()
    if args.json:
        print(json.dumps([_preset_record(p) for p in presets], indent=2))
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
        if method.get("variant"):  # CAT-cent / CAT-cw, FAT for TRADES / CE
            label += f" ({method['variant']})"
        table.add_row(p.name, label, p.data["dataset"]["name"], p.source)
    Console().print(table)
    return 0


def _trainer_cli():
    try:
        from trainer import cli
    except ImportError as exc:
        raise SystemExit(
            f"this command needs the trainer (torch): {exc}. Install it with `pip install 'lbgat-orchestrator[trainer]'`."
        ) from None
    return cli


def _cmd_train(args: argparse.Namespace) -> int:
    return _trainer_cli().train_command(args)


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


def register(sub: Any) -> None:
    train = sub.add_parser("train", help="train one spec in this process and evaluate it")
    add_spec_source(train)
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
    train.set_defaults(func=_cmd_train)

    ev = sub.add_parser("eval", help="run an evaluation suite on a checkpoint")
    ev.add_argument(
        "checkpoint", help="checkpoint written by `lbgat train` (e.g. runs/digits/checkpoints/last.pt)"
    )
    ev.add_argument(
        "--suite",
        help="evaluation suite: 'spec' (the checkpoint's own, default), 'lbgat' (the paper's "
        "FGSM/PGD-20/CW-20/AutoAttack), 'cat' (CAT's FGSM/PGD-20/PGD-100 without random start, "
        "CW_inf-30 kappa 50, Square 5000), or a YAML/JSON file holding an `evaluation` section",
    )
    ev.add_argument("--n-examples", type=positive_int, help="evaluate on the first N test images")
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
    presets.add_argument(
        "--show",
        metavar="NAME",
        help="print one preset: its spec (YAML), source, official code and known deviations",
    )
    presets.set_defaults(func=_cmd_presets)
