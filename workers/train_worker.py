"""The function every Ray Train worker runs: the trainer's own loop, data-parallel, checkpointed to the store.

Each worker builds the same `trainer.loop.TrainingRun` a single process would, with its rank's shard
of the data and batch/N images per step, wraps the models in DDP, and then drives the loop epoch
by epoch. Rank 0 owns everything written: the per-epoch Ray checkpoint (through `ray.train.report`,
which Ray uploads to the run's storage), metrics.jsonl and, at the end, the evaluation and
summary.json. After a worker failure Ray restarts the group and every worker resumes from the last
reported checkpoint (models, optimizer, epoch, RNG, history), losing at most the epochs since.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from api_schemas import ExperimentSpec
from api_schemas.protocols import CUSTOM_ID, EvaluationSuite, custom_protocol_version
from trainer import checkpoint as ckpt
from trainer.loop import TrainingRun
from workers.config import WorkerConfig
from workers.evaluation import sha256_file
from workers.metrics_export import EpochGauges
from workers.storage import ArtifactStore, experiment_prefix, open_store

log = logging.getLogger("workers.train")

STATE_FILE = "state.pt"


def _ddp(device: torch.device):
    def wrap(module: nn.Module) -> nn.Module:
        if device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[device.index])
        return DistributedDataParallel(module)

    return wrap


def _resume(run: TrainingRun) -> bool:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as folder:
        payload = ckpt.read_checkpoint(Path(folder) / STATE_FILE, map_location=run.rt.device)
    run.load_payload(payload)
    return True


def _rewrite_metrics(store: ArtifactStore, key: str, history: list[dict[str, Any]]) -> None:
    # After a restart the store may hold lines of epochs that were lost; the checkpoint's history
    # is the truth, so the file is rewritten from it.
    store.put_bytes(key, "".join(json.dumps(h) + "\n" for h in history).encode())


def _epoch_report(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat numeric metrics for Ray/Tune (val dict flattened to val_*; loss also as neg_loss for max-mode)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    for key, value in (metrics.get("val") or {}).items():
        flat[f"val_{key}"] = float(value)
    flat["neg_loss"] = -flat["loss"]
    return flat


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Entry point of each Ray Train worker (`TorchTrainer(train_loop_per_worker=...)`)."""
    cfg = WorkerConfig.from_ray(config)
    spec = cfg.spec
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    prefix = experiment_prefix(cfg.experiment_id, cfg.trial)
    store = open_store() if rank == 0 else None
    gauges = EpochGauges(cfg.experiment_id, cfg.trial) if rank == 0 else None

    with tempfile.TemporaryDirectory(prefix="lbgat-worker-") as scratch:
        run = TrainingRun(spec, out_dir=scratch, device=device, rank=rank, world_size=world_size)
        if world_size > 1:
            run.distribute(
                _ddp(device), sync_batchnorm=spec.resources.sync_batchnorm and device.type == "cuda"
            )
        resumed = _resume(run)
        if store is not None:
            store.put_json(prefix + "spec.json", spec.model_dump(mode="json"))
            if resumed:
                _rewrite_metrics(store, prefix + "metrics.jsonl", run.history)
                event = {
                    "event": "resumed",
                    "epoch": run.epoch,
                    "world_size": world_size,
                    "time": time.time(),
                }
                store.append_line(prefix + "events.jsonl", json.dumps(event))
                log.info(
                    "%s/%s resumed from the checkpoint of epoch %d", cfg.experiment_id, cfg.trial, run.epoch
                )
            elif run.epoch == 0:
                store.put_bytes(prefix + "metrics.jsonl", b"")
        start = time.perf_counter()
        while run.epoch < spec.optimization.epochs:
            metrics = run.train_epoch(progress=False)
            payload_dir = None
            if rank == 0:
                if run.score_epoch(metrics):
                    store.put_file(prefix + "checkpoints/best.pt", run.save(Path(scratch) / "best.pt"))
                metrics.extra["finished_at"] = time.time()  # wall clock: epoch cycle times incl. reporting
                run.history.append(metrics.model_dump(mode="json"))
                store.append_line(prefix + "metrics.jsonl", metrics.model_dump_json())
                gauges.report(run.history[-1])  # Ray's metrics agent -> Prometheus, Grafana
                if run.epoch % spec.checkpoint.every_n_epochs == 0 or run.epoch == spec.optimization.epochs:
                    payload_dir = Path(scratch) / f"epoch_{run.epoch:04d}"
                    payload_dir.mkdir()
                    ckpt.save_checkpoint(payload_dir / STATE_FILE, run.checkpoint_payload())
            else:
                run.history.append(metrics.model_dump(mode="json"))
            checkpoint = (
                None if payload_dir is None else ray.train.Checkpoint.from_directory(str(payload_dir))
            )
            report = (
                _epoch_report(metrics.model_dump(mode="json")) if rank == 0 else {"epoch": float(run.epoch)}
            )
            ray.train.report(report, checkpoint=checkpoint)
            if payload_dir is not None:
                for old in payload_dir.iterdir():
                    old.unlink()
                payload_dir.rmdir()

        if rank == 0:
            _finish(run, store, prefix, Path(scratch), time.perf_counter() - start, cfg)


