"""The function every Ray Train worker runs: the trainer's own loop, data-parallel, checkpointed to the store.

Each worker builds the same `trainer.loop.TrainingRun` a single process would, with its rank's shard
of the data and batch/N images per step, wraps the models in DDP, and then drives the loop epoch
by epoch. Rank 0 owns everything written: the per-epoch Ray checkpoint (through `ray.train.report`,
which Ray uploads to the run's storage), metrics.jsonl and, at the end, the evaluation and
summary.json. After a worker failure Ray restarts the group and every worker resumes from the last
reported checkpoint (models, optimizer, epoch, RNG, history), losing at most the epochs since.

Just-in-time checkpoints (issue 13), taken between two steps mid-epoch and reported like the
periodic ones (metrics `jit` = 1, `step`):
- a stop request (the driver got SIGTERM: workers/preemption.py): rank 0 reads it at most every
  POLL_S seconds; every rank learns it at the next step (one all-reduce of two flags per step, over
  gloo); all report the checkpoint, rank 0 writes preempted.json, and the train function returns
  with `preempted` = 1 in its last report, which the driver reads;
- a node drain (`ray.train.get_preemption_info()`, asked by all ranks at the same steps, when rank 0's
  poll is due): the checkpoint is reported once per drain and training goes on; Ray Train tears the
  group down at the drain's deadline and restarts it elsewhere from the newest checkpoint.
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
from trainer.loop import CheckpointRequested, TrainingRun
from workers.config import WorkerConfig
from workers.evaluation import sha256_file
from workers.metrics_export import EpochGauges
from workers.preemption import POLL_S, PREEMPTED_FILE, stop_requested
from workers.storage import ArtifactStore, experiment_prefix, open_store

log = logging.getLogger("workers.train")

STATE_FILE = "state.pt"


def _ddp(device: torch.device):
    def wrap(module: nn.Module) -> nn.Module:
        if device.type == "cuda":
            return DistributedDataParallel(module, device_ids=[device.index])
        return DistributedDataParallel(module)

    return wrap


class StepSignals:
    """`TrainingRun.checkpoint_hooks` entry of a Ray Train worker: should the run stop before this step?

    Rank 0 polls the experiment's stop flag every POLL_S seconds; the flags (stop wanted, poll due)
    are all-reduced (MAX) over every rank at every step, so all ranks stop at the same step and call
    `ray.train.get_preemption_info` (a collective) equally often. `kind` says what the last stop
    was for: "stop" (checkpoint and return) or "drain" (checkpoint and go on).
    """

    def __init__(self, experiment_id: str, rank: int, world_size: int, device: torch.device) -> None:
        self.experiment_id, self.rank, self.world_size = experiment_id, rank, world_size
        self.kind: str | None = None
        self.reason: str | None = None
        self._last_poll = time.monotonic()
        self._drains_seen: set[tuple[str, ...]] = set()
        self._group = None
        if world_size > 1 and torch.distributed.is_initialized():
            # a CPU group for two flags a step: no GPU synchronisation on NCCL runs
            cpu = torch.distributed.get_backend() == "gloo"
            self._group = None if cpu else torch.distributed.new_group(backend="gloo")

    def __call__(self, reason: str | None) -> str | None:
        stop = reason is not None  # a local request_checkpoint() stops the run
        due = False
        if self.rank == 0 and time.monotonic() - self._last_poll >= POLL_S:
            due, self._last_poll = True, time.monotonic()
            if not stop and ray.is_initialized():  # Ray Train's local mode has no cluster to ask
                request = stop_requested(self.experiment_id)
                if request is not None:
                    stop, reason = True, str(request.get("reason") or "stop requested")
        if self.world_size > 1 and torch.distributed.is_initialized():
            flags = torch.tensor([int(stop), int(due)])
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self._group)
            stop, due = bool(flags[0]), bool(flags[1])
        if stop:
            self.kind, self.reason = "stop", reason or "stop requested (by rank 0)"
            return self.reason
        if due:
            info = ray.train.get_preemption_info()
            if info is not None:
                nodes = tuple(info.preempted_node_ids)
                if nodes not in self._drains_seen:
                    self._drains_seen.add(nodes)
                    self.kind = "drain"
                    self.reason = (
                        f"node preemption (nodes {', '.join(nodes)}, deadline_ms {info.deadline_ms})"
                    )
                    return self.reason
        return None


def _report_jit(
    run: TrainingRun,
    stop: CheckpointRequested,
    *,
    preempted: bool,
    scratch: Path,
    store: ArtifactStore | None,
    prefix: str,
) -> float:
    """Report the just-in-time checkpoint (rank 0 writes it; every rank reports); its unix time."""
    saved_at = time.time()
    payload_dir = None
    if run.rank == 0:
        payload_dir = scratch / f"jit_{stop.epoch:04d}_{stop.step:06d}"
        payload_dir.mkdir()
        ckpt.save_checkpoint(payload_dir / STATE_FILE, run.checkpoint_payload())
    last = run.history[-1] if run.history else {"epoch": run.epoch, "loss": float("nan")}
    metrics = _epoch_report(last) if run.rank == 0 else {"epoch": float(run.epoch)}
    metrics.update(jit=1.0, step=float(stop.step), preempted=float(preempted), checkpoint_at=saved_at)
    checkpoint = None if payload_dir is None else ray.train.Checkpoint.from_directory(str(payload_dir))
    ray.train.report(metrics, checkpoint=checkpoint)
    if payload_dir is not None:
        for old in payload_dir.iterdir():
            old.unlink()
        payload_dir.rmdir()
    if store is not None:
        event = {
            "event": "checkpoint",
            "kind": "preempted" if preempted else "drain",
            "epoch": run.epoch,
            "step": stop.step,
            "reason": stop.reason,
            "time": saved_at,
        }
        store.append_line(prefix + "events.jsonl", json.dumps(event))
    log.info("just-in-time checkpoint reported: %s", stop)
    return saved_at


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
                    "step": 0 if run.progress is None else run.progress.step,
                    "world_size": world_size,
                    "time": time.time(),
                }
                store.append_line(prefix + "events.jsonl", json.dumps(event))
                log.info(
                    "%s/%s resumed from the checkpoint of epoch %d", cfg.experiment_id, cfg.trial, run.epoch
                )
            elif run.epoch == 0:
                store.put_bytes(prefix + "metrics.jsonl", b"")
        signals = StepSignals(cfg.experiment_id, rank, world_size, device)
        run.checkpoint_hooks.append(signals)
        start = time.perf_counter()
        while run.epoch < spec.optimization.epochs:
            try:
                metrics = run.train_epoch(progress=False)
            except CheckpointRequested as stop:
                preempted = signals.kind != "drain"
                saved_at = _report_jit(
                    run, stop, preempted=preempted, scratch=Path(scratch), store=store, prefix=prefix
                )
                if not preempted:  # a node drain: go on until Ray Train moves the group
                    run.resume_after_checkpoint()
                    continue
                if store is not None:
                    store.put_json(
                        prefix + PREEMPTED_FILE,
                        {
                            "saved_at": saved_at,
                            "checkpoint_at": saved_at,
                            "epoch": stop.epoch,  # completed epochs
                            "step": stop.step,  # the next step of epoch `epoch` (0-based)
                            "reason": stop.reason,
                        },
                    )
                return
            payload_dir = None
            if rank == 0:
                if run.score_epoch(metrics):
                    store.put_file(prefix + "checkpoints/best.pt", run.save(Path(scratch) / "best.pt"))
                metrics.extra["finished_at"] = time.time()  # wall clock: epoch cycle times incl. reporting
                if run.epoch % spec.checkpoint.every_n_epochs == 0 or run.epoch == spec.optimization.epochs:
                    metrics.checkpoint_at = time.time()
                    payload_dir = Path(scratch) / f"epoch_{run.epoch:04d}"
                    payload_dir.mkdir()
                    run.history.append(metrics.model_dump(mode="json"))
                    ckpt.save_checkpoint(payload_dir / STATE_FILE, run.checkpoint_payload())
                else:
                    run.history.append(metrics.model_dump(mode="json"))
                store.append_line(prefix + "metrics.jsonl", metrics.model_dump_json())
                gauges.report(run.history[-1])  # Ray's metrics agent -> Prometheus, Grafana
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
