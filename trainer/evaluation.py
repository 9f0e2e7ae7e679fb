"""The evaluation: clean accuracy, FGSM, PGD-k (CE/CW/KL), AutoAttack, Square and black-box transfer.

One implementation, per example: `evaluate_records` attacks a slice of a split (a shard) with a list
of resolved attacks and returns `ExampleRecords`: for every example its label, whether the clean
input is classified correctly, and for every attack (a column, in the suite's order) 1 (still
correct under the attack), 0 (broken) or -1 (not attacked: skipped), optionally the adversarial
images. Everything else is a reduction of such records: `evaluate` (training's final evaluation and
`lbgat eval`) runs the suite shard by shard and reduces the records to an `EvalReport`; evaluation
jobs (workers/evaluation.py) run the shards on Ray workers, store the records and summarise them
with `api_schemas.evaluations.summarize`.

Conventions of the records:
- An example counts as robust to an attack only when it is classified correctly both clean and
  under the attack. Attacks run on the clean-correct examples only (as AutoAttack does); a
  misclassified example gets 0 in every column that was not skipped.
- `skip[i, j]` keeps attack j off example i (-1); columns from `incremental_from` on run only on the
  examples still robust to every earlier attack (AutoAttack's own cascade), so an attack added to an
  existing evaluation costs only the examples it can still change.

Determinism: each column's randomness comes from seeds derived from (seed, shard, column)
(`shard_seed`), never from the global generator, so the same shard gives the same records on any
worker and in any order. PGD's random starts of a whole shard are drawn at once on the CPU, so an
example's start depends on neither the batch it is attacked in, nor the examples skipped around it,
nor the device. AutoAttack and Square seed pyautoattack with the derived seed inside `fork_rng`, so
the caller's random stream is left alone; their examples are attacked in batches of `batch_size`
(AutoAttack draws its random starts per batch), so their records are fixed by the shard and the
batch size.

Evaluation always runs in fp32 (no autocast, TF32 off) with the model in eval mode (the modes are
restored afterwards): a reduced-precision or training-mode forward can mask gradients and overstate
robustness.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from api_schemas import (
    AttackResult,
    AutoAttackSpec,
    EvalReport,
    EvaluationSpec,
    FGSMAttackSpec,
    PGDAttackSpec,
    SquareAttackSpec,
    ThreatModel,
    TransferAttackSpec,
)
from api_schemas.evaluations import broken_by
from api_schemas.protocols import EvaluationSuite
from api_schemas.results import nrr
from trainer import attacks
from trainer.data import ArrayDataset, DeviceLoader, derive_seed

log = logging.getLogger("trainer.evaluation")

_AA_NORMS = {"linf": "Linf", "l2": "L2"}

ROBUST, BROKEN, SKIPPED = 1, 0, -1
#: examples per shard when a suite names none (EvaluationSuite's default)
DEFAULT_SHARD_SIZE = 500

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "ExampleRecords",
    "accuracy",
    "eval_mode",
    "evaluate",
    "evaluate_records",
    "resolve_attacks",
    "robust_accuracy",
    "shard_seed",
]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextmanager
def fp32(device: torch.device) -> Iterator[None]:
    """No autocast, and TF32 off on GPUs (PyTorch lets cuDNN use TF32 by default); restored after."""
    flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cuda":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.autocast(device_type=device.type, enabled=False):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _batches(dataset: ArrayDataset, batch_size: int, device: torch.device | str) -> DeviceLoader:
    return DeviceLoader(dataset, batch_size=batch_size, device=device, shuffle=False, augment=False)


def _first(dataset: ArrayDataset, n: int | None) -> ArrayDataset:
    return dataset if n is None or n >= len(dataset) else dataset.subset(torch.arange(n))


@torch.no_grad()
def accuracy(
    model: nn.Module, dataset: ArrayDataset, *, batch_size: int = 256, device: torch.device | str = "cpu"
) -> float:
    """Clean top-1 accuracy in eval mode."""
    correct = torch.zeros((), dtype=torch.long, device=device)
    with eval_mode(model):
        for x, y in _batches(dataset, batch_size, device):
            correct += (model(x).argmax(1) == y).sum()
    return correct.item() / max(len(dataset), 1)


def _pgd_kwargs(attack: PGDAttackSpec | TransferAttackSpec, threat: ThreatModel) -> dict[str, Any]:
    kwargs = {
        "eps": attack.eps if attack.eps is not None else threat.eps,
        "norm": attack.norm or threat.norm,
        "step_size": attack.step_size if attack.step_size is not None else threat.step_size,
        "steps": attack.steps,
        "loss": attack.loss,
        "random_start": attack.random_start,
        # advertorch's l_2 PGD where the attack or the threat model asks for it (RAAT's l_2 tables)
        "l2_variant": attack.l2_variant or threat.l2_variant,
    }
    if isinstance(attack, PGDAttackSpec):
        kwargs["kappa"] = attack.kappa
    return kwargs


def robust_accuracy(
    model: nn.Module,
    dataset: ArrayDataset,
    attack: PGDAttackSpec,
    threat: ThreatModel,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy under one PGD attack (best-checkpoint selection during training: the run's own
    random stream draws the starts, as it always has, so resumed runs select as uninterrupted ones)."""
    kwargs = _pgd_kwargs(attack, threat)
    correct = 0
    with eval_mode(model):
        for x, y in _batches(dataset, batch_size, device):
            x_adv = attacks.pgd(model, x, y, **kwargs)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == y).sum().item()
    return correct / max(len(dataset), 1)


