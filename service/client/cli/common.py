"""What the command modules share: the error-to-exit-code decorator of the control-plane commands,
the client and consoles they print on, JSON output, the formatting of states, metrics, results,
sizes and times, and the argparse parents (`--server/--url`, `--json`) and argument types.

Control-plane commands build a `service.client.Client` (imported when one runs, not at start) and
print rich tables on stdout, or `--json`. Progress and notices go to stderr, so stdout stays fit for
scripts.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from service.client.sdk import Client

Command = Callable[[argparse.Namespace], int]


# -- argument types and parents ---------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


# argparse names a type function in its error for text that is no number ("argument --limit: invalid
# _positive_int value: 'x'"): keep the name that message has always shown
positive_int.__name__ = "_positive_int"


def add_spec_source(parser: argparse.ArgumentParser) -> None:
    """The spec a command runs: a file, or a named preset, with `--set` overrides (train, submit)."""
    parser.add_argument("spec", nargs="?", help="spec file (YAML or JSON)")
    parser.add_argument("--preset", help="a named preset instead of a spec file (see `lbgat presets`)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set optimization.epochs=5 (repeatable)",
    )


def server_parent(*, url_alias: bool = True) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    flags = ["--server", "--url"] if url_alias else ["--server"]
    parent.add_argument(
        *flags,
        dest="server",
        metavar="URL",
        help="service URL (default: LBGAT_API_URL, else the server of the last `lbgat login`, "
        "else http://127.0.0.1:8000); the token comes from LBGAT_TOKEN or `lbgat login`",
    )
    return parent


def json_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parent


# -- running a control-plane command ----------------------------------------------------------------


def service_command(fn: Command) -> Command:
    """Turn the client's errors into a message on stderr and an exit code (2 refused, 3 unreachable)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from service.client.credentials import CredentialsError
        from service.client.sdk import ApiError, ClientError

        try:
            return fn(args)
        except ApiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2 if 400 <= exc.status < 500 else 3
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        except CredentialsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return run


# what to do next, by the field a refusal names
_HINTS = {
    "body.protocol": "`lbgat protocols` lists the protocols and their datasets",
    "body.target.experiment": "`lbgat ls` lists your team's experiments",
    "body.target.weights": "pick other weights: EXP:best, EXP:last or EXP:averaged",
    "body.target.sha256": "upload it with `lbgat evaluate --checkpoint FILE`",
    "body.extends": "`lbgat ls --state succeeded` lists finished jobs",
    "query.model": "name it with --model",
    "query.dataset": "name it with --dataset",
}


def one_line_errors(fn: Callable[..., int]) -> Callable[..., int]:
    """The service's refusal as one line (its detail names the field) plus what to do next; exit
    code 2 for a refused request, 3 when the service failed (the other errors: service_command)."""

    @functools.wraps(fn)
    def run(*args: Any) -> int:
        from service.client.sdk import ApiError

        try:
            return fn(*args)
        except ApiError as exc:
            hint = next((_HINTS[e.get("loc")] for e in exc.errors if e.get("loc") in _HINTS), None)
            if exc.status == 401:
                hint = "run `lbgat login` (or set LBGAT_TOKEN) with a valid API token"
            detail = " ".join(exc.detail.split())
            print(f"error: {exc.status}: {detail}" + (f"; {hint}" if hint else ""), file=sys.stderr)
            return 2 if 400 <= exc.status < 500 else 3

    return run


def open_client(args: argparse.Namespace) -> Client:
    from service.client.sdk import Client

    return Client(getattr(args, "server", None))


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _dump(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_dump(item) for item in obj]
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return obj


def print_json(obj: Any) -> None:
    print(json.dumps(_dump(obj), indent=2))


# -- formatting -------------------------------------------------------------------------------------


def pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def timestamp(value: Any) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


STATE_STYLE = {
    "queued": "cyan",
    "retrying": "yellow",
    "dispatching": "blue",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


def styled_state(value: Any) -> str:
    text = getattr(value, "value", value)
    style = STATE_STYLE.get(text, "")
    return f"[{style}]{text}[/]" if style else str(text)


def metric_text(row: dict[str, Any] | None) -> str:
    """`epoch 3 · loss 0.812 · adv 41.2% · test 80.1% · val 77.0%/45.3% (clean/pgd)` from a metrics row,
    `shard 3/20 · clean 91.0% · pgd20 52.0%` from an evaluation's progress row."""
    if not row:
        return ""
    parts = []
    if row.get("shards_done") is not None:  # an evaluation's progress row
        parts.append(f"shard {row['shards_done']}/{row.get('n_shards', '?')}")
        accuracy = row.get("accuracy") if isinstance(row.get("accuracy"), dict) else {}
        parts += [f"{name} {pct(value)}" for name, value in list(accuracy.items())[:6]]
        return " · ".join(parts)
    if row.get("epoch") is not None:
        parts.append(f"epoch {row['epoch']}")
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.4f}")
    if row.get("train_adv_accuracy") is not None:
        parts.append(f"adv {pct(row['train_adv_accuracy'])}")
    if row.get("test_clean_accuracy") is not None:
        parts.append(f"test {pct(row['test_clean_accuracy'])}")
    val = row.get("val") or {}
    if val.get("clean_acc") is not None or val.get("pgd_acc") is not None:
        parts.append(f"val {pct(val.get('clean_acc'))}/{pct(val.get('pgd_acc'))} (clean/pgd)")
    return " · ".join(parts)


