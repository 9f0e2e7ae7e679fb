"""The one training loop for every method: data, models, attack, loss, optimizer, checkpoints, metrics.

`TrainingRun` owns the state of one run and exposes it in pieces (`train_epoch`, `validate`,
`checkpoint_payload`, `load_payload`) so that the Ray workers can drive the same loop epoch by
epoch; `fit` is the single-process driver used by `lbgat train`.

Just-in-time checkpoints: `request_checkpoint()` (thread-safe: a signal handler, another thread)
asks the run to stop between two steps. `train_epoch` checks before every step (the request flag,
then each of `checkpoint_hooks`, which the Ray workers use to poll their cluster and to agree across
ranks) and raises `CheckpointRequested`; the run's state is then exactly that before the step (the
step index, the epoch's running sums, every RNG state), `checkpoint_payload()` holds it, and a run
that loads it and calls `train_epoch` continues with that step: weights and metrics end bit-identical
to an uninterrupted run's (the loader's batches are a function of seed, epoch, rank and step).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from api_schemas import DatasetSpec, EpochMetrics, EvalReport, ExperimentSpec, TrainSummary
from api_schemas.results import nrr
from trainer import checkpoint as ckpt
from trainer.data import ArrayDataset, DeviceLoader, load_dataset
from trainer.evaluation import accuracy, evaluate, robust_accuracy
from trainer.methods import Method, build_method
from trainer.models import create_model
from trainer.provenance import provenance
from trainer.schedules import learning_rate

log = logging.getLogger("trainer")

#: the just-in-time checkpoint `fit` writes when a checkpoint is requested mid-epoch
INTERRUPTED = "interrupted.pt"


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    bf16: bool
    channels_last: bool
    compile: bool
    #: what training computes in: 'bf16' (autocast), 'tf32' (fp32 tensors, TF32 tensor cores on a
    #: GPU) or 'fp32' (TF32 off); recorded in every summary
    precision: str = "fp32"

    @classmethod
    def resolve(cls, spec: ExperimentSpec, device: str | torch.device | None = None) -> Runtime:
        rt = spec.runtime
        wanted = device or rt.device
        if wanted == "auto":
            wanted = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(wanted)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                "runtime.device: 'cuda' was asked for but no GPU is visible; use 'auto' or 'cpu'"
            )
        on_gpu = dev.type == "cuda"
        if not on_gpu and rt.cpu_threads is not None:
            torch.set_num_threads(rt.cpu_threads)
        precision = rt.precision
        if precision == "auto":
            precision = "bf16" if on_gpu else "fp32"
        elif precision == "tf32" and not on_gpu:
            precision = "fp32"  # no TF32 on CPUs: the same arithmetic as fp32
        if on_gpu:
            # Process-wide flags, set for every run so that one run's choice never leaks into the
            # next: fp32 turns TF32 off (the official codes ran in fp32 on GPUs without TF32), tf32
            # turns it on for convolutions and matmuls, bf16 leaves PyTorch's defaults.
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
            torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        return cls(
            device=dev,
            bf16=precision == "bf16",
            channels_last=on_gpu if rt.channels_last is None else rt.channels_last,
            compile=rt.compile,
            precision=precision,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)


class CheckpointRequested(Exception):
    """Raised by `TrainingRun.train_epoch` between two steps when a checkpoint was asked for.

    The run then stands before step `step` (0-based, within the 0-based epoch `epoch`); its
    `checkpoint_payload()` resumes there. `reason` is what the request said.
    """

    def __init__(self, epoch: int, step: int, reason: str) -> None:
        super().__init__(f"checkpoint requested before step {step} of epoch {epoch + 1}: {reason}")
        self.epoch, self.step, self.reason = epoch, step, reason


@dataclass
class EpochProgress:
    """Where an epoch stopped: the next step and the sums its metrics are made of."""

    epoch: int  # 0-based: the run's completed epochs when it stopped
    step: int  # the next step to run
    loss_sum: torch.Tensor
    correct: dict[str, torch.Tensor]
    seen: int
    seconds: float  # training time of the steps done so far
    rng: dict[str, Any]  # every RNG state at the stop (trainer.checkpoint.rng_state)

    def payload(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "loss_sum": self.loss_sum.detach().cpu(),
            "correct": {k: v.detach().cpu() for k, v in self.correct.items()},
            "seen": self.seen,
            "seconds": self.seconds,
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any], rng: dict[str, Any], device: torch.device) -> EpochProgress:
        return cls(
            epoch=int(data["epoch"]),
            step=int(data["step"]),
            loss_sum=data["loss_sum"].to(device),
            correct={k: v.to(device) for k, v in data["correct"].items()},
            seen=int(data["seen"]),
            seconds=float(data["seconds"]),
            rng=rng,
        )


@dataclass
class Datasets:
    train: ArrayDataset
    val: ArrayDataset | None
    test: ArrayDataset


def _split_args(ds: DatasetSpec) -> dict[str, Any]:
    # Splits made in code (digits train/test, the held-out validation images) are fixed, not drawn
    # from spec.seed: runs with different seeds must be scored on the same test images.
    return {"root": ds.root, "download": ds.download, "resize_to": ds.resize_to, "seed": 0}


def load_test_split(ds: DatasetSpec) -> ArrayDataset:
    """The test split a spec's dataset section describes (dataset.test_limit applied; CPU tensors):
    what training's final evaluation and evaluation jobs score."""
    test = load_dataset(ds.name, train=False, n_synthetic=max(ds.synthetic_size // 4, 16), **_split_args(ds))
    if ds.test_limit is not None:
        test = test.subset(torch.arange(min(ds.test_limit, len(test))))
    return test


def load_datasets(spec: ExperimentSpec) -> Datasets:
    """Training, held-out validation and test sets as the spec describes them (CPU tensors)."""
    ds = spec.dataset
    train = load_dataset(ds.name, train=True, n_synthetic=ds.synthetic_size, **_split_args(ds))
    test = load_test_split(ds)
    if ds.train_limit is not None:
        train = train.subset(torch.arange(min(ds.train_limit, len(train))))
    val = None
    if ds.val_size:
        if ds.val_size >= len(train):
            raise ValueError(f"dataset.val_size: {ds.val_size} leaves no training images out of {len(train)}")
        train, val = train.split(ds.val_size, seed=0)
    return Datasets(train=train, val=val, test=test)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _set_mode(module: nn.Module | None, mode: str) -> None:
    if module is not None:
        module.train(mode == "train")


class TrainingRun:
    """State of one training run: models, optimizer, data, epoch counter, history and best model."""

    def __init__(
        self,
        spec: ExperimentSpec,
        *,
        out_dir: str | Path | None = None,
        device: str | torch.device | None = None,
        datasets: Datasets | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.spec = spec
        self.out_dir = Path(out_dir) if out_dir is not None else spec.output_dir()
        self.rt = Runtime.resolve(spec, device)
        self.rank, self.world_size = rank, world_size
        seed_everything(spec.seed, spec.runtime.deterministic)

        self.data = datasets or load_datasets(spec)
        train = self.data.train
        self.num_classes = train.num_classes
        self.in_channels = train.images.shape[1]
        ds = spec.dataset
        if spec.optimization.batch_size % world_size:
            raise ValueError(
                f"optimization.batch_size: the global batch {spec.optimization.batch_size} must divide "
                f"evenly among {world_size} workers"
            )
        self.method: Method = build_method(spec.method, spec.threat_model)
        self.method.setup(spec)
        self.loader = DeviceLoader(
            train,
            batch_size=spec.optimization.batch_size // world_size,
            device=self.rt.device,
            shuffle=True,
            augment=ds.augment,
            crop_padding=ds.crop_padding,
            padding_mode=ds.padding_mode,
            flip=ds.flip,
            seed=spec.seed,
            rank=rank,
            world_size=world_size,
            two_views=self.method.two_views,
            channels_last=self.rt.channels_last,
        )

        memory_format = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        ref = spec.model.robust
        self.robust = create_model(
            ref.name, num_classes=self.num_classes, in_channels=self.in_channels, **ref.kwargs()
        )
        self.robust = self.robust.to(self.rt.device, memory_format=memory_format)
        teacher = self.method.build_teacher(spec, self.num_classes, self.in_channels)
        self.teacher = None if teacher is None else teacher.to(self.rt.device, memory_format=memory_format)
        self.optimizer = self._make_optimizer()
        # A method's own auxiliary network (CAT's mask network g_phi) with its own optimizer.
        auxiliary = self.method.build_auxiliary(spec, self.in_channels)
        self.auxiliary = (
            None if auxiliary is None else auxiliary.to(self.rt.device, memory_format=memory_format)
        )
        self.auxiliary_optimizer = (
            None
            if self.auxiliary is None
            else self._build_optimizer([{"params": list(self.auxiliary.parameters())}])
        )
        aux_lr = self.method.auxiliary_lr()
        self._auxiliary_lr_scale = 1.0 if aux_lr is None else aux_lr / spec.optimization.lr
        # What the step runs. The plain modules own the weights (checkpoints, optimizer); the loss
        # forwards go through robust_fn/teacher_fn (compiled and, on Ray, DDP-wrapped), the attack
        # through attack_fn, never DDP: an input-gradient pass must not start a gradient all-reduce.
        self.robust_fn: nn.Module = self._compiled(self.robust)
        self.attack_fn: nn.Module = self.robust_fn
        self.teacher_fn: nn.Module | None = None if self.teacher is None else self._compiled(self.teacher)
        self.auxiliary_fn: nn.Module | None = (
            None if self.auxiliary is None else self._compiled(self.auxiliary)
        )
        self._averaged_buffers: set[str] = set()
        self.averaged: nn.Module | None = self._make_average()

        self.epoch = 0  # completed epochs
        self.history: list[dict[str, Any]] = []
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        #: the epoch in progress when training stopped for a checkpoint (None between epochs)
        self.progress: EpochProgress | None = None
        #: called before every step with the pending request's reason (or None); each returns the
        #: reason to checkpoint for, or None. Workers poll their cluster and agree across ranks here.
        self.checkpoint_hooks: list[Callable[[str | None], str | None]] = []
        self._request_lock = threading.Lock()
        self._requested: str | None = None

    # ------------------------------------------------------------------ construction

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # One optimizer over both models, as Algorithm 1 and the official script (two param groups).
        groups = [{"params": list(self.robust.parameters())}]
        if self.teacher is not None and self.method.trains_teacher:
            groups.append({"params": list(self.teacher.parameters())})
        return self._build_optimizer(groups)

    def _build_optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        opt = self.spec.optimization
        if opt.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=opt.nesterov
            )
        return torch.optim.Adam(groups, lr=opt.lr, weight_decay=opt.weight_decay)

    def _make_average(self) -> nn.Module | None:
        """The EMA copy of the robust model (optimization.weight_averaging), or None when off.

        A separate plain module (never compiled, never DDP-wrapped, always in eval mode, no
        gradients) that starts equal to the robust model; `_update_average` moves it after every
        optimizer step.
        """
        if self.spec.optimization.weight_averaging is None:
            return None
        ref = self.spec.model.robust
        averaged = create_model(
            ref.name, num_classes=self.num_classes, in_channels=self.in_channels, **ref.kwargs()
        )
        memory_format = torch.channels_last if self.rt.channels_last else torch.contiguous_format
        averaged = averaged.to(self.rt.device, memory_format=memory_format)
        averaged.load_state_dict(self.robust.state_dict())
        self._averaged_buffers = {name for name, _ in averaged.named_buffers()}
        return averaged.requires_grad_(False).eval()

    @torch.no_grad()
    def _update_average(self) -> None:
        """w_avg <- decay * w_avg + (1 - decay) * w for floating state; integer buffers are copied.

        Keys are matched by name against the robust model's state dict, so the average keeps
        following the model after `distribute` (SyncBatchNorm keeps the names and the tensors).
        Before `start_epoch` the decay is 0: the average is an exact copy of the model.
        """
        assert self.averaged is not None
        wa = self.spec.optimization.weight_averaging
        assert wa is not None
        decay = wa.decay if self.epoch >= wa.start_epoch else 0.0
        current = self.robust.state_dict()
        averaged_float, current_float = [], []
        for key, avg in self.averaged.state_dict().items():
            value = current[key]
            copy = not avg.is_floating_point() or (wa.buffers == "copy" and key in self._averaged_buffers)
            if copy:
                avg.copy_(value)
            else:
                averaged_float.append(avg)
                current_float.append(value.to(avg.dtype))
        torch._foreach_mul_(averaged_float, decay)
        torch._foreach_add_(averaged_float, current_float, alpha=1.0 - decay)

    def weights(self, which: str) -> nn.Module:
        """The robust model ('model') or its moving average ('averaged')."""
        if which == "averaged":
            if self.averaged is None:
                raise ValueError("weights: 'averaged' needs optimization.weight_averaging")
            return self.averaged
        return self.robust

    def _compiled(self, module: nn.Module) -> nn.Module:
        return torch.compile(module) if self.rt.compile else module

    def distribute(self, wrap: Callable[[nn.Module], nn.Module], *, sync_batchnorm: bool = False) -> None:
        """Wrap the trained models for data-parallel training (e.g. in DistributedDataParallel).

        With sync_batchnorm, BatchNorm layers are converted first so that N workers compute the
        batch statistics of the whole global batch, as one GPU does; the converted layers keep the
        same parameter tensors, so the optimizer needs no rebuild.
        """
        if sync_batchnorm:
            self.robust = nn.SyncBatchNorm.convert_sync_batchnorm(self.robust)
            if self.teacher is not None and self.method.trains_teacher:
                self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.attack_fn = self._compiled(self.robust)
        self.robust_fn = self._compiled(wrap(self.robust))
        if self.teacher is not None:
            trained = self.method.trains_teacher
            self.teacher_fn = self._compiled(wrap(self.teacher) if trained else self.teacher)
        if self.auxiliary is not None:
            if sync_batchnorm:
                self.auxiliary = nn.SyncBatchNorm.convert_sync_batchnorm(self.auxiliary)
            self.auxiliary_fn = self._compiled(wrap(self.auxiliary))

    # ------------------------------------------------------------------ training

    def request_checkpoint(self, reason: str = "requested") -> None:
        """Ask the run to stop for a checkpoint before its next step (thread-safe; returns at once).

        `train_epoch` then raises `CheckpointRequested`; one request gives one stop."""
        with self._request_lock:
            self._requested = reason

    def _checkpoint_reason(self) -> str | None:
        with self._request_lock:
            reason, self._requested = self._requested, None
        for hook in self.checkpoint_hooks:
            reason = hook(reason)
        return reason

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.auxiliary_optimizer is not None:
            for group in self.auxiliary_optimizer.param_groups:
                group["lr"] = lr * self._auxiliary_lr_scale

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step; returns the (detached) loss and per-batch correct counts."""
        method = self.method
        train_mode_attack = method.attack_loss is not None and method.attack_model_mode() == "train"
        with self.rt.autocast():
            x_adv = None
            if method.attack_loss is not None:
                _set_mode(self.robust, method.attack_model_mode())
                _set_mode(self.teacher, method.teacher_mode_during_attack)
                x_adv = method.generate(self.attack_fn, x, y)
            self.robust.train()
            _set_mode(self.teacher, "train" if method.trains_teacher else "eval")
            _set_mode(self.auxiliary, "train")
            extra = {} if self.auxiliary_fn is None else {"auxiliary": self.auxiliary_fn}
            if method.uses_averaged:  # ReBAT, RAAT#: the weight average takes part in the loss
                _set_mode(self.averaged, method.averaged_mode())
                extra["averaged"] = self.averaged
            out = method.compute_loss(self.robust_fn, self.teacher_fn, x, x_adv, y, **extra)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        if self.auxiliary is not None:
            self._auxiliary_step(out, y)
        logits_clean = out.logits_nat
        if train_mode_attack:
            # Rice et al.'s and CAT's loops forward x once more after the update(s), in training
            # mode, to log training accuracy; that forward moves BatchNorm's running averages, so it
            # is part of what they trained (Method.attack_model_mode). Its accuracy is the one logged.
            self.robust.train()
            x_post, _ = method.post_step_view(x, y)
            with torch.no_grad(), self.rt.autocast():
                logits_clean = self.attack_fn(x_post)
        if self.averaged is not None:
            self._update_average()
            self.averaged.eval()  # after a method ran it in training mode (averaged_mode)
        counts = {}
        with torch.no_grad():
            for key, logits in (
                ("adv", out.logits_adv),
                ("clean", logits_clean),
                ("teacher", out.logits_teacher),
            ):
                if logits is not None:
                    # a method may report the first view of a two-view batch only (RAAT#): counted
                    # on that view's labels, scaled to the batch
                    n = logits.shape[0]
                    counts[key] = (logits.argmax(1) == y[:n]).sum() * (y.shape[0] // n)
        return out.loss.detach(), counts

    def _auxiliary_step(self, out: Any, y: torch.Tensor) -> None:
        """Second update of the step (CAT: phi by Eq. 14 after theta by Eq. 13), by its own optimizer.

        The robust model runs undistributed (attack_fn): this backward fills the auxiliary
        network's gradients only (`inputs=`), so a DDP-wrapped robust model must not expect one.
        """
        assert self.auxiliary is not None and self.auxiliary_optimizer is not None
        _set_mode(self.robust, self.method.robust_mode_during_auxiliary)
        with self.rt.autocast():
            loss = self.method.auxiliary_loss(self.attack_fn, out, y)
        self.auxiliary_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.auxiliary.parameters()))
        self.auxiliary_optimizer.step()

    def train_epoch(self, *, progress: bool = False) -> EpochMetrics:
        """Train one epoch (the next one, or the rest of the one `progress` stopped in) and return
        its metrics; does not checkpoint. Raises `CheckpointRequested` between two steps when a
        checkpoint was asked for (`request_checkpoint`, `checkpoint_hooks`)."""
        epoch = self.epoch
        self.loader.set_epoch(epoch)
        self.method.set_epoch(epoch)
        steps = len(self.loader)
        resumed, self.progress = self.progress, None
        if resumed is not None and resumed.epoch != epoch:
            raise ckpt.CheckpointError(f"epoch progress of epoch {resumed.epoch} in epoch {epoch}")
        first = 0 if resumed is None else resumed.step
        loss_sum = torch.zeros((), device=self.rt.device) if resumed is None else resumed.loss_sum
        correct: dict[str, torch.Tensor] = {} if resumed is None else dict(resumed.correct)
        seen = 0 if resumed is None else resumed.seen
        seconds_before = 0.0 if resumed is None else resumed.seconds
        start = time.perf_counter()
        bar = _progress(
            steps, f"epoch {epoch + 1}/{self.spec.optimization.epochs}", progress and self.rank == 0
        )
        if bar is not None and first:
            bar.update(first)
        for step, batch in enumerate(self.loader.batches(first), start=first):
            reason = self._checkpoint_reason()
            if reason is not None:
                if bar is not None:
                    bar.close()
                self.progress = EpochProgress(
                    epoch=epoch,
                    step=step,
                    loss_sum=loss_sum,
                    correct=correct,
                    seen=seen,
                    seconds=seconds_before + time.perf_counter() - start,
                    rng=ckpt.rng_state(),
                )
                raise CheckpointRequested(epoch, step, reason)
            x, y = stack_views(batch)
            lr = learning_rate(self.spec.optimization, epoch, step, steps)
            self._set_lr(lr)
            loss, counts = self.train_step(x, y)
            loss_sum += loss.float() * y.shape[0]
            for key, value in counts.items():
                correct[key] = correct.get(key, 0) + value
            seen += y.shape[0]
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == steps - 1:
                    elapsed = time.perf_counter() - start
                    shown = "adv" if "adv" in correct else "clean"
                    acc = correct[shown].item() / seen if shown in correct else float("nan")
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}",
                        **{f"{shown}_acc": f"{acc:.3f}"},
                        img_s=f"{seen / elapsed:.0f}",
                    )
        if self.rt.device.type == "cuda":
            torch.cuda.synchronize(self.rt.device)
        seconds = seconds_before + time.perf_counter() - start
        if bar is not None:
            bar.close()
        self.epoch += 1
        acc = {key: value.item() / max(seen, 1) for key, value in correct.items()}
        return EpochMetrics(
            epoch=self.epoch,
            lr=learning_rate(self.spec.optimization, epoch, 0, steps),
            loss=loss_sum.item() / max(seen, 1),
            train_adv_accuracy=acc.get("adv"),
            train_clean_accuracy=acc.get("clean"),
            teacher_accuracy=acc.get("teacher"),
            # images, not examples: a two-view method trains on 2 examples per image
            images_per_second=seen / (2 if self.method.two_views else 1) / max(seconds, 1e-9),
            seconds=seconds,
        )

    def test_clean_accuracy(self, weights: str = "model") -> float:
        return accuracy(
            self.weights(weights),
            self.data.test,
            batch_size=self.spec.evaluation.batch_size,
            device=self.rt.device,
        )

    @property
    def selection_data(self) -> ArrayDataset | None:
        """The images `validate` scores: the held-out split, or the test set (selection.split: test)."""
        return self.data.test if self.spec.selection.split == "test" else self.data.val

    def validate(self) -> dict[str, float]:
        """Clean and PGD accuracy on the selection split, the numbers best-checkpoint selection uses."""
        data = self.selection_data
        assert data is not None
        sel = self.spec.selection
        model = self.weights(self.spec.selected_weights())
        clean = accuracy(model, data, batch_size=self.spec.evaluation.batch_size, device=self.rt.device)
        pgd_acc = robust_accuracy(
            model,
            data,
            sel.attack,
            self.spec.threat_model,
            batch_size=self.spec.evaluation.batch_size,
            device=self.rt.device,
        )
        return {"clean_acc": clean, "pgd_acc": pgd_acc, "nrr": nrr(clean, pgd_acc)}

    def score_epoch(self, metrics: EpochMetrics) -> bool:
        """After an epoch: test accuracy, validation on the selection split, best-model bookkeeping.

        Returns True when this epoch is the new best by spec.selection.metric, or the fixed
        selection.epoch (the caller saves it).
        """
        spec = self.spec
        metrics.test_clean_accuracy = self.test_clean_accuracy()
        if self.averaged is not None:
            metrics.extra["test_clean_accuracy_averaged"] = self.test_clean_accuracy("averaged")
        chosen = spec.selection.epoch is not None and self.epoch == spec.selection.epoch
        if chosen:  # a fixed epoch's checkpoint, as LBGAT's evaluation script reports
            self.best_epoch = self.epoch
        last = self.epoch == spec.optimization.epochs
        if self.selection_data is None or not (self.epoch % spec.selection.every_n_epochs == 0 or last):
            return chosen
        metrics.val = self.validate()
        metrics.val_split = spec.selection.split
        if spec.selection.metric is None:
            return chosen
        value = _selection_value(metrics.val, spec.selection.metric)
        if self.best_metric is not None and value <= self.best_metric:
            return False
        self.best_metric, self.best_epoch = value, self.epoch
        return True

    # ------------------------------------------------------------------ checkpoints

    def checkpoint_payload(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "epoch": self.epoch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "robust": self.robust.state_dict(),
            "teacher": None if self.teacher is None else self.teacher.state_dict(),
            # the key `checkpoint.load_model(weights="ema")` reads
            "robust_ema": None if self.averaged is None else self.averaged.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "auxiliary": None if self.auxiliary is None else self.auxiliary.state_dict(),
            "auxiliary_optimizer": (
                None if self.auxiliary_optimizer is None else self.auxiliary_optimizer.state_dict()
            ),
            # mid-epoch: the RNG states at the stop, and where the epoch stands
            "rng": ckpt.rng_state() if self.progress is None else self.progress.rng,
            "epoch_progress": None if self.progress is None else self.progress.payload(),
            "history": self.history,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "precision": self.rt.precision,
            "provenance": provenance(self.rt.device),
        }

    def load_payload(self, payload: dict[str, Any]) -> None:
        """Restore a checkpoint written by `checkpoint_payload` so training continues exactly."""
        saved = payload["spec"]
        if saved.get("method") != self.spec.method.model_dump(mode="json"):
            raise ckpt.CheckpointError(
                "the checkpoint was trained with a different method spec; refusing to resume"
            )
        self.robust.load_state_dict(payload["robust"])
        if self.teacher is not None and payload.get("teacher") is not None and self.method.trains_teacher:
            self.teacher.load_state_dict(payload["teacher"])
        if self.averaged is not None:
            if payload.get("robust_ema") is None:
                raise ckpt.CheckpointError(
                    "the checkpoint holds no averaged weights (trained without "
                    "optimization.weight_averaging); refusing to resume with weight averaging on"
                )
            self.averaged.load_state_dict(payload["robust_ema"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.auxiliary is not None:
            if payload.get("auxiliary") is None or payload.get("auxiliary_optimizer") is None:
                raise ckpt.CheckpointError(
                    f"the checkpoint has no state for {self.spec.method.name}'s auxiliary network; cannot resume"
                )
            self.auxiliary.load_state_dict(payload["auxiliary"])
            assert self.auxiliary_optimizer is not None
            self.auxiliary_optimizer.load_state_dict(payload["auxiliary_optimizer"])
        self.epoch = payload["epoch"]
        self.history = list(payload.get("history", []))
        self.best_metric = payload.get("best_metric")
        self.best_epoch = payload.get("best_epoch")
        ckpt.set_rng_state(payload["rng"])
        progress = payload.get("epoch_progress")
        self.progress = (
            None if progress is None else EpochProgress.from_payload(progress, payload["rng"], self.rt.device)
        )

    def resume_after_checkpoint(self) -> None:
        """Go on training after a just-in-time checkpoint in this process (not a new one): the RNG
        states are set back to the stop's, so the steps that follow are those a resumed run runs."""
        if self.progress is not None:
            ckpt.set_rng_state(self.progress.rng)

    def save(self, path: Path) -> Path:
        return ckpt.save_checkpoint(path, self.checkpoint_payload())

    # ------------------------------------------------------------------ driver

    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint furthest along: periodic ones, last.pt, and a just-in-time one
        (`interrupted.pt`, ordered by its step within the epoch it stopped in)."""
        candidates = sorted(self.checkpoint_dir.glob("epoch_*.pt"))
        for name in ("last.pt", INTERRUPTED):
            if (self.checkpoint_dir / name).exists():
                candidates.append(self.checkpoint_dir / name)
        if not candidates:
            return None

        def position(path: Path) -> tuple[int, int]:
            payload = ckpt.read_checkpoint(path)
            progress = payload.get("epoch_progress")
            return payload["epoch"], -1 if progress is None else progress["step"]

        return max(candidates, key=position)

    def _prune(self) -> None:
        keep = self.spec.checkpoint.keep_last
        if keep is None:
            return
        for old in sorted(self.checkpoint_dir.glob("epoch_*.pt"))[:-keep]:
            old.unlink()

    def fit(
        self,
        *,
        resume: str | Path | None = None,
        on_epoch_end: Iterable[Callable[[EpochMetrics, TrainingRun], None]] = (),
        evaluate_at_end: bool = True,
    ) -> TrainSummary:
        """Train to spec.optimization.epochs, checkpointing and logging; evaluate; write summary.json."""
        spec = self.spec
        start = time.perf_counter()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "spec.json").write_text(spec.model_dump_json(indent=2))
        if resume is not None:
            path = self.latest_checkpoint() if str(resume) == "auto" else Path(resume)
            if path is not None:
                self.load_payload(ckpt.read_checkpoint(path, map_location=self.rt.device))
                log.info("resumed from %s at epoch %d", path, self.epoch)
        metrics_path = self.out_dir / "metrics.jsonl"
        if self.epoch == 0:
            metrics_path.write_text("")
        else:  # keep the lines of the epochs the checkpoint covers, drop those of lost epochs
            metrics_path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        log.info(
            "training %s (%s) on %s for %d epochs",
            spec.name,
            spec.method.name,
            self.rt.device,
            spec.optimization.epochs,
        )

        while self.epoch < spec.optimization.epochs:
            try:
                metrics = self.train_epoch(progress=spec.runtime.progress)
            except CheckpointRequested as stop:
                path = self.save(self.checkpoint_dir / INTERRUPTED)
                log.info("%s; saved %s (resume with resume='auto' or this path)", stop, path)
                raise
            if self.score_epoch(metrics):
                self.save(self.checkpoint_dir / "best.pt")
            final = self.epoch == spec.optimization.epochs
            periodic = self.epoch % spec.checkpoint.every_n_epochs == 0 and not final
            if periodic or final:  # final: last.pt, saved below
                metrics.checkpoint_at = time.time()
            self.history.append(metrics.model_dump(mode="json"))
            if periodic:
                self.save(self.checkpoint_dir / f"epoch_{self.epoch:04d}.pt")
                self._prune()
            with metrics_path.open("a") as f:
                f.write(metrics.model_dump_json() + "\n")
            log.info("epoch %d: %s", self.epoch, _brief(metrics))
            for callback in on_epoch_end:
                callback(metrics, self)
        last = self.save(self.checkpoint_dir / "last.pt")
        (self.checkpoint_dir / INTERRUPTED).unlink(missing_ok=True)

        best = self.checkpoint_dir / "best.pt"
        summary = self.final_summary(
            best_local=best,
            last_label=str(last),
            best_label=str(best),
            seconds=time.perf_counter() - start,
            evaluate=evaluate_at_end,
        )
        (self.out_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
        return summary

    def final_summary(
        self,
        *,
        best_local: Path | None,
        last_label: str,
        best_label: str | None,
        seconds: float,
        evaluate: bool = True,
        **provenance_extra: Any,
    ) -> TrainSummary:
        """Evaluate the final model and the best checkpoint (at `best_local`) with the spec's suite.

        The labels say where the checkpoints live for readers of the summary (a local path, or a
        store URL on Ray); `evaluate=False` records clean test accuracy only.
        """
        spec = self.spec
        weights = spec.evaluated_weights()
        if evaluate:
            final = self.evaluate_checkpoint(
                self.weights(weights), checkpoint=last_label, epoch=self.epoch, weights=weights
            )
        else:
            final = EvalReport(
                clean_accuracy=self.test_clean_accuracy(weights),
                n_examples=len(self.data.test),
                weights=weights,
            )
        selection_split = spec.selection.split if spec.selection.metric is not None else None
        final = final.model_copy(update={"training_precision": self.rt.precision})
        best_report = None
        has_best = self.best_epoch is not None
        if (
            evaluate
            and spec.evaluation.on_best
            and has_best
            and best_local is not None
            and best_local.exists()
        ):
            best_model = ckpt.load_model(
                best_local, weights="ema" if weights == "averaged" else "model", device=self.rt.device
            )
            best_report = self.evaluate_checkpoint(
                best_model, checkpoint=best_label or str(best_local), epoch=self.best_epoch, weights=weights
            ).model_copy(update={"training_precision": self.rt.precision, "selection_split": selection_split})
        return TrainSummary(
            name=spec.name,
            method=spec.method.name,
            dataset=spec.dataset.name,
            epochs=self.epoch,
            final=final,
            best=best_report,
            best_epoch=self.best_epoch,
            best_metric=self.best_metric,
            last_checkpoint=last_label,
            best_checkpoint=best_label if has_best else None,
            seconds=seconds,
            spec=spec.model_dump(mode="json"),
            provenance={**provenance(self.rt.device), **provenance_extra},
            precision=self.rt.precision,
            selection_split=selection_split,
        )

    def evaluate_checkpoint(
        self, model: nn.Module, *, checkpoint: str, epoch: int, weights: str = "model"
    ) -> EvalReport:
        report = evaluate(
            model,
            self.data.test,
            self.spec.evaluation,
            self.spec.threat_model,
            device=self.rt.device,
            progress=self.spec.runtime.progress,
        )
        return report.model_copy(update={"checkpoint": checkpoint, "epoch": epoch, "weights": weights})


def stack_views(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), or for a two-view loader (x1, x2, y) -> (cat[x1, x2], cat[y, y]): the layout
    two-view methods expect (x[:B] and x[B:] are two augmentations of the same B images)."""
    if len(batch) == 2:
        return batch[0], batch[1]
    x1, x2, y = batch
    return torch.cat([x1, x2]), torch.cat([y, y])


def _selection_value(val: dict[str, float], metric: str) -> float:
    """The number best-checkpoint selection maximises; 'clean_plus_pgd' is CAT's criterion (App. C)."""
    if metric == "clean_plus_pgd":
        return val["clean_acc"] + val["pgd_acc"]
    return val[metric]


def _brief(m: EpochMetrics) -> str:
    parts = [f"loss {m.loss:.4f}", f"lr {m.lr:.4g}", f"{m.images_per_second:.0f} img/s"]
    for label, value in (
        ("train adv", m.train_adv_accuracy),
        ("train clean", m.train_clean_accuracy),
        ("teacher", m.teacher_accuracy),
        ("test clean", m.test_clean_accuracy),
    ):
        if value is not None:
            parts.append(f"{label} {value:.3f}")
    if m.val:
        parts.append("val " + " ".join(f"{k} {v:.3f}" for k, v in m.val.items()))
    return ", ".join(parts)


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train(
    spec: ExperimentSpec,
    *,
    out_dir: str | Path | None = None,
    resume: str | Path | None = None,
    device: str | None = None,
) -> TrainSummary:
    """Train and evaluate one spec in this process (what `lbgat train` does)."""
    return TrainingRun(spec, out_dir=out_dir, device=device).fit(resume=resume)