def resolve_attacks(attack_specs: Sequence[Any], threat: ThreatModel) -> list[Any]:
    """The attacks with eps, norm (and PGD's step size and l_2 variant) taken from `threat` where
    unset: `EvaluationSuite.resolved_attacks`, the one definition, applied to a training spec's list."""
    suite = EvaluationSuite.model_construct(threat_model=threat, attacks=list(attack_specs))
    return suite.resolved_attacks()


def shard_seed(seed: int, shard: int, column: int) -> int:
    """The seed of attack `column` on shard `shard` of an evaluation seeded with `seed`."""
    return derive_seed(seed, shard, column)


# ------------------------------------------------------------------------------------------- records


@dataclass(eq=False)
class ExampleRecords:
    """Per-example results of one slice of a split; columns of `robust` are `attacks`, in order.

    index: int64 [n] positions in the split; label: int64 [n]; clean: bool [n]; robust: int8 [n, k]
    in {1, 0, -1}; x_adv: float32 [n, C, H, W] or None (per example the adversarial input of the
    first attack that broke it, else of the last attack that ran on it, else the clean input);
    params: what each attack ran with; seconds: each attack's wall time (0 for reused columns).
    """

    index: np.ndarray
    label: np.ndarray
    clean: np.ndarray
    robust: np.ndarray
    attacks: list[str]
    params: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    x_adv: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.label)
        if self.index.shape != (n,) or self.clean.shape != (n,):
            raise ValueError("records: index, label and clean must have one entry per example")
        if self.robust.shape != (n, len(self.attacks)):
            raise ValueError(
                f"records: robust is {self.robust.shape}, expected ({n}, {len(self.attacks)}) "
                "(one column per attack)"
            )
        if self.x_adv is not None and self.x_adv.shape[0] != n:
            raise ValueError("records: x_adv must have one image per example")

    def __len__(self) -> int:
        return len(self.label)

    @property
    def n_attacks(self) -> int:
        return len(self.attacks)

    def broken_by(self) -> np.ndarray:
        """int16 [n]: the first attack that broke each example, -2 when the clean input is already
        misclassified, -1 when nothing did (api_schemas.evaluations.broken_by)."""
        first = broken_by(self.clean.tolist(), self.robust.tolist())
        return np.asarray(first, dtype=np.int16).reshape(len(self))

    def worst_case(self) -> np.ndarray:
        """bool [n]: correct clean and robust to every attack."""
        return self.clean & (self.robust == ROBUST).all(axis=1)

    def counts(self) -> dict[str, int]:
        """Examples correct clean ('clean'), robust to each attack (by label) and to all ('robust')."""
        out = {"clean": int(self.clean.sum())}
        for j, label in enumerate(self.attacks):
            out[label] = int((self.robust[:, j] == ROBUST).sum())
        out["robust"] = int(self.worst_case().sum())
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The columnar form stored per shard (npz): index, label, clean, robust, broken_by[, x_adv]."""
        out = {
            "index": self.index.astype(np.int64),
            "label": self.label.astype(np.int64),
            "clean": self.clean.astype(bool),
            "robust": self.robust.astype(np.int8),
            "broken_by": self.broken_by(),
        }
        if self.x_adv is not None:
            out["x_adv"] = self.x_adv.astype(np.float32)
        return out

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], attacks: Sequence[str]) -> ExampleRecords:
        return cls(
            index=np.asarray(arrays["index"], dtype=np.int64),
            label=np.asarray(arrays["label"], dtype=np.int64),
            clean=np.asarray(arrays["clean"], dtype=bool),
            robust=np.asarray(arrays["robust"], dtype=np.int8),
            attacks=list(attacks),
            x_adv=np.asarray(arrays["x_adv"], dtype=np.float32) if "x_adv" in arrays else None,
        )

    def head(self, n_attacks: int) -> ExampleRecords:
        """The records of the first `n_attacks` attacks (what an extended evaluation reuses)."""
        labels = self.attacks[:n_attacks]
        return ExampleRecords(
            index=self.index,
            label=self.label,
            clean=self.clean,
            robust=self.robust[:, :n_attacks],
            attacks=labels,
            params=self.params[:n_attacks],
            seconds={k: v for k, v in self.seconds.items() if k in labels},
            x_adv=self.x_adv,
        )

    @classmethod
    def concat(cls, parts: Sequence[ExampleRecords]) -> ExampleRecords:
        if not parts:
            raise ValueError("records: nothing to concatenate")
        labels = parts[0].attacks
        if any(p.attacks != labels for p in parts):
            raise ValueError("records: parts with different attacks")
        seconds: dict[str, float] = {}
        for part in parts:
            for key, value in part.seconds.items():
                seconds[key] = seconds.get(key, 0.0) + value
        with_images = [p.x_adv is not None for p in parts]
        return cls(
            index=np.concatenate([p.index for p in parts]),
            label=np.concatenate([p.label for p in parts]),
            clean=np.concatenate([p.clean for p in parts]),
            robust=np.concatenate([p.robust for p in parts]),
            attacks=list(labels),
            params=parts[0].params,
            seconds=seconds,
            x_adv=np.concatenate([p.x_adv for p in parts]) if all(with_images) else None,
        )


# ------------------------------------------------------------------------------------- attacks


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    out = [
        model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size] for i in range(0, len(y), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=y.device)


def _check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, who: str) -> None:
    """Refuse a result from an external attack implementation that left the threat model."""
    if x.numel() == 0:
        return
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if size.max().item() > eps * (1 + 1e-4) + 1e-6:
        raise RuntimeError(
            f"{who} returned a perturbation of {norm} size {size.max().item():.5f} > eps {eps}"
        )
    if x_adv.min().item() < -1e-6 or x_adv.max().item() > 1 + 1e-6:
        raise RuntimeError(f"{who} returned an input outside the [0, 1] box")


def _unresolved(attack: Any) -> bool:
    if getattr(attack, "eps", 0) is None or getattr(attack, "norm", "") is None:
        return True
    return isinstance(attack, PGDAttackSpec | TransferAttackSpec) and attack.step_size is None


class _Column:
    """One attack on the chosen examples of a shard: correctness under it and the adversarial inputs."""

    def __init__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        device: torch.device,
        batch_size: int,
        seed: int,
        keep_images: bool,
        transfer_sources: Mapping[str, nn.Module],
    ) -> None:
        self.model, self.x, self.y = model, x, y  # the whole shard, on the CPU
        self.device, self.batch_size, self.seed, self.keep_images = device, batch_size, seed, keep_images
        self.transfer_sources = transfer_sources

    def run(self, attack: Any, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(correct bool [m] on the CPU, adversarial inputs [m, ...] on the CPU or None, params)."""
        if isinstance(attack, AutoAttackSpec):
            return self._autoattack(attack, idx)
        if isinstance(attack, SquareAttackSpec):
            return self._square(attack, idx)
        if isinstance(attack, FGSMAttackSpec):
            params: dict[str, Any] = {"eps": attack.eps, "norm": attack.norm}
            return (*self._batched(idx, lambda x, y, _i: attacks.fgsm(self.model, x, y, **params)), params)
        if isinstance(attack, PGDAttackSpec | TransferAttackSpec):
            return self._pgd(attack, idx)
        raise ValueError(f"unknown attack kind {getattr(attack, 'kind', attack)!r}")

    def _batched(self, idx: torch.Tensor, make) -> tuple[torch.Tensor, torch.Tensor | None]:
        correct, images = [], []
        for start in range(0, len(idx), self.batch_size):
            chunk = idx[start : start + self.batch_size]
            x = self.x[chunk].to(self.device)
            y = self.y[chunk].to(self.device)
            x_adv = make(x, y, chunk)
            with torch.no_grad():
                correct.append((self.model(x_adv).argmax(1) == y).cpu())
            if self.keep_images:
                images.append(x_adv.detach().cpu())
        if not correct:
            return torch.zeros(0, dtype=torch.bool), (self.x[idx] if self.keep_images else None)
        return torch.cat(correct), (torch.cat(images) if self.keep_images else None)

    def _pgd(self, attack: PGDAttackSpec | TransferAttackSpec, idx: torch.Tensor):
        params = {
            "eps": attack.eps,
            "norm": attack.norm,
            "step_size": attack.step_size,
            "steps": attack.steps,
            "loss": attack.loss,
            "random_start": attack.random_start,
            "l2_variant": attack.l2_variant or "default",
        }
        if isinstance(attack, PGDAttackSpec):
            params["kappa"] = attack.kappa
        source = self.model
        if isinstance(attack, TransferAttackSpec):
            source = self.transfer_sources[attack.source_checkpoint]
        # every example's start, drawn for the whole shard at once on the CPU (see the module doc)
        generator = torch.Generator().manual_seed(self.seed)
        starts = attacks.initial_point(
            self.x,
            eps=params["eps"],
            norm=params["norm"],
            random_start=params["random_start"],
            generator=generator,
            l2_variant=params["l2_variant"],
        )

        def make(x, y, chunk):
            return attacks.pgd(source, x, y, x_init=starts[chunk].to(self.device), **params)

        correct, images = self._batched(idx, make)
        if isinstance(attack, TransferAttackSpec):
            params["source_checkpoint"] = attack.source_checkpoint
        return correct, images, params

    def _forked(self):
        devices = [self.device] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _autoattack(self, attack: AutoAttackSpec, idx: torch.Tensor):
        from pyautoattack import AutoAttack

        kwargs: dict[str, Any] = {
            "norm": _AA_NORMS[attack.norm],
            "eps": attack.eps,
            "version": attack.version,
            "device": self.device,
            "seed": self.seed,
        }
        if attack.version == "custom":
            kwargs["attacks"] = list(attack.attacks or [])
        adversary = AutoAttack(self.model, **kwargs)
        adversary.verbose = False
        params = {
            "eps": attack.eps,
            "norm": attack.norm,
            "version": attack.version,
            "attacks": list(adversary.attacks_to_run),
        }
        if len(idx) == 0:
            return torch.zeros(0, dtype=torch.bool), (self.x[idx] if self.keep_images else None), params
        x = self.x[idx].to(self.device)
        y = self.y[idx].to(self.device)
        with self._forked():
            x_adv = adversary.run_standard_evaluation(x, y, batch_size=self.batch_size)[0]
        # measure ourselves on what AutoAttack returns, and check it kept to the threat model
        _check_in_ball(x_adv, x, attack.eps, attack.norm, "AutoAttack")
        correct = _correct(self.model, x_adv, y, self.batch_size).cpu()
        return correct, (x_adv.cpu() if self.keep_images else None), params

    def _square(self, attack: SquareAttackSpec, idx: torch.Tensor):
        from pyautoattack.square import SquareAttack

        square = SquareAttack(
            self.model,
            norm=_AA_NORMS[attack.norm],
            n_queries=attack.n_queries,
            eps=attack.eps,
            p_init=attack.p_init,
            n_restarts=attack.n_restarts,
            seed=derive_seed(self.seed, attack.seed),
            verbose=False,
            resc_schedule=attack.rescale_schedule,
            device=self.device,
        )

        def make(x, y, _chunk):
            with self._forked(), torch.no_grad():
                x_adv = square.perturb(x, y)
            _check_in_ball(x_adv, x, attack.eps, attack.norm, "Square")
            return x_adv

        correct, images = self._batched(idx, make)
        params = {
            "eps": attack.eps,
            "norm": attack.norm,
            "n_queries": attack.n_queries,
            "p_init": attack.p_init,
            "n_restarts": attack.n_restarts,
            "seed": attack.seed,
        }
        return correct, images, params


