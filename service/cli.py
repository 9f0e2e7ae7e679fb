"""The `lbgat` command. Torch-free at import: subcommands that train import the trainer lazily,
so `lbgat presets` (and the control-plane commands) work where only the service is installed.

Local:          train, eval, presets
Control plane:  serve, login, logout, submit, ls, show, logs, cancel, retry, results, artifacts,
                users, token  (through `service.client.Client`, imported when one of them runs)

Exit codes: 0 done; 1 the experiment failed or was cancelled (`submit --wait`); 2 a refused request
(bad spec or arguments, 4xx); 3 the service is unreachable or failed (5xx).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from api_schemas import SpecError
from api_schemas.presets import Preset, list_presets

if TYPE_CHECKING:
    from rich.console import Console

    from service.client import Client


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


# ============================================================================ control-plane commands
# Each command builds a `service.client.Client` (imported here, not at start) and prints rich tables
# on stdout, or `--json`. Progress and notices go to stderr, so stdout stays fit for scripts.


def _service_command(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the client's errors into a message on stderr and an exit code (2 refused, 3 unreachable)."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        from service.client import ApiError, ClientError
        from service.credentials import CredentialsError

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


def _client(args: argparse.Namespace) -> Client:
    from service.client import Client

    return Client(getattr(args, "server", None))


def _console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _dump(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_dump(item) for item in obj]
    if hasattr(obj, "model_dump"):
        return obj.model_dump(mode="json")
    return obj


def _print_json(obj: Any) -> None:
    print(json.dumps(_dump(obj), indent=2))


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def _num(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _when(value: Any) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


_STATE_STYLE = {
    "queued": "cyan",
    "retrying": "yellow",
    "dispatching": "blue",
    "running": "bold blue",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}


def _state(value: Any) -> str:
    text = getattr(value, "value", value)
    style = _STATE_STYLE.get(text, "")
    return f"[{style}]{text}[/]" if style else str(text)


def _metric_text(row: dict[str, Any] | None) -> str:
    """`epoch 3 · loss 0.812 · adv 41.2% · test 80.1% · val 77.0%/45.3% (clean/pgd)` from a metrics row."""
    if not row:
        return ""
    parts = []
    if row.get("epoch") is not None:
        parts.append(f"epoch {row['epoch']}")
    if row.get("loss") is not None:
        parts.append(f"loss {row['loss']:.4f}")
    if row.get("train_adv_accuracy") is not None:
        parts.append(f"adv {_pct(row['train_adv_accuracy'])}")
    if row.get("test_clean_accuracy") is not None:
        parts.append(f"test {_pct(row['test_clean_accuracy'])}")
    val = row.get("val") or {}
    if val.get("clean_acc") is not None or val.get("pgd_acc") is not None:
        parts.append(f"val {_pct(val.get('clean_acc'))}/{_pct(val.get('pgd_acc'))} (clean/pgd)")
    return " · ".join(parts)


# -- login ------------------------------------------------------------------------------------------


@_service_command
def _cmd_login(args: argparse.Namespace) -> int:
    import getpass

    from service import credentials
    from service.client import ApiError, Client

    url = credentials.normalize_url(args.server) if args.server else credentials.default_url()
    token = args.token or getpass.getpass(f"API token for {url}: ").strip()
    if not token:
        print("error: no token given", file=sys.stderr)
        return 2
    with Client(url, token) as client:
        try:
            me = client.me()
        except ApiError as exc:
            if exc.status == 401:
                print(f"error: {url} refused this token ({exc.detail}); nothing stored", file=sys.stderr)
                return 2
            raise
    path = credentials.save(url, token, user=me.name)
    admin = ", admin" if me.is_admin else ""
    print(f"logged in to {url} as {me.name} (team {me.team}{admin}); token stored in {path}")
    return 0


def _cmd_logout(args: argparse.Namespace) -> int:
    from service import credentials

    url = credentials.normalize_url(args.server) if args.server else credentials.default_url()
    if credentials.forget(url):
        print(f"logged out of {url}")
    else:
        print(f"no token stored for {url}", file=sys.stderr)
    return 0


# -- submit -----------------------------------------------------------------------------------------


def _resolve_submission(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """(spec dict to send, validated ExperimentSpec); a bad spec raises SpecError before any request."""
    from api_schemas import apply_overrides, parse_spec, read_spec_file
    from api_schemas.presets import PRESETS, get_preset

    if bool(args.spec) == bool(args.preset):
        raise SpecError(
            [{"loc": "", "msg": "give either a spec file or --preset NAME (see `lbgat presets`)"}],
            "command line",
        )
    if args.preset:
        spec = get_preset(args.preset, args.overrides)  # raises for an unknown name
        data = apply_overrides(PRESETS[args.preset].data, args.overrides)
        return data, spec
    data = read_spec_file(args.spec)
    if args.overrides:
        data = apply_overrides(data, args.overrides)
    return data, parse_spec(data, source=args.spec)


class _WaitView:
    """The `submit --wait` display: one progress bar per trial (epoch x/N, loss, accuracies) fed by
    the experiment's SSE stream, and state changes printed above the bars."""

    def __init__(self, experiment_id: str, epochs: int, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.experiment_id = experiment_id
        self.epochs = epochs
        self.state = "queued"
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("epoch"),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}
        self._task("main")

    def _task(self, trial: str) -> Any:
        if trial not in self.tasks:
            if list(self.tasks) == ["main"] and trial != "main" and not self.progress.tasks[0].completed:
                # a sweep: its trials get bars of their own, the idle `main` bar goes away
                self.progress.remove_task(self.tasks.pop("main"))
            self.tasks[trial] = self.progress.add_task(self._label(trial), total=self.epochs, stats="")
        return self.tasks[trial]

    def _label(self, trial: str) -> str:
        return f"{trial} [{_STATE_STYLE.get(self.state, '')}]{self.state}[/]"

    def __call__(self, event: str, data: dict[str, Any]) -> None:
        if event == "state":
            old, new = data.get("from"), data.get("to")
            if new:
                self.state = new
            reason = f" ({data['reason']})" if data.get("reason") else ""
            arrow = f"{old} → {new}" if old and old != new else f"{new}"
            self.progress.console.print(f"{self.experiment_id}: {arrow}{reason}")
            for trial, task in self.tasks.items():
                self.progress.update(task, description=self._label(trial))
        elif event == "metric":
            trial = data.get("trial") or "main"
            task = self._task(trial)
            epoch = data.get("epoch")
            self.progress.update(
                task,
                completed=epoch if isinstance(epoch, (int, float)) else None,
                stats=_metric_text({k: v for k, v in data.items() if k != "epoch"}),
                description=self._label(trial),
            )