def training_protocol(spec: ExperimentSpec) -> tuple[str, str]:
    """(protocol id, version) of a run's final evaluation, so that its numbers are a (checkpoint,
    protocol) result: the protocol `evaluation.protocol` pins ('id@version'), else 'custom' with the
    version of the suite that ran (its attacks and n_examples on the threat model; seed 0 and shards
    of 500, what `trainer.evaluation.evaluate` uses without a protocol)."""
    evaluation = spec.evaluation
    if evaluation.protocol is not None:
        protocol_id, _, version = evaluation.protocol.partition("@")
        return protocol_id, version
    # model_construct: a training suite may give AutoAttack / Square a subset of the examples
    # (n_examples), which an evaluation job's suite does not allow; the digest covers it either way
    suite = EvaluationSuite.model_construct(
        threat_model=spec.threat_model, attacks=list(evaluation.attacks), n_examples=evaluation.n_examples
    )
    return CUSTOM_ID, custom_protocol_version(suite)


def _finish(
    run: TrainingRun, store: ArtifactStore, prefix: str, scratch: Path, seconds: float, cfg: WorkerConfig
) -> None:
    """Rank 0 alone: evaluate the final and the best model with the spec's suite; write summary.json."""
    store.put_file(prefix + "checkpoints/last.pt", run.save(scratch / "last.pt"))
    best_key = prefix + "checkpoints/best.pt"
    best_local = scratch / "best.pt"
    if run.best_epoch is not None and not best_local.exists() and store.exists(best_key):
        store.get_file(best_key, best_local)  # saved before a restart, in an earlier scratch folder
    summary = run.final_summary(
        best_local=best_local,
        last_label=f"{store.url}/{prefix}checkpoints/last.pt",
        best_label=f"{store.url}/{best_key}",
        seconds=seconds,
        world_size=run.world_size,
        experiment_id=cfg.experiment_id,
    )
    protocol_id, protocol_version = training_protocol(run.spec)
    summary = summary.model_copy(
        update={
            "protocol_id": protocol_id,
            "protocol_version": protocol_version,
            "last_checkpoint_sha256": sha256_file(scratch / "last.pt"),
            "best_checkpoint_sha256": (
                sha256_file(best_local) if summary.best_checkpoint and best_local.exists() else None
            ),
        }
    )
    store.put_json(prefix + "summary.json", summary.model_dump(mode="json"))
    log.info(
        "%s/%s: summary written to %s",
        cfg.experiment_id,
        cfg.trial,
        store.url + "/" + prefix + "summary.json",
    )