def results_table(rows: list[Any], *, title: str, rank: bool = False) -> Any:
    """Clean accuracy, each attack's, robust, AutoAttack and NRR per experiment (`results`, `show`,
    `submit --wait`)."""
    from rich.table import Table

    attacks: list[str] = []
    for row in rows:
        attacks += [name for name in row.attacks if name not in attacks]
    table = Table(title=title)
    columns = ["#"] if rank else []
    columns += [
        "id",
        "name",
        "owner",
        "method",
        "dataset",
        "threat",
        "clean",
        *attacks,
        "robust",
        "AA",
        "NRR",
        "trained / selected",
    ]
    for column in columns:
        text_column = column in ("id", "name", "owner", "method", "dataset", "threat", "trained / selected")
        table.add_column(column, no_wrap=column == "id", justify="left" if text_column else "right")
    for i, row in enumerate(rows, 1):
        cells = [str(i)] if rank else []
        cells += [row.experiment_id, row.name, row.owner, row.method, row.dataset, f"{row.norm} {row.eps:g}"]
        cells += [pct(row.clean_accuracy), *(pct(row.attacks.get(a)) for a in attacks)]
        cells += [pct(row.robust_accuracy), pct(row.autoattack_accuracy), pct(row.nrr)]
        cells.append(_provenance_cell(row))
        table.add_row(*cells)
    if any(getattr(row, "selection_split", None) == "test" for row in rows):
        table.caption = "selected on test: the checkpoint was chosen on the test set (the papers' protocol)"
    return table


def _provenance_cell(row: Any) -> str:
    """`fp32 / test`: the precision the weights were trained in and the split their checkpoint was
    selected on (`last` when the last epoch's model is reported)."""
    precision = getattr(row, "precision", None) or "-"
    split = getattr(row, "selection_split", None)
    return f"{precision} / {'[yellow]test[/]' if split == 'test' else split or 'last'}"


def protocol_tables(rows: list[Any], *, title: str) -> list[Any]:
    """(checkpoint, protocol) rows as one table per protocol version, ranked as the service ranked
    them: the number of examples (`*` partial), clean, each attack, worst case, AutoAttack, NRR and
    the provenance cell (test-set selection highlighted)."""
    from rich.table import Table

    groups: dict[str, list[Any]] = {}
    for row in rows:
        groups.setdefault(f"{row.protocol_id}@{row.protocol_version}", []).append(row)
    tables = []
    for key, group in groups.items():
        attacks: list[str] = []
        for row in group:
            attacks += [name for name in row.attacks if name not in attacks]
        table = Table(title=f"{title}: {key}")
        columns = ["#", "result", "name", "owner", "weights", "model", "dataset", "threat", "n", "clean"]
        columns += [*attacks, "robust", "AA", "NRR", "trained / selected"]
        text = {"result", "name", "owner", "weights", "model", "dataset", "threat", "trained / selected"}
        for column in columns:
            table.add_column(
                column, no_wrap=column == "result", justify="left" if column in text else "right"
            )
        for row in group:
            n = f"{row.n_examples}" + (f"/{row.n_total} [yellow]*[/]" if row.partial else "")
            table.add_row(
                str(row.rank or ""),
                row.evaluation_id,
                row.name,
                row.owner,
                row.weights + (" (transfer)" if row.transfer_source else ""),
                row.model or "-",
                row.dataset,
                f"{row.norm} {row.eps:g}",
                n,
                pct(row.clean_accuracy),
                *(pct(row.attacks.get(a)) for a in attacks),
                pct(row.robust_accuracy),
                pct(row.autoattack_accuracy),
                pct(row.nrr),
                f"{row.precision or '-'} / "
                + (
                    "[yellow]test[/]"
                    if row.test_selected
                    else ("selected" if row.weights == "best" else row.weights)
                ),
            )
        notes = []
        if any(row.partial for row in group):
            notes.append("* partial: fewer examples than the protocol's full set (ranked below full rows)")
        if any(row.test_selected for row in group):
            notes.append("test: the checkpoint was selected on the test set (its numbers are optimistic)")
        if notes:
            table.caption = "\n".join(notes)
        tables.append(table)
    return tables
