"""The `lbgat` command. Torch-free at import: subcommands that train import the trainer lazily,
so `lbgat presets` (and the control-plane commands) work where only the service is installed.

Local:          train, eval, presets                                   (`local`)
Control plane:  serve                                                  (`serve`)
                login, logout                                          (`login`)
                submit, ls, show, logs, cancel, retry                  (`experiments`)
                queue                                                  (`queue`)
                results, artifacts                                     (`results`)
                evaluate, protocols                                    (`evaluate`)
                users, token                                           (`accounts`)
                usage, budget, webhooks                                (`usage`)
The control-plane commands go through `service.client.Client`, imported when one of them runs;
`serve` imports the server (`service.server`) when it runs. Each module adds its subcommands with
`register(sub)`, in the order `lbgat --help` lists them; shared helpers are in `common`.

Exit codes: 0 done; 1 the experiment failed or was cancelled (`submit --wait`); 2 a refused request
(bad spec or arguments, 4xx); 3 the service is unreachable or failed (5xx).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from api_schemas import SpecError
from service.client.cli import accounts, evaluate, experiments, local, login, queue, results, serve, usage

# in the order of `lbgat --help`
COMMAND_GROUPS = (local, serve, login, experiments, queue, results, evaluate, accounts, usage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbgat",
        description="LBGAT-family adversarial training: train and evaluate locally, or submit to the "
        "team's control plane (`lbgat serve`) and follow experiments there.",
        epilog="exit codes: 0 done, 1 experiment failed/cancelled (submit --wait), 2 refused request "
        "(bad spec or arguments), 3 service unreachable or failed",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