@_service_command
def _cmd_submit(args: argparse.Namespace) -> int:
    data, spec = _resolve_submission(args)
    with _client(args) as client:
        exp = client.submit(
            data,
            priority=args.priority,
            max_attempts=args.max_attempts,
            idempotency_key=args.idempotency_key,
            tags=args.tags,
        )
        if not args.wait:
            if args.json:
                _print_json(exp)
            else:
                print(exp.id)
                if exp.queue is not None:
                    print(f"queued at position {exp.queue.position}: {exp.queue.reason}", file=sys.stderr)
            return 0
        if not args.json:
            print(exp.id)
        err = _console(stderr=True)
        view = _WaitView(exp.id, spec.optimization.epochs, err)
        try:
            with view.progress:
                final = client.wait(exp.id, on_event=view, timeout=args.timeout)
        except (KeyboardInterrupt, TimeoutError) as exc:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            print(
                f"{why}; the experiment goes on: `lbgat show {exp.id}`, `lbgat cancel {exp.id}`",
                file=sys.stderr,
            )
            return 130 if isinstance(exc, KeyboardInterrupt) else 1
    if args.json:
        _print_json(final)
    else:
        _print_final(final)
    return 0 if final.state.value == "succeeded" else 1


def _print_final(detail: Any) -> None:
    out = _console()
    out.print(f"{detail.id}: {_state(detail.state)}" + (f" — {detail.error}" if detail.error else ""))
    if detail.results is not None:
        out.print(_results_table([detail.results], title=f"results of {detail.id}"))


# -- ls / show --------------------------------------------------------------------------------------