def _load_sources(
    attack_list: Sequence[Any], given: Mapping[str, nn.Module] | None, device: torch.device
) -> dict[str, nn.Module]:
    from trainer.checkpoint import load_model

    sources = dict(given or {})
    for attack in attack_list:
        if isinstance(attack, TransferAttackSpec) and attack.source_checkpoint not in sources:
            sources[attack.source_checkpoint] = load_model(attack.source_checkpoint, device=device)
    return sources


def evaluate_records(
    model: nn.Module,
    data: ArrayDataset,
    attack_list: Sequence[Any],
    *,
    seed: int = 0,
    shard: int = 0,
    start: int = 0,
    batch_size: int = 500,
    device: torch.device | str = "cpu",
    skip: np.ndarray | None = None,
    reuse: ExampleRecords | None = None,
    incremental_from: int | None = None,
    transfer_sources: Mapping[str, nn.Module] | None = None,
    save_adversarial: bool = False,
) -> ExampleRecords:
    """Attack every example of `data` (one shard; its first example is `start` in the split) with
    `attack_list` (resolved: eps and norm set, e.g. `EvaluationSuite.resolved_attacks()`), in order.

    - `seed`, `shard`: the derived seeds of every random start (see `shard_seed`).
    - `skip`: bool [n, k]; True keeps attack j off example i (its entry is -1).
    - `reuse`: records of the same examples under the first `reuse.n_attacks` attacks (an evaluation
      being strengthened); those columns, the clean correctness and the images are copied, not
      recomputed (records without images give the clean input for the examples they broke).
    - `incremental_from`: the first column that runs only on the examples still robust to every
      earlier attack (default: `reuse.n_attacks` when reusing, else none).
    - `transfer_sources`: source models of the transfer attacks by their `source_checkpoint`
      (those missing are loaded from that path).
    - `save_adversarial`: also return the adversarial images (float32, on the CPU).
    """
    device = torch.device(device)
    n, k = len(data), len(attack_list)
    labels = [a.label() for a in attack_list]
    if any(_unresolved(a) for a in attack_list):
        raise ValueError("attacks: resolve eps/norm/step_size first (EvaluationSuite.resolved_attacks)")
    if skip is not None:
        skip = np.asarray(skip, dtype=bool)
        if skip.shape != (n, k):
            raise ValueError(f"skip: shape {skip.shape}, expected ({n}, {k})")
    y = data.labels.cpu()
    x = data.images.cpu().float().div_(255)
    n_reused = 0
    if reuse is not None:
        n_reused = reuse.n_attacks
        if len(reuse) != n or not np.array_equal(reuse.label, y.numpy()):
            raise ValueError("reuse: the records are of other examples (labels differ)")
        if reuse.attacks != labels[:n_reused]:
            raise ValueError(f"reuse: records of {reuse.attacks}, not the first attacks of {labels}")
        if incremental_from is None:
            incremental_from = n_reused
    index = np.arange(start, start + n, dtype=np.int64)
    sources = _load_sources([a for a in attack_list[n_reused:]], transfer_sources, device)

    robust = np.full((n, k), SKIPPED, dtype=np.int8)
    params: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    x_adv: torch.Tensor | None = None
    with contextlib.ExitStack() as stack:
        stack.enter_context(fp32(device))
        stack.enter_context(eval_mode(model))
        for source in sources.values():
            stack.enter_context(eval_mode(source))
        if reuse is None:
            clean = _correct(model, x.to(device), y.to(device), batch_size).cpu().numpy()
        else:
            clean = reuse.clean.astype(bool).copy()
        if save_adversarial:
            have = reuse is not None and reuse.x_adv is not None
            x_adv = torch.from_numpy(reuse.x_adv.copy()) if have else x.clone()
        broken = ~clean  # misclassified clean or broken by an earlier attack: its image is final
        alive = clean.copy()  # robust to every attack so far
        for j, attack in enumerate(attack_list):
            if j < n_reused:
                robust[:, j] = reuse.robust[:, j]
                params.append(reuse.params[j] if j < len(reuse.params) else {})
                seconds[labels[j]] = 0.0
            else:
                began = time.perf_counter()
                incremental = incremental_from is not None and j >= incremental_from
                run = (alive if incremental else clean).copy()
                if skip is not None:
                    run &= ~skip[:, j]
                column = np.full(n, SKIPPED, dtype=np.int8)
                if not incremental:  # misclassified clean: broken without an attack
                    column[~clean & (~skip[:, j] if skip is not None else True)] = BROKEN
                idx = torch.from_numpy(np.flatnonzero(run))
                runner = _Column(
                    model,
                    x,
                    y,
                    device=device,
                    batch_size=batch_size,
                    seed=shard_seed(seed, shard, j),
                    keep_images=x_adv is not None,
                    transfer_sources=sources,
                )
                correct, images, attack_params = runner.run(attack, idx)
                column[idx.numpy()] = np.where(correct.numpy(), ROBUST, BROKEN)
                robust[:, j] = column
                if x_adv is not None and images is not None and len(idx):
                    update = ~torch.from_numpy(broken[idx.numpy()])
                    x_adv[idx[update]] = images[update].float()
                params.append(attack_params)
                seconds[labels[j]] = time.perf_counter() - began
            broken |= robust[:, j] == BROKEN
            alive &= robust[:, j] == ROBUST
    return ExampleRecords(
        index=index,
        label=y.numpy().astype(np.int64),
        clean=clean,
        robust=robust,
        attacks=labels,
        params=params,
        seconds=seconds,
        x_adv=None if x_adv is None else x_adv.numpy(),
    )


