"""A small synchronous Python client of the control plane's REST API (what the `lbgat` CLI uses).

    from service.client import Client
    client = Client()                      # LBGAT_API_URL / LBGAT_TOKEN, else `lbgat login`'s file
    exp = client.submit("spec.yaml", priority=5)
    final = client.wait(exp.id, on_event=lambda kind, data: print(kind, data))
    print(final.state, final.results)

Answers are the `api_schemas.jobs` models. Every refusal raises `ApiError` (status, detail, errors);
a service that cannot be reached raises `ServiceUnreachable`. Reads are retried a few times on
connection errors; a submission is retried with the same Idempotency-Key, so it never queues twice.
No torch, no service internals: only httpx, pydantic and api_schemas.
"""

from __future__ import annotations

import builtins
import json
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from api_schemas import ExperimentSpec, read_spec_file
from api_schemas.accounting import BudgetOut, CreatedWebhook, UsageReport, WebhookOut
from api_schemas.evaluation_views import (
    EvaluationDetail,
    EvaluationOut,
    EvaluationPage,
    RobustBenchModelInfo,
)
from api_schemas.evaluations import (
    BulkResult,
    CheckpointOut,
    EvaluationResultRow,
    TransferMatrix,
)
from api_schemas.jobs import (
    TERMINAL_STATES,
    ArtifactLink,
    ArtifactOut,
    Comparison,
    CreatedUser,
    ExperimentDetail,
    ExperimentOut,
    ExperimentPage,
    JobState,
    QueueOut,
    Readiness,
    ResultRow,
    TokenOut,
    UserOut,
)
from api_schemas.protocols import Protocol
from service.client import credentials

# transport failures worth another try; anything else (a 4xx, a bad answer) is final
_RETRYABLE_STATUS = frozenset({502, 503, 504})


class ClientError(Exception):
    """Base of the client's errors: the request did not give an answer the caller can use."""


class ApiError(ClientError):
    """The service refused the request. `errors` holds {'loc': 'method.alpha', 'msg': ...} for a 422."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        self.status = status
        self.detail = detail
        self.errors = list(errors or [])
        super().__init__(self._message())

    def _message(self) -> str:
        text = f"{self.status}: {self.detail}"
        if self.errors:
            text += "".join(f"\n  {e.get('loc') or '<root>'}: {e.get('msg', '')}" for e in self.errors)
        if self.status == 401:
            text += "\nrun `lbgat login` (or set LBGAT_TOKEN) with a valid API token"
        elif self.status == 403:
            text += "\nthis needs the owner of the experiment or an admin"
        elif self.status == 413 and not self.errors:  # a spec too large to store names its section
            text += "\nthe request body is larger than the service accepts (LBGAT_MAX_SPEC_BYTES)"
        return text


class ServiceUnreachable(ClientError):
    """No answer from the service at all (connection refused, DNS, timeouts)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(
            f"cannot reach the lbgat service at {url} ({reason}). Start it with `lbgat serve`, or point "
            "the client at a running one with --url / LBGAT_API_URL"
        )


def _describe(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError) and "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out: {type(exc).__name__}"
    return text


def _error_from(response: httpx.Response) -> ApiError:
    detail: str = response.reason_phrase or "error"
    errors: list[dict[str, Any]] = []
    try:
        body = response.json()
    except (ValueError, UnicodeDecodeError):
        text = response.text.strip()
        if text:
            detail = text[:500]
    else:
        if isinstance(body, dict):
            raw = body.get("detail", detail)
            if isinstance(raw, str):
                detail = raw
            elif isinstance(raw, list):  # FastAPI's own 422 shape, should one slip through
                errors = [
                    {"loc": ".".join(str(p) for p in e.get("loc", ())), "msg": e.get("msg", "")} for e in raw
                ]
                detail = "invalid request"
            if isinstance(body.get("errors"), list):
                errors = body["errors"]
    return ApiError(response.status_code, detail, errors)