def _experiments_table(items: list[Any], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title)
    for column in ("id", "name", "owner", "state", "method", "dataset", "prio", "created", "progress"):
        table.add_column(
            column, no_wrap=column in ("id", "state"), justify="right" if column == "prio" else "left"
        )
    for e in items:
        if e.queue is not None:
            progress = f"#{e.queue.position}: {e.queue.reason}"
        elif e.error and e.state.value in ("failed", "retrying"):
            progress = e.error.splitlines()[0][:80]
        else:
            progress = _metric_text(e.latest_metrics)
        table.add_row(
            e.id,
            e.name,
            e.owner,
            _state(e.state),
            e.method,
            e.dataset,
            str(e.priority),
            _when(e.created_at),
            progress,
        )
    return table


@_service_command
def _cmd_ls(args: argparse.Namespace) -> int:
    filters = {
        "user": args.user,
        "team": args.team,
        "state": args.state or None,
        "method": args.method,
        "dataset": args.dataset,
    }
    with _client(args) as client:
        if args.all:
            items = list(client.iter_experiments(page_size=args.limit, **filters))
            more = None
        else:
            page = client.list(limit=args.limit, **filters)
            items, more = page.items, page.next_cursor
    if args.json:
        _print_json(items)
        return 0
    _console().print(_experiments_table(items, title=f"experiments ({len(items)})"))
    if more:
        print("more: use --all, or --limit N", file=sys.stderr)
    return 0


@_service_command
def _cmd_show(args: argparse.Namespace) -> int:
    from rich.table import Table

    with _client(args) as client:
        d = client.get(args.id)
    if args.json:
        _print_json(d)
        return 0
    out = _console()
    info = Table.grid(padding=(0, 2))
    info.add_column(style="bold")
    info.add_column()
    info.add_row("id", d.id)
    info.add_row("name", d.name)
    info.add_row("owner", f"{d.owner} (team {d.team})")
    info.add_row("state", _state(d.state))
    if d.queue is not None:
        info.add_row("queue", f"position {d.queue.position}: {d.queue.reason}")
    info.add_row("priority", str(d.priority))
    info.add_row("method", d.method)
    info.add_row("dataset", d.dataset)
    info.add_row("threat model", f"{d.norm} eps={d.eps:g}")
    info.add_row("resources", f"{d.gpus:g} GPU, {d.cpus:g} CPU" + (" (sweep)" if d.is_sweep else ""))
    info.add_row("attempts", f"{d.attempts}/{d.max_attempts}")
    if d.tags:
        info.add_row("tags", ", ".join(d.tags))
    info.add_row("created", _when(d.created_at))
    info.add_row("started", _when(d.started_at))
    info.add_row("finished", _when(d.finished_at))
    if d.error:
        info.add_row("error", d.error)
    if d.ray_job_id:
        info.add_row("ray job", d.ray_job_id)
    if d.dashboard_url:
        info.add_row("dashboard", d.dashboard_url)
    out.print(info)

    if d.history:
        history = Table(title="history")
        for column in ("at", "from", "to", "reason"):
            history.add_column(column, no_wrap=column != "reason")
        for change in d.history:
            history.add_row(
                _when(change.at),
                change.from_state.value if change.from_state else "-",
                _state(change.to_state),
                change.reason or "",
            )
        out.print(history)

    latest = [(t.name, t.latest_metrics) for t in d.trials if t.latest_metrics]
    if not latest and d.latest_metrics:
        latest = [(d.latest_metrics.get("trial", "main"), d.latest_metrics)]
    if latest:
        table = Table(title="latest metrics")
        for column in ("trial", "epoch", "loss", "train adv", "test clean", "val clean", "val pgd"):
            table.add_column(column, justify="left" if column == "trial" else "right")
        for name, row in latest:
            val = row.get("val") or {}
            table.add_row(
                name,
                str(row.get("epoch", "-")),
                _num(row.get("loss")),
                _pct(row.get("train_adv_accuracy")),
                _pct(row.get("test_clean_accuracy")),
                _pct(val.get("clean_acc")),
                _pct(val.get("pgd_acc")),
            )
        out.print(table)
    if d.results is not None:
        out.print(_results_table([d.results], title="results"))
    return 0


# -- logs / cancel / retry --------------------------------------------------------------------------


@_service_command
def _cmd_logs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if not args.follow:
            text = client.logs(args.id)
            sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
            return 0
        for line in client.follow_logs(args.id):
            print(line, flush=True)
    return 0


