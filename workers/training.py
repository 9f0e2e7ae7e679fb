"""Driver side of one training run on Ray: build the TorchTrainer from the spec and fit it.

The run's Ray storage is the artifact store itself (pyarrow filesystem with an explicit endpoint),
under experiments/<id>/<trial>/ray, with a stable run name: starting the same experiment and trial
again (a retry after the job died) lets Ray Train restore the run and continue from its last
checkpoint instead of starting over.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from api_schemas import ExperimentSpec, TrainSummary
from workers.config import WorkerConfig
from workers.preemption import PREEMPTED_FILE, Preempted
from workers.settings import StoreSettings, gpu_resource
from workers.storage import ArtifactStore, experiment_prefix
from workers.train_worker import train_loop_per_worker

log = logging.getLogger("workers.training")

RAY_RUN_NAME = "ray"


def cluster_has_gpus() -> bool:
    return ray.is_initialized() and ray.cluster_resources().get(gpu_resource(), 0) > 0


def scaling_config(spec: ExperimentSpec) -> ScalingConfig:
    """Each worker asks for its CPUs and, where GPUs are used, `gpus_per_worker` of the GPU resource
    (LBGAT_GPU_RESOURCE); a custom resource standing for a GPU is held, but the worker runs on CPUs."""
    res = spec.resources
    use_gpu = cluster_has_gpus() if res.use_gpu is None else res.use_gpu
    name = gpu_resource()
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker[name] = res.gpus_per_worker
    return ScalingConfig(
        num_workers=res.num_workers, use_gpu=use_gpu and name == "GPU", resources_per_worker=per_worker
    )


def absolute_paths(spec: ExperimentSpec, base: Path | None = None) -> ExperimentSpec:
    """The spec with its relative file paths (dataset root, teacher and transfer-source checkpoints)
    made absolute against the job's working directory. Ray Train starts each worker in its own
    working directory, where the preset's `data/` would not be found; the job's directory (the
    image's /work on every node) is where a spec's relative paths mean something."""
    base = base or Path.cwd()
    data = spec.model_dump(mode="json")

    def fix(path: str) -> str:
        return path if "://" in path or Path(path).is_absolute() else str(base / path)

    data["dataset"]["root"] = fix(data["dataset"]["root"])
    if "teacher_checkpoints" in data["method"]:
        data["method"]["teacher_checkpoints"] = [fix(p) for p in data["method"]["teacher_checkpoints"]]
    for attack in data["evaluation"]["attacks"]:
        if attack.get("source_checkpoint"):
            attack["source_checkpoint"] = fix(attack["source_checkpoint"])
    return ExperimentSpec.model_validate(data)


def make_trainer(
    spec: ExperimentSpec,
    *,
    experiment_id: str,
    trial: str,
    store: ArtifactStore,
    settings: StoreSettings,
    callbacks: Sequence[Any] = (),
) -> TorchTrainer:
    filesystem, base = store.pyarrow_filesystem()
    config = WorkerConfig(spec=absolute_paths(spec), experiment_id=experiment_id, trial=trial)
    run_config = RunConfig(
        name=RAY_RUN_NAME,
        storage_path=f"{base.rstrip('/')}/{experiment_prefix(experiment_id, trial).rstrip('/')}",
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=spec.resources.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep_last),
        callbacks=list(callbacks) or None,
        # credentials travel as environment variables of the worker processes, not in the config
        worker_runtime_env={"env_vars": settings.as_env()},
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config.model_dump(mode="json"),
        scaling_config=scaling_config(spec),
        run_config=run_config,
    )


class TrainingFailed(RuntimeError):
    pass


def run_training(
    spec: ExperimentSpec, *, experiment_id: str, trial: str, store: ArtifactStore, settings: StoreSettings
) -> TrainSummary:
    """Fit one run on the connected Ray cluster and return the summary its rank 0 wrote to the store."""
    trainer = make_trainer(spec, experiment_id=experiment_id, trial=trial, store=store, settings=settings)
    log.info("training %s/%s on %d worker(s)", experiment_id, trial, spec.resources.num_workers)
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors; keep the reason, drop the wrapper noise
        raise TrainingFailed(f"{experiment_id}/{trial}: training failed: {exc}") from exc
    if (result.metrics or {}).get("preempted"):
        where = f"{store.url}/{experiment_prefix(experiment_id, trial)}{PREEMPTED_FILE}"
        raise Preempted(f"{experiment_id}/{trial}: preempted; just-in-time checkpoint saved ({where})")
    key = experiment_prefix(experiment_id, trial) + "summary.json"
    return TrainSummary.model_validate(store.get_json(key))
