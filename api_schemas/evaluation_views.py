"""The REST views of evaluation jobs and their exports, next to the contract in `evaluations`.

An evaluation is a job of the queue (an experiment row of kind `evaluation`), so its view is an
`ExperimentOut` plus what it evaluates and how far it got; the detail adds the job spec, the state
history, every progress row and the summary. `RobustBenchModelInfo` is one result as RobustBench's
`model_info/<dataset>/<threat model>/<name>.json` files write it. Only pydantic here.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api_schemas.evaluations import EvaluationResultRow, EvaluationSummary
from api_schemas.jobs import ExperimentOut, StateChange


class EvaluationOut(ExperimentOut):
    """An evaluation job: the queue's view, what it evaluates, under which protocol, how far it is."""

    protocol_id: str
    protocol_version: str
    target: str = Field(description="the evaluated weights: <experiment>:<weights> or the upload's name")
    source_experiment: str | None = None
    weights: str = Field(description="best, last, averaged or upload")
    checkpoint_sha256: str | None = None
    transfer_source: str | None = Field(None, description="the source model of a transfer evaluation")
    extends: str | None = Field(None, description="the evaluation whose records this one strengthens")
    n_shards: int | None = Field(None, description="from the latest progress row")
    shards_done: int | None = None
    accuracy: dict[str, float] = Field(
        default_factory=dict, description="running accuracies over the finished shards (clean, per attack)"
    )


class EvaluationDetail(EvaluationOut):
    spec: dict[str, Any] = Field(description="the EvaluationJobSpec the worker runs")
    error_log_tail: str | None = None
    history: list[StateChange] = Field(default_factory=list)
    progress: list[dict[str, Any]] = Field(
        default_factory=list, description="eval/progress.jsonl rows: one per finished shard"
    )
    summary: EvaluationSummary | None = None
    result: EvaluationResultRow | None = Field(None, description="its leaderboard row, once finished")


class EvaluationPage(BaseModel):
    items: list[EvaluationOut]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page; null at the end")


class RobustBenchModelInfo(BaseModel):
    """RobustBench's model_info JSON (robustbench/utils.py ModelInfo and the files under model_info/):
    accuracies in percent as strings with two decimals, eps as written there ("8/255", "0.5").

    `reported` is what the authors report: here, the AutoAttack accuracy this service measured;
    `external` (RobustBench: a stronger evaluation's number) is the worst case over every attack of
    the protocol, given when it is below AutoAttack's. `link`, `authors` and `venue` are for the
    authors to fill in.
    """

    model_config = ConfigDict(extra="forbid")

    link: str = ""
    name: str
    authors: str = ""
    additional_data: bool = False
    number_forward_passes: int = 1
    dataset: str
    venue: str = ""
    architecture: str
    eps: str
    clean_acc: str
    reported: str
    autoattack_acc: str
    external: str | None = None
    footnote: str = ""
    unreliable: bool = False
