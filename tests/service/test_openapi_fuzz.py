"""The OpenAPI document fuzzed against the running service (schemathesis), on SQLite and PostgreSQL.

The service runs for real: uvicorn on a free 127.0.0.1 port (tests/service/conftest.py), a real database,
a local artifact store, no scheduler and no Ray, so nothing is ever dispatched. Schemathesis takes the
document the service serves and, for every operation, sends requests built from it, valid and invalid
(its examples, coverage and fuzzing phases), as the bootstrap admin, so that they pass authentication
and reach the handlers. Every default check of schemathesis runs on every answer, among them the three
the issue asks for: no server error (5xx), no status code the document does not list for the
operation, every body (SSE events included) conforming to the schema documented for its status and
media type. Integers are drawn from where the database's columns end (COLUMN_LIMITS) as well, which
a fuzzer rarely reaches by itself: an unbounded id is a 500 here within a few cases.

To reach more than "not found", half the generated experiment ids (and artifact paths) are swapped for
real ones: experiments in each state the routes treat differently, with artifacts, and others to
delete. The fuzzer may revoke the token it authenticates with (DELETE /v1/tokens/1 is a likely
case), which would turn every later request into a 401: a new admin token is issued when it does.

Evaluations are seeded too: a succeeded training run, an evaluation of it that finished (with a
result row, so the export answers) and one still queued; half the generated evaluation ids are
swapped for those.

No operation is excluded. The event stream and log following never end for a live job, so the stream
is fuzzed on finished experiments only (it sends their events and `end`) and on missing ones (404);
logs answer 503 without Ray before they could follow anything. Configured per operation, with the
reasons next to them in CONFIG: 503 is the logs' expected answer here; a 413 rightly refuses an
oversized submission or upload; and some operations refuse requests that are valid by the document
for reasons no JSON Schema can state (a spec's rules across fields, an opaque cursor, references that
must resolve in the database, a protocol that must exist, a file that must be a checkpoint), so the
check "valid data is accepted" is off for those.

The document is read from an app built like the server's at import (the fixture checks that the
server serves the same), so that pytest collects one test per operation and backend: schemathesis's
lazy `from_fixture` loader does not run under pytest 9 (it sets `Function._nodeid`).

Budget: `MAX_EXAMPLES` generated cases per operation in the fuzzing phase, plus the examples and
coverage phases' deterministic cases, without shrinking: about 2,200 requests per backend (1,400 of
them before the evaluation routes, 20-35 s on 2 cores; with them 130 s on SQLite on a busy machine).
"""

from __future__ import annotations

import re
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import schemathesis

from api_schemas.jobs import JobState
from service import auth
from service.api.routes.artifacts import PATH_PATTERN
from service.db.engine import run_tx
from service.db.models import Experiment, User
from service.jobs import transition
from tests.databases import BACKENDS, database
from tests.service.conftest import ADMIN_TOKEN, Api, digits_spec, make_settings, running_api
from workers.storage import experiment_prefix

MAX_EXAMPLES = 25  # generated cases per operation in the fuzzing phase
SUBMIT_EXAMPLES = 150  # the submission's, which skips the coverage phase (see CONFIG)
SEED = 20251111  # the same cases on every run: a failure here is reproducible, not flaky
COLUMN_LIMITS = [2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 10**23, -(2**31) - 1, -(2**63) - 1]
# schemathesis's default statuses for "invalid data was rejected"
NEGATIVE_REJECTED = ["400", "401", "403", "404", "405", "406", "409", "415", "422", "428", "429", "5xx"]

# The server being fuzzed: the schema's hooks are module-level, its fixture is per backend.
CURRENT: list[Fuzzed] = []


