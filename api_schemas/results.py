"""Typed records of what a run produced: per-epoch metrics, evaluation reports, the run summary.

They are written as JSON next to the checkpoints and read back by the workers and the service, so
that a number always arrives with the attack settings and the provenance that produced it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: What a training run computed in: bf16 autocast, fp32 with TF32 tensor cores, or full fp32.
Precision = Literal["bf16", "tf32", "fp32"]
#: Where the selected checkpoint's metric was measured (api_schemas.spec.SelectionSpec.split).
SelectionSplit = Literal["heldout", "test"]


def nrr(clean: float, robust: float) -> float:
    """Natural-Robustness Ratio (RAAT paper): the harmonic mean 2*clean*robust/(clean+robust)."""
    return 0.0 if clean + robust == 0 else 2 * clean * robust / (clean + robust)


class AttackResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str
    accuracy: float = Field(ge=0, le=1, description="accuracy under this attack (robust accuracy)")
    n_examples: int
    nrr: float
    mean: float = Field(description="mean of clean and robust accuracy")
    seconds: float
    params: dict[str, Any] = Field(default_factory=dict)


class EvalReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    clean_accuracy: float
    n_examples: int
    attacks: list[AttackResult] = Field(default_factory=list)
    robust_accuracy: float | None = Field(None, description="the lowest accuracy over all attacks")
    worst_attack: str | None = None
    nrr: float | None = None
    mean: float | None = None
    checkpoint: str | None = None
    epoch: int | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)
    weights: Literal["model", "averaged"] = Field(
        "model", description="which weights were evaluated: the trained model's or their moving average"
    )
    training_precision: Precision | None = Field(
        None, description="the precision the evaluated weights were trained in (None: not recorded)"
    )
    selection_split: SelectionSplit | None = Field(
        None,
        description="for a checkpoint chosen by a selection metric: the split that metric was measured on; "
        "'test' means the checkpoint was picked on the very images this report scores",
    )

    def attack(self, name: str) -> AttackResult:
        for result in self.attacks:
            if result.name == name:
                return result
        raise KeyError(f"no attack named {name!r} in this report; have {[a.name for a in self.attacks]}")


class EpochMetrics(BaseModel):
    """One line of metrics.jsonl."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    lr: float
    loss: float
    train_adv_accuracy: float | None = None
    train_clean_accuracy: float | None = None
    teacher_accuracy: float | None = None
    test_clean_accuracy: float | None = None
    images_per_second: float
    seconds: float
    val: dict[str, float] | None = Field(
        None, description="clean/PGD accuracy on the selection split (see val_split)"
    )
    val_split: SelectionSplit | None = Field(
        None, description="where `val` was measured: held-out training images or the test set"
    )
    checkpoint_at: float | None = Field(
        None,
        description="unix time of the checkpoint stored after this epoch, when one was (None: none); "
        "what the control plane reads to know when a run's work was last saved",
    )
    extra: dict[str, float] = Field(default_factory=dict)


class TrainSummary(BaseModel):
    """DIR/summary.json: the final and the best model's evaluation and where the weights are."""

    model_config = ConfigDict(extra="forbid")

    name: str
    method: str
    dataset: str
    epochs: int
    final: EvalReport
    best: EvalReport | None = None
    best_epoch: int | None = None
    best_metric: float | None = None
    last_checkpoint: str
    best_checkpoint: str | None = None
    seconds: float
    spec: dict[str, Any]
    provenance: dict[str, Any] = Field(default_factory=dict)
    precision: Precision | None = Field(None, description="training precision (runtime.precision, resolved)")
    selection_split: SelectionSplit | None = Field(
        None,
        description="where the best checkpoint's selection metric was measured; 'test' marks numbers "
        "of a checkpoint selected on the test set (None: no metric selection)",
    )
    protocol_id: str | None = Field(
        None, description="the evaluation protocol of `final`/`best` ('custom' for an inline suite)"
    )
    protocol_version: str | None = Field(
        None, description="its version; for 'custom', api_schemas.protocols.custom_protocol_version"
    )
    best_checkpoint_sha256: str | None = Field(None, description="sha256 of the stored best checkpoint")
    last_checkpoint_sha256: str | None = Field(None, description="sha256 of the stored last checkpoint")
