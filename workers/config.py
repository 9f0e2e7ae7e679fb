"""What the driver hands to every Ray Train worker, validated again on the worker's side."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from api_schemas import ExperimentSpec


class WorkerConfig(BaseModel):
    """`train_loop_config` of one TorchTrainer run (one trial of an experiment).

    Store credentials are not in here (the config is visible in the Ray dashboard): workers read
    them from LBGAT_* environment variables set through the run's worker runtime env.
    """

    model_config = ConfigDict(extra="forbid")

    spec: ExperimentSpec
    experiment_id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    trial: str = Field("main", pattern=r"^[A-Za-z0-9_.\-]+$")

    @classmethod
    def from_ray(cls, config: dict[str, Any]) -> WorkerConfig:
        return cls.model_validate(config)