class Client:
    """The control plane's REST API. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        base_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 30,
        retries: int = 3,
        backoff_s: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = credentials.normalize_url(base_url) if base_url else credentials.default_url()
        if token is None:
            token = os.environ.get("LBGAT_TOKEN") or credentials.stored_token(self.base_url)
        self.token = token
        self.timeout = timeout
        self.retries = max(1, retries)
        self.backoff_s = backoff_s
        headers = {"User-Agent": "lbgat-client/0.1", "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def __repr__(self) -> str:  # never the token
        return f"Client({self.base_url!r}, token={'set' if self.token else 'unset'})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------------------

    def _send(
        self, method: str, path: str, *, retry: bool = False, expect: Iterable[int] = (), **kwargs: Any
    ) -> httpx.Response:
        """One request; `retry`: also try again after transport errors and 502/503/504 (safe only
        for requests that change nothing, or carry an Idempotency-Key)."""
        attempts = self.retries if retry else 1
        for attempt in range(attempts):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt + 1 < attempts:
                    time.sleep(self.backoff_s * 2**attempt)
                    continue
                raise ServiceUnreachable(self.base_url, _describe(exc)) from None
            if response.status_code in _RETRYABLE_STATUS and attempt + 1 < attempts:
                time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.is_success or response.status_code in expect:
                return response
            raise _error_from(response)
        raise AssertionError("unreachable")

    def _get(self, path: str, **kwargs: Any) -> Any:
        return self._send("GET", path, retry=True, **kwargs).json()

    @contextmanager
    def _stream(
        self,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> Iterator[httpx.Response]:
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        try:
            with self._http.stream("GET", path, params=params, headers=headers, timeout=timeout) as response:
                if not response.is_success:
                    response.read()
                    raise _error_from(response)
                yield response
        except httpx.ConnectError as exc:
            raise ServiceUnreachable(self.base_url, _describe(exc)) from None

    @staticmethod
    def _params(**values: Any) -> dict[str, Any]:
        return {k: v for k, v in values.items() if v is not None and v != [] and v != ()}

    @staticmethod
    def _exp(experiment_id: str) -> str:
        return f"/v1/experiments/{quote(experiment_id, safe='')}"

    # -- experiments ---------------------------------------------------------------------------------

    def submit(
        self,
        spec: dict[str, Any] | ExperimentSpec | str | os.PathLike[str],
        *,
        priority: int = 0,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
        tags: Iterable[str] = (),
    ) -> ExperimentOut:
        """Queue a spec (a dict, an ExperimentSpec, or the path of a YAML/JSON file). The service
        validates it (ApiError 422 with field paths). The same `idempotency_key` twice returns the
        first experiment; by default each call gets a fresh key, kept across this call's retries."""
        if isinstance(spec, ExperimentSpec):
            data = spec.model_dump(mode="json", exclude_none=False)
        elif isinstance(spec, dict):
            data = spec
        else:
            data = read_spec_file(spec)
        body: dict[str, Any] = {"spec": data, "priority": priority, "tags": list(tags)}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        key = idempotency_key or str(uuid.uuid4())
        response = self._send(
            "POST", "/v1/experiments", retry=True, json=body, headers={"Idempotency-Key": key}
        )
        return ExperimentOut.model_validate(response.json())

    def submit_yaml(
        self,
        text: str,
        *,
        priority: int = 0,
        max_attempts: int | None = None,
        idempotency_key: str | None = None,
    ) -> ExperimentOut:
        """Queue a spec given as YAML text, sent as is (Content-Type: application/yaml)."""
        key = idempotency_key or str(uuid.uuid4())
        response = self._send(
            "POST",
            "/v1/experiments",
            retry=True,
            content=text.encode(),
            params=self._params(priority=priority, max_attempts=max_attempts),
            headers={"Idempotency-Key": key, "Content-Type": "application/yaml"},
        )
        return ExperimentOut.model_validate(response.json())

    def list(
        self,
        *,
        user: str | None = None,
        team: str | None = None,
        state: str | JobState | Iterable[str | JobState] | None = None,
        method: str | None = None,
        dataset: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> ExperimentPage:
        """One page, newest first; pass `page.next_cursor` as `cursor` for the next one."""
        states = None
        if state is not None:
            items = [state] if isinstance(state, (str, JobState)) else builtins.list(state)
            states = [JobState(s).value for s in items]
        params = self._params(
            user=user, team=team, state=states, method=method, dataset=dataset, limit=limit, cursor=cursor
        )
        return ExperimentPage.model_validate(self._get("/v1/experiments", params=params))

    def queue(
        self,
        *,
        team: str | None = None,
        user: str | None = None,
        kind: str | None = None,
        limit: int | None = None,
    ) -> QueueOut:
        """The queue (GET /v1/queue): running jobs with their expected end, then the waiting ones in
        order with position, reason, estimated start, priority and fair-share standing."""
        params = self._params(team=team, user=user, kind=kind, limit=limit)
        return QueueOut.model_validate(self._get("/v1/queue", params=params))

    def iter_experiments(self, *, page_size: int | None = None, **filters: Any) -> Iterator[ExperimentOut]:
        """Every experiment matching `filters` (those of `list`), following the cursors."""
        cursor = None
        while True:
            page = self.list(limit=page_size, cursor=cursor, **filters)
            yield from page.items
            if not page.next_cursor or not page.items:
                return
            cursor = page.next_cursor

    def get(self, experiment_id: str) -> ExperimentDetail:
        return ExperimentDetail.model_validate(self._get(self._exp(experiment_id)))

    def cancel(self, experiment_id: str) -> ExperimentOut:
        response = self._send("POST", self._exp(experiment_id) + "/cancel")
        return ExperimentOut.model_validate(response.json())

    def retry(self, experiment_id: str) -> ExperimentOut:
        """Queue a failed or cancelled experiment again (it resumes from its last checkpoint)."""
        response = self._send("POST", self._exp(experiment_id) + "/retry")
        return ExperimentOut.model_validate(response.json())

    def delete(self, experiment_id: str) -> None:
        """Delete the experiment and its artifacts (owner or admin)."""
        self._send("DELETE", self._exp(experiment_id))

    def metrics(self, experiment_id: str, trial: str | None = None) -> builtins.list[dict[str, Any]]:
        return self._get(self._exp(experiment_id) + "/metrics", params=self._params(trial=trial))

    def events(
        self, experiment_id: str, after: str | int | None = None, *, reconnects: int = 20
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """The experiment's server-sent events as (event, data): `state` and `metric` rows, ending
        with `end` ({"state": ...}). A dropped stream is resumed from the last event id seen
        (Last-Event-ID), at most `reconnects` times in a row without progress."""
        return self._events(experiment_id, after, reconnects=reconnects)

    def _events(
        self,
        experiment_id: str,
        after: str | int | None = None,
        *,
        reconnects: int = 20,
        deadline: float | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        last_id = None if after is None else str(after)
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if last_id is not None:
                headers["Last-Event-ID"] = last_id
            # a read timeout well above the server's keep-alive pings: a silent stream is a dead one
            read_timeout = max(self.timeout, 60.0)
            if deadline is not None:
                read_timeout = min(read_timeout, max(0.05, deadline - time.monotonic()))
            try:
                with self._stream(
                    self._exp(experiment_id) + "/events", headers=headers, read_timeout=read_timeout
                ) as response:
                    for event, data, event_id in _parse_sse(response.iter_lines()):
                        failures = 0
                        if event_id is not None:
                            last_id = event_id
                        yield event, data
                        if event == "end":
                            return
            except (httpx.TransportError, ServiceUnreachable) as exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"no end of experiment {experiment_id} before the deadline") from None
                reason = exc.reason if isinstance(exc, ServiceUnreachable) else _describe(exc)
                failures += 1
                if failures > reconnects:
                    raise ServiceUnreachable(self.base_url, f"event stream lost: {reason}") from None
            else:
                # the server closed the stream without `end`: come back for the rest
                failures += 1
                if failures > reconnects:
                    return
            time.sleep(min(2.0, self.backoff_s * 2 ** min(failures, 4)))

    def wait(
        self,
        experiment_id: str,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> ExperimentDetail:
        """Follow the experiment's events until it is succeeded, failed or cancelled; returns its
        final detail. `on_event(event, data)` sees every event; TimeoutError after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                for event, data in self._events(experiment_id, deadline=deadline):
                    if on_event is not None:
                        on_event(event, data)
                    if event == "end":
                        break
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError
            except TimeoutError:
                raise TimeoutError(
                    f"experiment {experiment_id} still not finished after {timeout:g} s"
                ) from None
            detail = self.get(experiment_id)
            if detail.state in TERMINAL_STATES:
                return detail
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(
                    f"experiment {experiment_id} still {detail.state.value} after {timeout:g} s"
                )
            time.sleep(0.5)

    def logs(self, experiment_id: str) -> str:
        return self._send("GET", self._exp(experiment_id) + "/logs", retry=True).text

    def follow_logs(self, experiment_id: str) -> Iterator[str]:
        """The job's log lines as they are written (without their newline), until the job ends."""
        with self._stream(self._exp(experiment_id) + "/logs", params={"follow": "true"}) as response:
            yield from response.iter_lines()

    # -- artifacts -----------------------------------------------------------------------------------

    def artifacts(self, experiment_id: str) -> builtins.list[ArtifactOut]:
        return [ArtifactOut.model_validate(a) for a in self._get(self._exp(experiment_id) + "/artifacts")]

    def _artifact(self, experiment_id: str, path: str) -> str:
        return f"{self._exp(experiment_id)}/artifacts/{quote(path.lstrip('/'), safe='/')}"

    def download(self, experiment_id: str, path: str, dest: str | os.PathLike[str] | None = None) -> Path:
        """Stream one artifact to `dest` (a file, or a folder to put it in; default: its name here).
        Written to a temporary file first, so an interrupted download leaves no partial file."""
        target = Path(dest) if dest is not None else Path(Path(path).name)
        if target.is_dir():
            target = target / Path(path).name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        try:
            with (
                self._stream(self._artifact(experiment_id, path), read_timeout=max(self.timeout, 300.0)) as r,
                partial.open("wb") as handle,
            ):
                for chunk in r.iter_bytes(1 << 20):
                    handle.write(chunk)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return target

    def artifact_link(self, experiment_id: str, path: str) -> ArtifactLink:
        """A presigned URL (S3 stores) that anyone holding it can download for a while."""
        return ArtifactLink.model_validate(
            self._get(self._artifact(experiment_id, path), params={"presign": "true"})
        )

    # -- results -------------------------------------------------------------------------------------

    def leaderboard(
        self,
        *,
        dataset: str | None = None,
        norm: str | None = None,
        eps: float | None = None,
        method: str | None = None,
        limit: int | None = None,
        protocol: str | None = None,
        evaluations: bool = False,
    ) -> builtins.list[ResultRow] | builtins.list[EvaluationResultRow]:
        """The experiments' board (ResultRow), or with `protocol` (or `evaluations=True`: the dataset's
        default protocol, else every protocol grouped) the (checkpoint, protocol) board of
        EvaluationResultRow, ranked within one protocol version at a time."""
        per_protocol = protocol is not None or evaluations
        params = self._params(
            dataset=dataset,
            norm=norm,
            eps=eps,
            method=method,
            limit=limit,
            protocol=protocol,
            evaluations="true" if evaluations else None,
        )
        rows = self._get("/v1/results/leaderboard", params=params)
        if per_protocol:
            return [EvaluationResultRow.model_validate(r) for r in rows]
        return [ResultRow.model_validate(r) for r in rows]

    def export_robustbench(self, evaluation_id: str) -> RobustBenchModelInfo:
        """One result as RobustBench's model_info JSON (`model_dump(exclude_none=True)` to write it)."""
        path = f"/v1/results/{quote(evaluation_id, safe='')}/export"
        return RobustBenchModelInfo.model_validate(self._get(path, params={"format": "robustbench"}))

    def transfer_matrix(self, experiments: Iterable[str], *, protocol: str | None = None) -> TransferMatrix:
        """Robust accuracy of each target (column) under attacks transferred from each source (row)."""
        params = self._params(experiments=",".join(experiments), protocol=protocol)
        return TransferMatrix.model_validate(self._get("/v1/results/transfer-matrix", params=params))

    # -- evaluations ---------------------------------------------------------------------------------

    @staticmethod
    def target(ref: str, *, weights: str | None = None, trial: str | None = None) -> dict[str, Any]:
        """An evaluation target from text: 'EXP', 'EXP:best|last|averaged', or a checkpoint's sha256
        (64 hex digits, optionally 'sha256:<hex>')."""
        text = ref.removeprefix("sha256:")
        if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
            return {"sha256": text}
        experiment, _, suffix = ref.partition(":")
        out: dict[str, Any] = {"experiment": experiment}
        chosen = weights or suffix or None
        if chosen:
            out["weights"] = chosen
        if trial:
            out["trial"] = trial
        return out

    def evaluate(
        self,
        target: str | dict[str, Any] | None = None,
        *,
        protocol: str | None = None,
        suite: dict[str, Any] | None = None,
        weights: str | None = None,
        trial: str | None = None,
        extends: str | None = None,
        add_attacks: Iterable[dict[str, Any]] = (),
        transfer_from: str | dict[str, Any] | None = None,
        n_examples: int | None = None,
        shard_size: int | None = None,
        num_workers: int | None = None,
        gpus_per_worker: float | None = None,
        cpus_per_worker: float | None = None,
        use_gpu: bool | None = None,
        save_adversarial: bool = False,
        priority: int = 0,
        max_attempts: int | None = None,
        tags: Iterable[str] = (),
        name: str | None = None,
        idempotency_key: str | None = None,
    ) -> EvaluationOut:
        """Queue an evaluation (POST /v1/evaluations). `target`: 'EXP[:weights]', a sha256 of an
        uploaded checkpoint, or a target dict; with `extends` and no target, the extended evaluation's.
        The service resolves and checks everything first (ApiError 422 naming the field)."""
        if target is None:
            if extends is None:
                raise ValueError("evaluate: name a target (an experiment or a checkpoint's sha256)")
            target = self._target_of(extends)
        body: dict[str, Any] = {
            "target": self.target(target, weights=weights, trial=trial)
            if isinstance(target, str)
            else target,
            "priority": priority,
            "tags": builtins.list(tags),
            "save_adversarial": save_adversarial,
        }
        if transfer_from is not None:
            body["transfer_from"] = (
                self.target(transfer_from) if isinstance(transfer_from, str) else transfer_from
            )
        resources = self._params(
            num_workers=num_workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker
        )
        if use_gpu is not None:
            resources["use_gpu"] = use_gpu
        if resources:
            body["resources"] = resources
        body.update(
            self._params(
                protocol=protocol,
                suite=suite,
                extends=extends,
                n_examples=n_examples,
                shard_size=shard_size,
                max_attempts=max_attempts,
                name=name,
            )
        )
        if add_attacks:
            body["add_attacks"] = builtins.list(add_attacks)
        key = idempotency_key or str(uuid.uuid4())
        response = self._send(
            "POST", "/v1/evaluations", retry=True, json=body, headers={"Idempotency-Key": key}
        )
        return EvaluationOut.model_validate(response.json())

    def _target_of(self, evaluation_id: str) -> dict[str, Any]:
        """The target an existing evaluation evaluated (to extend it)."""
        detail = self.evaluation(evaluation_id)
        checkpoint = detail.spec.get("checkpoint") or {}
        if detail.source_experiment:
            parts = str(checkpoint.get("key", "")).split("/")
            trial = parts[2] if len(parts) > 3 and parts[0] == "experiments" else "main"
            return {"experiment": detail.source_experiment, "weights": detail.weights, "trial": trial}
        if detail.checkpoint_sha256:
            return {"sha256": detail.checkpoint_sha256}
        raise ValueError(f"evaluation {evaluation_id} names neither an experiment nor a stored checkpoint")

    def bulk_evaluate(
        self,
        protocol: str,
        *,
        dataset: str | None = None,
        weights: str = "best",
        num_workers: int | None = None,
        gpus_per_worker: float | None = None,
        priority: int = 0,
        dry_run: bool = False,
    ) -> BulkResult:
        """Queue `protocol` for every finished experiment of the team lacking a result under it."""
        body: dict[str, Any] = {
            "protocol": protocol,
            "weights": weights,
            "priority": priority,
            "dry_run": dry_run,
        }
        if dataset is not None:
            body["dataset"] = dataset
        resources = self._params(num_workers=num_workers, gpus_per_worker=gpus_per_worker)
        if resources:
            body["resources"] = resources
        return BulkResult.model_validate(self._send("POST", "/v1/evaluations/bulk", json=body).json())

    bulk = bulk_evaluate

    def evaluations(
        self,
        *,
        state: str | JobState | Iterable[str | JobState] | None = None,
        dataset: str | None = None,
        user: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> EvaluationPage:
        states = None
        if state is not None:
            items = [state] if isinstance(state, (str, JobState)) else builtins.list(state)
            states = [JobState(s).value for s in items]
        params = self._params(state=states, dataset=dataset, user=user, limit=limit, cursor=cursor)
        return EvaluationPage.model_validate(self._get("/v1/evaluations", params=params))

    def evaluation(self, evaluation_id: str) -> EvaluationDetail:
        return EvaluationDetail.model_validate(self._get(f"/v1/evaluations/{quote(evaluation_id, safe='')}"))

    def upload_checkpoint(
        self,
        path: str | os.PathLike[str],
        *,
        model: str | None = None,
        dataset: str | None = None,
        name: str | None = None,
    ) -> CheckpointOut:
        """Upload a checkpoint file (streamed). Ours say their model and dataset; a plain state dict
        needs both. The same bytes twice are stored once (`created` False the second time)."""
        file = Path(path)
        params = self._params(model=model, dataset=dataset, name=name)
        with file.open("rb") as handle:
            response = self._send(
                "POST",
                "/v1/checkpoints",
                params=params,
                content=_chunks(handle),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(file.stat().st_size),
                },
                timeout=httpx.Timeout(
                    self.timeout, write=max(self.timeout, 300.0), read=max(self.timeout, 300.0)
                ),
            )
        return CheckpointOut.model_validate(response.json())

    def checkpoints(self, *, limit: int | None = None) -> builtins.list[CheckpointOut]:
        return [
            CheckpointOut.model_validate(c)
            for c in self._get("/v1/checkpoints", params=self._params(limit=limit))
        ]

    def protocols(self) -> builtins.list[Protocol]:
        return [Protocol.model_validate(p) for p in self._get("/v1/protocols")]

    def protocol(self, ref: str) -> Protocol:
        return Protocol.model_validate(self._get(f"/v1/protocols/{quote(ref, safe='@')}"))

    def compare(self, ids: Iterable[str]) -> Comparison:
        return Comparison.model_validate(self._get("/v1/results/compare", params={"ids": builtins.list(ids)}))

    # -- users and tokens ----------------------------------------------------------------------------

    def me(self) -> UserOut:
        return UserOut.model_validate(self._get("/v1/users/me"))

    def users(self) -> builtins.list[UserOut]:
        return [UserOut.model_validate(u) for u in self._get("/v1/users")]

    def create_user(
        self,
        name: str,
        *,
        team: str = "default",
        is_admin: bool = False,
        max_running_jobs: int | None = None,
        max_gpus: float | None = None,
    ) -> CreatedUser:
        """(admin) A new user and their first token (shown once)."""
        body = {"name": name, "team": team, "is_admin": is_admin}
        body.update(self._params(max_running_jobs=max_running_jobs, max_gpus=max_gpus))
        return CreatedUser.model_validate(self._send("POST", "/v1/users", json=body).json())

    def create_token(self, label: str = "cli") -> TokenOut:
        """A new token for the calling user (shown once)."""
        return TokenOut.model_validate(self._send("POST", "/v1/tokens", json={"label": label}).json())

    def revoke_token(self, token_id: int) -> None:
        self._send("DELETE", f"/v1/tokens/{int(token_id)}")

    # -- accounting and webhooks ---------------------------------------------------------------------

    def usage(
        self,
        *,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        group_by: str | None = None,
        team: str | None = None,
    ) -> UsageReport:
        """GPU- and CPU-hours per user, team or method (GET /v1/usage); `since`/`until` as datetimes
        or ISO text (a date alone is its midnight, UTC)."""
        params = self._params(since=_iso(since), until=_iso(until), group_by=group_by, team=team)
        return UsageReport.model_validate(self._get("/v1/usage", params=params))

    def budget(self, team: str) -> BudgetOut:
        return BudgetOut.model_validate(self._get(f"/v1/teams/{quote(team, safe='')}/budget"))

    def set_budget(
        self, team: str, gpu_hours: float, *, period: str = "month", action: str | None = None
    ) -> BudgetOut:
        """(admin) The team's GPU-hour budget per UTC day, week or month; `action` once spent:
        lower_priority or hold (default: the service's setting)."""
        body = {"period": period, "gpu_hours": float(gpu_hours), **self._params(action=action)}
        response = self._send("PUT", f"/v1/teams/{quote(team, safe='')}/budget", json=body)
        return BudgetOut.model_validate(response.json())

    def delete_budget(self, team: str) -> None:
        self._send("DELETE", f"/v1/teams/{quote(team, safe='')}/budget")

    def webhooks(self) -> builtins.list[WebhookOut]:
        return [WebhookOut.model_validate(w) for w in self._get("/v1/webhooks")]

    def create_webhook(
        self,
        url: str,
        *,
        scope: str = "user",
        team: str | None = None,
        events: Iterable[str] | None = None,
    ) -> CreatedWebhook:
        """A webhook for your jobs (scope user) or your team's (scope team); its secret is shown once."""
        body: dict[str, Any] = {"url": url, "scope": scope, **self._params(team=team)}
        if events is not None:
            body["events"] = builtins.list(events)
        return CreatedWebhook.model_validate(self._send("POST", "/v1/webhooks", json=body).json())

    def delete_webhook(self, webhook_id: int) -> None:
        self._send("DELETE", f"/v1/webhooks/{int(webhook_id)}")

    # -- service -------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._get("/healthz")

    def ready(self) -> Readiness:
        """Readiness of the database, Ray and the store (a 503 answer is returned, not raised)."""
        return Readiness.model_validate(self._send("GET", "/readyz", retry=True, expect=(503,)).json())


def _iso(value: datetime | str | None) -> str | None:
    """A query's time: ISO 8601; a date alone (`2026-11-01`) is its midnight, UTC."""
    if value is None or isinstance(value, datetime):
        return value.isoformat() if value is not None else None
    text = value.strip()
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        return text + "T00:00:00+00:00"
    return text


def _chunks(handle: Any, size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := handle.read(size):
        yield chunk


def _parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any], str | None]]:
    """(event, data, id) per server-sent event; `data` is the JSON of its data lines (or {"text": ...})."""
    event, data_lines, event_id = "message", [], None
    for line in lines:
        if not line:
            if data_lines:
                raw = "\n".join(data_lines)
                try:
                    data = json.loads(raw)
                except ValueError:
                    data = {"text": raw}
                yield event, data if isinstance(data, dict) else {"value": data}, event_id
            event, data_lines, event_id = "message", [], None
            continue
        if line.startswith(":"):  # a comment: keep-alive
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data_lines.append(value)
        elif field == "id":
            event_id = value
    if data_lines:  # a stream that ended without the blank line
        raw = "\n".join(data_lines)
        try:
            data = json.loads(raw)
        except ValueError:
            data = {"text": raw}
        yield event, data if isinstance(data, dict) else {"value": data}, event_id
