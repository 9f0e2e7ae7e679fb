"""Evaluation jobs: what a user asks for, what a worker runs, what it writes, what the service shows.

The flow: `EvaluationCreate` (REST body) -> the service resolves the checkpoint and the protocol and
stores an `EvaluationJobSpec` as the job's spec.json -> the worker evaluates shard by shard and writes
one `ShardRecords` file (npz) plus a `ShardInfo` (JSON) per shard -> `summarize` computes the
`EvaluationSummary` from the records (and only from them) -> the service keeps it as a result row
(checkpoint, protocol).

Per-example records are the ground truth. For example i and attack k (in the suite's order):
`robust[i, k]` is 1 when the model still classifies the attacked example correctly, 0 when the attack
broke it, and -1 when the attack did not run on it (an attack added to an existing evaluation runs
only on the examples still robust to every earlier attack; a skipped example was already broken).
`broken_by[i]` is the index of the first attack that broke it, `BROKEN_BY_CLEAN` when the clean
example is already misclassified, `NOT_BROKEN` when nothing did.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api_schemas.jobs import MAX_ATTEMPTS_MAX, MAX_TAGS, PRIORITY_MAX, PRIORITY_MIN, Tag
from api_schemas.protocols import PROTOCOL_ID_PATTERN, EvaluationSuite
from api_schemas.results import Precision, SelectionSplit, nrr
from api_schemas.spec import MAX_PATH, MAX_WORKERS, AttackSpec, DatasetSpec, ModelRef

NOT_BROKEN = -1
BROKEN_BY_CLEAN = -2
SHA256_PATTERN = r"^[0-9a-f]{64}$"
#: an experiment's checkpoints an evaluation may name
ExperimentWeights = Literal["best", "last", "averaged"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------- request


class ExperimentTarget(_Strict):
    """Weights of one of the team's finished experiments: the selected (`best`), the last epoch's
    (`last`) or the moving average (`averaged`, where the run kept one)."""

    experiment: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    weights: ExperimentWeights = "best"
    trial: str = Field("main", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._=,-]*$")


class CheckpointTarget(_Strict):
    """A checkpoint already in the store (uploaded with `POST /v1/checkpoints`), by its sha256."""

    sha256: str = Field(pattern=SHA256_PATTERN)


Target = ExperimentTarget | CheckpointTarget


class EvaluationResources(_Strict):
    num_workers: int = Field(1, ge=1, le=MAX_WORKERS, strict=True, description="shards run in parallel")
    gpus_per_worker: float = Field(1.0, ge=0, le=64, allow_inf_nan=False)
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, allow_inf_nan=False)
    use_gpu: bool | None = Field(None, description="None: GPUs where the cluster has them")


class EvaluationCreate(_Strict):
    """POST /v1/evaluations. Exactly one of `protocol` and `suite`, unless `extends` is given."""

    target: Target = Field(description="what to evaluate: an experiment's weights or a stored checkpoint")
    protocol: str | None = Field(
        None,
        max_length=80,
        pattern=r"^[a-z0-9][a-z0-9-]{0,63}(@[0-9]{1,5})?$",
        description="a protocol id ('lbgat', latest version) or 'id@version'",
    )
    suite: EvaluationSuite | None = Field(None, description="an explicit suite (results carry id 'custom')")
    extends: str | None = Field(
        None,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="a finished evaluation of the same checkpoint to strengthen: its records are reused "
        "and `add_attacks` run on the examples still robust",
    )
    add_attacks: list[AttackSpec] = Field(default_factory=list, max_length=16)
    transfer_from: Target | None = Field(
        None,
        description="black-box transfer: adversarial examples are made on this model with the suite's "
        "PGD attacks and applied to the target",
    )
    n_examples: int | None = Field(
        None, ge=1, le=10_000_000, strict=True, description="fewer than the protocol's: marked partial"
    )
    shard_size: int | None = Field(None, ge=1, le=100_000, strict=True)
    save_adversarial: bool = Field(False, description="also store each example's adversarial image")
    resources: EvaluationResources = Field(default_factory=EvaluationResources)
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, strict=True)
    max_attempts: int | None = Field(None, ge=1, le=MAX_ATTEMPTS_MAX, strict=True)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)

    @model_validator(mode="after")
    def _one_suite(self) -> EvaluationCreate:
        if self.extends is not None:
            if self.protocol is not None or self.suite is not None:
                raise ValueError("extends: the suite is the extended evaluation's; drop protocol/suite")
            if not self.add_attacks:
                raise ValueError("add_attacks: name at least one attack to add to the extended evaluation")
            return self
        if self.add_attacks:
            raise ValueError("add_attacks: only with `extends` (the evaluation to strengthen)")
        if (self.protocol is None) == (self.suite is None):
            raise ValueError(
                "protocol: give exactly one of `protocol` (a name) and `suite` (explicit attacks)"
            )
        return self


# ------------------------------------------------------------------------------ what the worker runs


class CheckpointRef(_Strict):
    """A checkpoint as the worker finds it: a store key and which weights in it."""

    key: str = Field(min_length=1, max_length=MAX_PATH, description="store key of the file")
    weights: Literal["model", "averaged"] = "model"
    sha256: str | None = Field(None, pattern=SHA256_PATTERN, description="checked after download when known")
    model: ModelRef | None = Field(None, description="architecture, for a plain state dict")
    label: str = Field("", max_length=512, description="for reports: experiment/weights or upload name")


class BaseRecords(_Strict):
    """Where the records of an evaluation being strengthened are, and how many attacks they hold."""

    evaluation_id: str
    n_attacks: int = Field(ge=1)


class EvaluationJobSpec(_Strict):
    """experiments/<job-id>/spec.json of an evaluation job."""

    kind: Literal["evaluation"] = "evaluation"
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    protocol_id: str = Field(pattern=PROTOCOL_ID_PATTERN)
    protocol_version: str = Field(max_length=32)
    suite: EvaluationSuite
    dataset: DatasetSpec
    checkpoint: CheckpointRef
    transfer_source: CheckpointRef | None = Field(
        None, description="transfer attacks' source model (replaces their source_checkpoint)"
    )
    base: BaseRecords | None = None
    num_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    use_gpu: bool | None = None
    save_adversarial: bool = False
    cpu_threads: int | None = Field(None, ge=1, le=1024, description="torch threads per worker (CPU)")
    # what the result row says about the checkpoint (copied from the source experiment)
    source_experiment: str | None = None
    target_weights: str = Field("upload", description="best, last, averaged or upload")
    training_precision: Precision | None = None
    selection_split: SelectionSplit | None = None

    def n_examples(self, split_size: int) -> int:
        return min(split_size, self.suite.n_examples) if self.suite.n_examples else split_size


# ---------------------------------------------------------------------------------------- records


class ShardInfo(_Strict):
    """evaluations' shards/<k>.json: written after the shard's npz, so a shard with its info is done."""

    shard: int = Field(ge=0)
    start: int = Field(ge=0, description="first example index (into the split)")
    stop: int = Field(ge=0, description="one past the last example index")
    attacks: list[str] = Field(description="attack labels, the columns of `robust`")
    suite_digest: str
    checkpoint_sha256: str
    attempt: int = Field(ge=0, description="the job attempt that computed the shard")
    seconds: float = Field(ge=0)
    attack_seconds: dict[str, float] = Field(default_factory=dict)
    reused_attacks: int = Field(0, ge=0, description="leading attacks copied from the extended evaluation")
    device: str = ""


class AttackSummary(_Strict):
    name: str
    kind: str
    accuracy: float = Field(ge=0, le=1, description="examples robust to this attack / examples evaluated")
    n_attacked: int = Field(description="examples the attack ran on")
    incremental: bool = Field(
        False, description="run only on the examples robust to every earlier attack (added later)"
    )
    nrr: float
    params: dict[str, Any] = Field(default_factory=dict)


class EvaluationSummary(_Strict):
    """Computed from the per-example records by `summarize`."""

    evaluation_id: str
    protocol_id: str
    protocol_version: str
    checkpoint_sha256: str
    checkpoint: str = ""
    weights: Literal["model", "averaged"] = "model"
    dataset: str
    norm: str
    eps: float
    n_examples: int
    n_total: int = Field(description="examples in the protocol's full set on this dataset")
    partial: bool
    clean_accuracy: float
    attacks: list[AttackSummary]
    autoattack_accuracy: float | None = None
    robust_accuracy: float = Field(description="worst case per example: robust to every attack")
    worst_attack: str | None = Field(None, description="the attack that broke the most examples first")
    nrr: float
    precision: Literal["fp32"] = Field("fp32", description="evaluation always runs in fp32")
    training_precision: Precision | None = None
    selection_split: SelectionSplit | None = None
    seed: int
    shard_size: int
    n_shards: int
    transfer_source: str | None = None
    seconds: float = 0.0
    provenance: dict[str, Any] = Field(default_factory=dict)


def summarize(
    *,
    labels: list[int],
    clean: list[bool],
    robust: list[list[int]],
    attacks: list[dict[str, Any]],
    incremental_from: int | None = None,
    **fields: Any,
) -> EvaluationSummary:
    """The summary of per-example records, in plain Python (the service and tests use it too).

    `robust` is one row per example with one entry per attack (1, 0, -1), `attacks` the resolved
    attack specs in column order, `incremental_from` the first column added to an extended
    evaluation. Accuracy per attack counts 1s over all examples (a skipped example was broken
    before); the worst case counts examples correct on clean data and robust to every attack.
    """
    n = len(labels)
    if not (len(clean) == len(robust) == n):
        raise ValueError("records: labels, clean and robust must have one entry per example")
    if n == 0:
        raise ValueError("records: no examples")
    k = len(attacks)
    clean_acc = sum(1 for c in clean if c) / n
    out: list[AttackSummary] = []
    for j, attack in enumerate(attacks):
        column = [row[j] for row in robust]
        acc = sum(1 for v in column if v == 1) / n
        out.append(
            AttackSummary(
                name=attack.get("name") or attack["label"],
                kind=attack["kind"],
                accuracy=acc,
                n_attacked=sum(1 for v in column if v != -1),
                incremental=incremental_from is not None and j >= incremental_from,
                nrr=nrr(clean_acc, acc),
                params={key: v for key, v in attack.items() if key not in ("name", "label", "kind")},
            )
        )
    robust_all = sum(1 for c, row in zip(clean, robust, strict=True) if c and all(v == 1 for v in row)) / n
    first = broken_by(clean, robust)
    counts = [sum(1 for b in first if b == j) for j in range(k)]
    worst = out[max(range(k), key=lambda j: (counts[j], -j))].name if k and max(counts) > 0 else None
    aa = [a.accuracy for a in out if a.kind == "autoattack"]
    return EvaluationSummary(
        clean_accuracy=clean_acc,
        attacks=out,
        autoattack_accuracy=min(aa) if aa else None,
        robust_accuracy=robust_all,
        worst_attack=worst,
        nrr=nrr(clean_acc, robust_all),
        n_examples=n,
        **fields,
    )


def broken_by(clean: list[bool], robust: list[list[int]]) -> list[int]:
    """Per example: the first attack (column) that broke it, BROKEN_BY_CLEAN, or NOT_BROKEN."""
    out = []
    for c, row in zip(clean, robust, strict=True):
        if not c:
            out.append(BROKEN_BY_CLEAN)
            continue
        out.append(next((j for j, v in enumerate(row) if v != 1), NOT_BROKEN))
    return out


# ------------------------------------------------------------------------------------- API models


class EvaluationResultRow(BaseModel):
    """One row of the evaluation leaderboard: (checkpoint, protocol)."""

    model_config = ConfigDict(from_attributes=True)

    evaluation_id: str = Field(description="the job that produced it (an evaluation, or a training run)")
    kind: Literal["evaluation", "training"]
    name: str
    owner: str
    team: str
    source_experiment: str | None = None
    weights: str = Field(description="best, last, averaged, upload")
    checkpoint_sha256: str | None = None
    protocol_id: str
    protocol_version: str
    method: str | None = None
    dataset: str
    norm: str
    eps: float
    model: str | None = None
    n_examples: int
    n_total: int | None = None
    partial: bool = Field(
        description="fewer examples than the protocol's full set: never ranked above full rows"
    )
    test_selected: bool = Field(
        False, description="the checkpoint was selected on the test set: its numbers are optimistic"
    )
    clean_accuracy: float
    robust_accuracy: float
    autoattack_accuracy: float | None = None
    nrr: float | None = None
    attacks: dict[str, float] = Field(default_factory=dict)
    transfer_source: str | None = None
    precision: str | None = None
    rank: int | None = Field(None, description="1-based rank within its protocol on the page shown")
    finished_at: datetime | None = None


class CheckpointOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    sha256: str
    size: int
    model: str | None = None
    num_classes: int | None = None
    dataset: str | None = None
    norm: str | None = None
    eps: float | None = None
    name: str | None = None
    created_at: datetime | None = None
    created: bool = Field(False, description="true when this upload stored the file (else it was there)")


class TransferMatrix(BaseModel):
    """Robust accuracy of each target (column) under PGD transferred from each source (row)."""

    experiments: list[str]
    accuracy: list[list[float | None]] = Field(description="[source][target]; None: not evaluated")
    evaluations: list[list[str | None]]
    protocol: str


class BulkEvaluation(_Strict):
    """POST /v1/evaluations/bulk: queue `protocol` for every finished experiment of the team lacking it."""

    protocol: str = Field(max_length=80, pattern=r"^[a-z0-9][a-z0-9-]{0,63}(@[0-9]{1,5})?$")
    dataset: str | None = Field(None, max_length=32, pattern=r"^[a-z0-9_]+$")
    weights: ExperimentWeights = "best"
    resources: EvaluationResources = Field(default_factory=EvaluationResources)
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, strict=True)
    dry_run: bool = False


class BulkResult(BaseModel):
    queued: list[str] = Field(description="evaluation ids queued")
    skipped: dict[str, str] = Field(description="experiment id -> why none was queued")


TransferRequest = Annotated[
    list[str], Field(min_length=1, max_length=20, description="experiment ids: targets of a transfer")
]