# ------------------------------------------------------------------------------ training's report


def _protocol_sharding(spec: EvaluationSpec) -> tuple[int, int]:
    """(seed, shard size) of the protocol a training spec names, so that its final evaluation gives
    the per-example results an evaluation job of the same checkpoint gives; else the suite defaults."""
    if spec.protocol is None:
        return 0, DEFAULT_SHARD_SIZE
    from api_schemas.protocols import get_protocol

    suite = get_protocol(spec.protocol).suite
    return suite.seed, suite.shard_size


def evaluate(
    model: nn.Module,
    dataset: ArrayDataset,
    spec: EvaluationSpec,
    threat: ThreatModel,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
    seed: int | None = None,
    shard_size: int | None = None,
) -> EvalReport:
    """Run the suite on the first `spec.n_examples` images of `dataset`; report accuracies, mean and NRR.

    The examples are evaluated shard by shard with `evaluate_records` (seed and shard size: the
    protocol's when `spec.protocol` names one, else 0 and 500, unless given). An AutoAttack or
    Square attack with `n_examples` runs on the first n examples only and is reported on those.
    """
    data = _first(dataset, spec.n_examples)
    default_seed, default_shard = _protocol_sharding(spec)
    seed = default_seed if seed is None else seed
    shard_size = shard_size or default_shard
    attack_list = resolve_attacks(spec.attacks, threat)
    n, k = len(data), len(attack_list)
    subsets = []
    for attack in attack_list:
        limit = (
            getattr(attack, "n_examples", None)
            if isinstance(attack, AutoAttackSpec | SquareAttackSpec)
            else None
        )
        subsets.append(n if limit is None else min(limit, n))
    skip = np.zeros((n, k), dtype=bool)
    for j, size in enumerate(subsets):
        skip[size:, j] = True
    sources = _load_sources(attack_list, None, torch.device(device))
    parts = []
    for shard, begin in enumerate(range(0, n, shard_size)):
        stop = min(begin + shard_size, n)
        parts.append(
            evaluate_records(
                model,
                data.subset(torch.arange(begin, stop)),
                attack_list,
                seed=seed,
                shard=shard,
                start=begin,
                batch_size=spec.batch_size,
                device=device,
                skip=skip[begin:stop] if k else None,
                transfer_sources=sources,
            )
        )
    if not parts:
        return EvalReport(clean_accuracy=0.0, n_examples=0)
    records = ExampleRecords.concat(parts)
    clean = float(records.clean.mean())
    results: list[AttackResult] = []
    for j, attack in enumerate(attack_list):
        size = subsets[j]
        acc = float((records.robust[:size, j] == ROBUST).sum()) / max(size, 1)
        subset_clean = clean if size == n else float(records.clean[:size].mean()) if size else 0.0
        result = AttackResult(
            name=attack.label(),
            kind=attack.kind,
            accuracy=acc,
            n_examples=size,
            nrr=nrr(subset_clean, acc),
            mean=(subset_clean + acc) / 2,
            seconds=records.seconds.get(attack.label(), 0.0),
            params=records.params[j],
        )
        results.append(result)
        if progress:
            log.info(
                "%s: %.4f (clean %.4f, %d images, %.1fs)",
                result.name,
                acc,
                subset_clean,
                size,
                result.seconds,
            )
    report = EvalReport(clean_accuracy=clean, n_examples=n, attacks=results)
    if results:
        worst = min(results, key=lambda r: r.accuracy)
        report.robust_accuracy = worst.accuracy
        report.worst_attack = worst.name
        report.nrr = nrr(clean, worst.accuracy)
        report.mean = (clean + worst.accuracy) / 2
    return report