@_service_command
def _cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        exp = client.cancel(args.id)
    if args.json:
        _print_json(exp)
    elif exp.state.value == "cancelled":
        print(f"{exp.id}: cancelled")
    else:
        print(f"{exp.id}: {exp.state.value}, cancel requested; the service is stopping its Ray job")
    return 0


@_service_command
def _cmd_retry(args: argparse.Namespace) -> int:
    with _client(args) as client:
        exp = client.retry(args.id)
    if args.json:
        _print_json(exp)
    else:
        where = f" at position {exp.queue.position}" if exp.queue is not None else ""
        print(f"{exp.id}: {exp.state.value}{where} (resumes from its last checkpoint)")
    return 0


# -- results ----------------------------------------------------------------------------------------


def _results_table(rows: list[Any], *, title: str, rank: bool = False) -> Any:
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
    ]
    for column in columns:
        text_column = column in ("id", "name", "owner", "method", "dataset", "threat")
        table.add_column(column, no_wrap=column == "id", justify="left" if text_column else "right")
    for i, row in enumerate(rows, 1):
        cells = [str(i)] if rank else []
        cells += [row.experiment_id, row.name, row.owner, row.method, row.dataset, f"{row.norm} {row.eps:g}"]
        cells += [_pct(row.clean_accuracy), *(_pct(row.attacks.get(a)) for a in attacks)]
        cells += [_pct(row.robust_accuracy), _pct(row.autoattack_accuracy), _pct(row.nrr)]
        table.add_row(*cells)
    return table