class Fuzzed:
    """What the fuzzer works with on one server: its token, and real ids to put in paths."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.token = ADMIN_TOKEN
        self.experiments: list[str] = []  # never deleted
        self.doomed: list[str] = []  # for DELETE
        self.finished: list[str] = []  # for the event stream: no operation of the fuzzer reopens them
        self.evaluations: list[str] = []  # a finished evaluation with a result row, a queued one
        self.artifacts = ["main/summary.json", "main/metrics.jsonl", "main/checkpoints/last.pt"]
        self.statuses: dict[int, int] = {}

    def count(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def keep_token(self) -> None:
        """Issue the admin a new token when the fuzzer revoked the one it uses."""
        with self.api.sessions() as session:
            if auth.authenticate(session, self.token) is not None:
                return

        def issue(session: Any) -> str:
            admin = session.query(User).filter(User.name == "admin").one()
            return auth.issue_token(session, admin, label="fuzz")[1]

        self.token = run_tx(self.api.sessions, issue)


def _submit(api: Api, name: str) -> str:
    r = api.admin.http.post("/v1/experiments", json={"spec": digits_spec(name)})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _move(api: Api, exp_id: str, *path: JobState, **fields: Any) -> None:
    def move(session: Any) -> None:
        exp = session.get(Experiment, exp_id)
        for state in path:
            assert transition(session, exp, state, reason="fuzz setup")
        for key, value in fields.items():
            setattr(exp, key, value)

    run_tx(api.sessions, move)


def _seed(api: Api) -> Fuzzed:
    """Experiments in each state the routes treat differently, with artifacts; experiments to delete."""
    fuzzed = Fuzzed(api)
    queued = _submit(api, "queued")
    cancelled = _submit(api, "cancelled")
    _move(api, cancelled, JobState.cancelled)
    failed = _submit(api, "failed")
    _move(api, failed, JobState.dispatching, JobState.failed, error="the fuzzer's failure")
    running = _submit(api, "running")
    _move(api, running, JobState.dispatching, JobState.running, ray_job_id=f"{running}-a1")
    succeeded = _submit(api, "succeeded")
    results = {"clean_accuracy": 0.9, "robust_accuracy": 0.5, "autoattack_accuracy": 0.45, "nrr": 0.64}
    _move(
        api,
        succeeded,
        JobState.dispatching,
        JobState.running,
        JobState.succeeded,
        results={**results, "attacks": {"pgd20": 0.5}},
        clean_accuracy=0.9,
        robust_accuracy=0.5,
        autoattack_accuracy=0.45,
    )
    fuzzed.experiments = [queued, cancelled, failed, running, succeeded]
    for exp_id in fuzzed.experiments:
        prefix = experiment_prefix(exp_id)
        api.store.put_json(prefix + "main/summary.json", {"final": {"clean_accuracy": 0.9}})
        api.store.put_bytes(prefix + "main/metrics.jsonl", b'{"epoch": 1}\n')
        api.store.put_bytes(prefix + "main/checkpoints/last.pt", bytes(range(256)))
    fuzzed.evaluations = _seed_evaluations(api, succeeded)
    fuzzed.doomed = [_submit(api, f"doomed-{i}") for i in range(8)]
    for exp_id in fuzzed.doomed[::2]:
        _move(api, exp_id, JobState.cancelled)
    fuzzed.finished = [_submit(api, "streamed-cancelled"), _submit(api, "streamed-failed")]
    _move(api, fuzzed.finished[0], JobState.cancelled)
    _move(api, fuzzed.finished[1], JobState.dispatching, JobState.failed, error="the fuzzer's failure")
    return fuzzed


def _seed_evaluations(api: Api, trained: str) -> list[str]:
    """A finished evaluation of `trained`'s last weights (its summary ingested as the scheduler does:
    a result row the export reads) and a queued one."""
    from api_schemas.evaluations import EvaluationSummary
    from service.scheduler import Scheduler

    api.store.put_bytes(experiment_prefix(trained, "main") + "checkpoints/last.pt", b"weights")
    ids = []
    for _ in range(2):
        body = {"target": {"experiment": trained, "weights": "last"}, "protocol": "digits"}
        r = api.admin.http.post("/v1/evaluations", json=body)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    attacks = [{"name": "autoattack", "kind": "autoattack", "accuracy": 0.4, "n_attacked": 450, "nrr": 0.55}]
    summary = EvaluationSummary(
        evaluation_id=ids[0],
        protocol_id="digits",
        protocol_version="1",
        checkpoint_sha256="",
        dataset="digits",
        norm="linf",
        eps=0.1,
        n_examples=450,
        n_total=450,
        partial=False,
        clean_accuracy=0.9,
        attacks=attacks,
        autoattack_accuracy=0.4,
        robust_accuracy=0.4,
        nrr=0.55,
        seed=0,
        shard_size=250,
        n_shards=2,
    )
    api.store.put_json(experiment_prefix(ids[0]) + "eval/summary.json", summary.model_dump(mode="json"))
    _move(api, ids[0], JobState.dispatching, JobState.running)
    Scheduler(sessions=api.sessions, settings=api.settings, store=api.store, ray=None)._succeeded(ids[0])
    return ids


@pytest.fixture(scope="module", params=BACKENDS)
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root: Path = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    with database(request.param, root) as url, running_api(url, root) as api:
        served = api.client().get("/openapi.json").json()
        assert served == DOCUMENT, "the fuzzed document is not the one the server serves"
        started = time.monotonic()
        fuzzed = _seed(api)
        CURRENT[:] = [fuzzed]
        try:
            yield fuzzed
        finally:
            CURRENT.clear()
        print(
            f"\nfuzz on {request.param}: {sum(fuzzed.statuses.values())} requests in "
            f"{time.monotonic() - started:.1f} s; statuses {dict(sorted(fuzzed.statuses.items()))}"
        )


def _document() -> dict[str, Any]:
    """The document a test server serves (same settings; the fixture checks that it is the same)."""
    from service.app import create_app

    return create_app(make_settings("sqlite://"), scheduler=False).openapi()


CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": {
            "mode": "all",
            "max-examples": MAX_EXAMPLES,
            "no-shrink": True,
            "database": "none",
            # The test sends the admin's token itself; `ignored_auth` checks requests without it.
            "with-security-parameters": False,
            "dictionaries": {"integer": {"dictionary": "column-limits", "probability": 0.3}},
        },
        "phases": {"stateful": {"enabled": False}},
        # Integers a fuzzer rarely draws by itself, where the database's columns end: PostgreSQL's
        # integer (32-bit), SQLite's (64-bit), and past both.
        "dictionaries": {"column-limits": {"values": COLUMN_LIMITS}},
        "operations": [
            {
                # Without Ray (this server has none: nothing is ever dispatched) the logs' documented
                # answer is 503; any other 5xx still fails.
                "include-path": "/v1/experiments/{experiment_id}/logs",
                "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
            },
            # Requests valid by the document that the service rightly refuses, for reasons no JSON
            # Schema states, so "schema-valid data is accepted" cannot hold for these three:
            {
                # a spec's rules across fields (a teacher for LBGAT, milestones within the epochs, ...)
                "include-path": "/v1/experiments",
                "include-method": "POST",
                # The coverage phase would walk every field of ExperimentSpec (4,500 requests, 40-75 s
                # per backend); tests/api_schemas check the spec's bounds field by field. Random
                # submissions instead, more of them than for other operations.
                "phases": {"coverage": {"enabled": False}},
                "generation": {"max-examples": SUBMIT_EXAMPLES},
                "checks": {
                    "positive_data_acceptance": {"enabled": False},
                    # a body past LBGAT_MAX_SPEC_BYTES is refused before it is read: 413
                    "negative_data_rejection": {"expected-statuses": [*NEGATIVE_REJECTED, "413"]},
                },
            },
            {
                # `cursor` is opaque: only the ones this service handed out are cursors
                "include-path": "/v1/experiments",
                "include-method": "GET",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
            {
                # presign=true needs an S3 store (this one is local): a documented 400
                "include-path": "/v1/experiments/{experiment_id}/artifacts/{path}",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
            {
                # an evaluation's target, protocol and extended evaluation must resolve in the database
                # (and the protocol fit the target's dataset and norm): a 422 naming the field
                "include-path": "/v1/evaluations",
                "include-method": "POST",
                "checks": {
                    "positive_data_acceptance": {"enabled": False},
                    "negative_data_rejection": {"expected-statuses": [*NEGATIVE_REJECTED, "413"]},
                },
            },
            {
                # the protocol must exist (and be defined for the dataset)
                "include-path": "/v1/evaluations/bulk",
                "checks": {
                    "positive_data_acceptance": {"enabled": False},
                    "negative_data_rejection": {"expected-statuses": [*NEGATIVE_REJECTED, "413"]},
                },
            },
            {
                # `cursor` is opaque, as for the experiments
                "include-path": "/v1/evaluations",
                "include-method": "GET",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
            {
                # any bytes fit the document's binary body; only a checkpoint is accepted (422 says why).
                # Every case is inspected on disk: fewer of them.
                "include-path": "/v1/checkpoints",
                "include-method": "POST",
                "generation": {"max-examples": 10},
                "checks": {
                    "positive_data_acceptance": {"enabled": False},
                    "negative_data_rejection": {"expected-statuses": [*NEGATIVE_REJECTED, "413"]},
                },
            },
            {
                # a protocol named by the pattern must also exist: an unknown one is a 422 naming it
                "include-path-regex": "^/v1/results/(leaderboard|transfer-matrix)$",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
            {
                # `since` before `until`, both within 2000-2200 and at most 10 years apart: a 422
                # naming the field (date-time has no bounds in JSON Schema)
                "include-path": "/v1/usage",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
            {
                # a user webhook names no team (scope=user with `team` is a 422 naming body.team)
                "include-path": "/v1/webhooks",
                "include-method": "POST",
                "checks": {"positive_data_acceptance": {"enabled": False}},
            },
        ],
    }
)
DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


@schema.hook
def after_call(context: Any, case: Any, response: Any) -> None:
    if CURRENT:
        CURRENT[0].count(response.status_code)


def _swap(case: Any, fuzzed: Fuzzed) -> None:
    """Half the generated experiment ids (chosen by their checksum: reproducible) become real ones.

    Ids and paths a negative case made invalid on purpose stay as they are: swapped for valid ones,
    the case would be valid while schemathesis expects it refused. (Path parameters are kept
    percent-encoded in the case.)"""
    parameters = case.path_parameters or {}
    evaluation = parameters.get("evaluation_id")
    if isinstance(evaluation, str) and "\x00" not in unquote(evaluation):
        digest = zlib.crc32(evaluation.encode("utf-8", "surrogatepass"))
        if digest % 2 == 0:
            parameters["evaluation_id"] = fuzzed.evaluations[(digest >> 1) % len(fuzzed.evaluations)]
    generated = parameters.get("experiment_id")
    if not isinstance(generated, str) or "\x00" in unquote(generated):
        return
    digest = zlib.crc32(generated.encode("utf-8", "surrogatepass"))
    if digest % 2:
        return
    if case.operation.path.endswith("/events"):
        pool = fuzzed.finished  # a live job's stream never ends
    elif case.method.upper() == "DELETE":
        pool = fuzzed.doomed
    else:
        pool = fuzzed.experiments
    parameters["experiment_id"] = pool[(digest >> 1) % len(pool)]
    path = parameters.get("path")
    if isinstance(path, str) and re.search(PATH_PATTERN, unquote(path)) and (digest >> 8) % 2:
        parameters["path"] = fuzzed.artifacts[(digest >> 9) % len(fuzzed.artifacts)]


@schema.parametrize()
def test_openapi_fuzz(case: Any, fuzzed: Fuzzed) -> None:
    """One operation's generated cases against the server of one backend, every check on each answer."""
    _swap(case, fuzzed)
    try:
        case.call_and_validate(base_url=fuzzed.api.url, headers=fuzzed.headers(), timeout=30)
    finally:
        fuzzed.keep_token()