@_service_command
def _cmd_results(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.compare:
            comparison = client.compare(args.compare)
            if args.json:
                _print_json(comparison)
            else:
                _console().print(_results_table(comparison.rows, title="comparison"))
            return 0
        rows = client.leaderboard(
            dataset=args.dataset, norm=args.norm, eps=args.eps, method=args.method, limit=args.limit
        )
    if args.json:
        _print_json(rows)
        return 0
    what = ", ".join(
        f"{k}={v}"
        for k, v in (
            ("dataset", args.dataset),
            ("norm", args.norm),
            ("eps", args.eps),
            ("method", args.method),
        )
        if v is not None
    )
    _console().print(_results_table(rows, title="leaderboard" + (f" ({what})" if what else ""), rank=True))
    if not rows:
        print("no finished experiments with results match", file=sys.stderr)
    return 0


# -- artifacts --------------------------------------------------------------------------------------


@_service_command
def _cmd_artifacts(args: argparse.Namespace) -> int:
    action = args.action
    if action and (action[0] != "get" or len(action) != 2):
        print("error: usage: lbgat artifacts ID [get PATH [-o OUT] [--url]]", file=sys.stderr)
        return 2
    with _client(args) as client:
        if not action:
            items = client.artifacts(args.id)
            if args.json:
                _print_json(items)
                return 0
            from rich.table import Table

            table = Table(title=f"artifacts of {args.id} ({len(items)})")
            table.add_column("path", no_wrap=True)
            table.add_column("size", justify="right")
            table.add_column("modified")
            for item in items:
                table.add_row(item.path, _size(item.size), _when(item.modified))
            _console().print(table)
            return 0
        path = action[1]
        if args.link:
            link = client.artifact_link(args.id, path)
            if args.json:
                _print_json(link)
            else:
                print(link.url)
                print(f"valid for {link.expires_in_s} s", file=sys.stderr)
            return 0
        target = client.download(args.id, path, args.output)
    size = target.stat().st_size
    if args.json:
        _print_json({"path": path, "file": str(target), "size": size})
    else:
        print(f"{path} -> {target} ({_size(size)})")
    return 0


# -- users and tokens -------------------------------------------------------------------------------


@_service_command
def _cmd_users(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.users_command == "create":
            created = client.create_user(
                args.name,
                team=args.team,
                is_admin=args.admin,
                max_running_jobs=args.max_running_jobs,
                max_gpus=args.max_gpus,
            )
            if args.json:
                _print_json(created)
            else:
                u = created.user
                print(f"created user {u.name} (team {u.team}{', admin' if u.is_admin else ''})")
                print(created.token.token)
                print(
                    f"the token is shown only once; {u.name} logs in with "
                    f"`lbgat login --url {client.base_url}` and pastes it",
                    file=sys.stderr,
                )
            return 0
        users = [client.me()] if args.users_command == "me" else client.users()
    if args.json:
        _print_json(users[0] if args.users_command == "me" else users)
        return 0
    from rich.table import Table

    table = Table(title="users")
    for column in ("name", "team", "admin", "max running", "max GPUs", "created"):
        table.add_column(column)
    for u in users:
        table.add_row(
            u.name,
            u.team,
            "yes" if u.is_admin else "",
            "default" if u.max_running_jobs is None else str(u.max_running_jobs),
            "default" if u.max_gpus is None else f"{u.max_gpus:g}",
            _when(u.created_at),
        )
    _console().print(table)
    return 0


@_service_command
def _cmd_token(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.token_command == "revoke":
            client.revoke_token(args.token_id)
            print(f"token {args.token_id} revoked")
            return 0
        token = client.create_token(args.label)
    if args.json:
        _print_json(token)
    else:
        print(token.token)
        print(f"token {token.id} ({token.label}) for {token.user}; shown only once", file=sys.stderr)
    return 0


# -- serve ------------------------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        from service.server import main as serve
    except ImportError as exc:
        raise SystemExit(
            f"`lbgat serve` needs the service's dependencies: {exc}. "
            "Install them with `pip install 'lbgat-orchestrator[service]'`."
        ) from None
    return int(serve(args) or 0)


# -- parsers ----------------------------------------------------------------------------------------


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value}")
    return value


def _server_parent(*, url_alias: bool = True) -> argparse.ArgumentParser:
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


def _json_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return parent


def _add_service_commands(sub: Any) -> None:
    server, as_json = _server_parent(), _json_parent()
    both = [server, as_json]

    serve = sub.add_parser(
        "serve", help="run the control plane: REST API + scheduler (needs the service extra)"
    )
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    serve.add_argument(
        "--ray-address",
        help="Ray dashboard / Job API address, e.g. http://ray-head:8265 "
        "(default: LBGAT_RAY_ADDRESS, else start a local Ray)",
    )
    serve.add_argument(
        "--num-cpus", type=_positive_int, help="CPUs of the local Ray started without --ray-address"
    )
    serve.add_argument(
        "--no-scheduler",
        action="store_true",
        help="serve the API only; another replica dispatches the queue",
    )
    serve.set_defaults(func=_cmd_serve)

    login = sub.add_parser("login", parents=[server], help="store an API token for a service (checked first)")
    login.add_argument(
        "--token", help="the token (default: asked for without echo; or LBGAT_TOKEN for scripts)"
    )
    login.set_defaults(func=_cmd_login)
    logout = sub.add_parser("logout", parents=[server], help="forget the token stored for a service")
    logout.set_defaults(func=_cmd_logout)

    submit = sub.add_parser("submit", parents=both, help="queue a spec on the service (validated here first)")
    submit.add_argument("spec", nargs="?", help="spec file (YAML or JSON)")
    submit.add_argument("--preset", help="a named preset instead of a spec file (see `lbgat presets`)")
    submit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a spec field, e.g. --set optimization.epochs=5 (repeatable)",
    )
    submit.add_argument("--priority", type=int, default=0, help="-100..100, higher runs first (default 0)")
    submit.add_argument("--max-attempts", type=_positive_int, help="Ray job attempts before `failed`")
    submit.add_argument("--tag", dest="tags", action="append", default=[], help="a label (repeatable)")
    submit.add_argument(
        "--idempotency-key", help="submitting twice with the same key queues once (default: a fresh key)"
    )
    submit.add_argument(
        "--wait", action="store_true", help="follow it to the end: progress bar, then the results"
    )
    submit.add_argument("--timeout", type=float, help="with --wait: give up waiting after this many seconds")
    submit.set_defaults(func=_cmd_submit)

    ls = sub.add_parser("ls", parents=both, help="list experiments (your team's; all for an admin)")
    ls.add_argument("--user", help="only this user's")
    ls.add_argument("--team", help="only this team's")
    ls.add_argument(
        "--state",
        action="append",
        choices=["queued", "dispatching", "running", "retrying", "succeeded", "failed", "cancelled"],
        help="only in this state (repeatable)",
    )
    ls.add_argument("--method", help="only this method (e.g. lbgat)")
    ls.add_argument("--dataset", help="only this dataset (e.g. cifar10)")
    ls.add_argument("--limit", type=_positive_int, default=20, help="page size (default 20)")
    ls.add_argument("--all", action="store_true", help="every page, not only the newest")
    ls.set_defaults(func=_cmd_ls)

    show = sub.add_parser(
        "show", parents=both, help="one experiment: state, queue, history, metrics, results"
    )
    show.add_argument("id")
    show.set_defaults(func=_cmd_show)

    logs = sub.add_parser("logs", parents=[server], help="the experiment's Ray job logs")
    logs.add_argument("id")
    logs.add_argument(
        "-f", "--follow", action="store_true", help="keep printing new lines until the job ends"
    )
    logs.set_defaults(func=_cmd_logs)

    cancel = sub.add_parser("cancel", parents=both, help="cancel an experiment (stops its Ray job)")
    cancel.add_argument("id")
    cancel.set_defaults(func=_cmd_cancel)
    retry = sub.add_parser(
        "retry", parents=both, help="queue a failed or cancelled experiment again (from its last checkpoint)"
    )
    retry.add_argument("id")
    retry.set_defaults(func=_cmd_retry)

    results = sub.add_parser("results", parents=both, help="the team's leaderboard, or a comparison")
    results.add_argument("--leaderboard", action="store_true", help="the leaderboard (the default)")
    results.add_argument("--compare", nargs="+", metavar="ID", help="compare these experiments")
    results.add_argument("--dataset")
    results.add_argument("--norm", choices=["linf", "l2"])
    results.add_argument("--eps", type=float)
    results.add_argument("--method")
    results.add_argument("--limit", type=_positive_int, default=50)
    results.set_defaults(func=_cmd_results)

    artifacts = sub.add_parser(
        "artifacts",
        parents=[_server_parent(url_alias=False), as_json],
        help="list an experiment's artifacts, or `get PATH` one",
        usage="lbgat artifacts ID [get PATH [-o OUT] [--url]] [--json] [--server URL]",
    )
    artifacts.add_argument("id")
    artifacts.add_argument("action", nargs="*", metavar="get PATH", help="download PATH (see the listing)")
    artifacts.add_argument(
        "-o", "--output", metavar="OUT", help="file or folder to write (default: its name)"
    )
    artifacts.add_argument(
        "--url",
        "--presign",
        dest="link",
        action="store_true",
        help="print a presigned URL instead (S3 stores)",
    )
    artifacts.set_defaults(func=_cmd_artifacts)

    users = sub.add_parser("users", help="users of the service (create and list: admin)")
    users_sub = users.add_subparsers(dest="users_command", required=True)
    create = users_sub.add_parser("create", parents=both, help="(admin) a new user and their first token")
    create.add_argument("name")
    create.add_argument("--team", default="default")
    create.add_argument("--admin", action="store_true", help="may see and change everything, create users")
    create.add_argument(
        "--max-running-jobs", type=int, help="limit on running jobs (default: service setting)"
    )
    create.add_argument(
        "--max-gpus", type=float, help="limit on GPUs held at once (default: service setting)"
    )
    users_sub.add_parser("ls", parents=both, help="(admin) every user")
    users_sub.add_parser("me", parents=both, help="who the stored token belongs to")
    users.set_defaults(func=_cmd_users)

    token = sub.add_parser("token", help="your API tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_create = token_sub.add_parser("create", parents=both, help="a new token for yourself (shown once)")
    token_create.add_argument("--label", default="cli")
    revoke = token_sub.add_parser("revoke", parents=[server], help="revoke a token by its id")
    revoke.add_argument("token_id", type=int, metavar="ID")
    token.set_defaults(func=_cmd_token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbgat",
        description="LBGAT-family adversarial training: train and evaluate locally, or submit to the "
        "team's control plane (`lbgat serve`) and follow experiments there.",
        epilog="exit codes: 0 done, 1 experiment failed/cancelled (submit --wait), 2 refused request "
        "(bad spec or arguments), 3 service unreachable or failed",
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
        "FGSM/PGD-20/CW-20/AutoAttack), 'cat' (CAT's FGSM/PGD-20/PGD-100 without random start, "
        "CW_inf-30 kappa 50, Square 5000), or a YAML/JSON file holding an `evaluation` section",
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
    presets.add_argument(
        "--show",
        metavar="NAME",
        help="print one preset: its spec (YAML), source, official code and known deviations",
    )
    presets.set_defaults(func=_cmd_presets)

    _add_service_commands(sub)
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
