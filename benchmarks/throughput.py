"""Training throughput of our adversarial-training step against a reference loop written like the official code.

Run from the repository root (not a test; nothing here is collected by pytest)::

    python benchmarks/throughput.py --case lbgat-wrn34-10
    python benchmarks/throughput.py --case pgd-at-resnet18
    python benchmarks/throughput.py --case all --json

In one process, on one device, with the same models, data and attack settings, two loops are timed:

ours
    a ``trainer.loop.TrainingRun`` built from a preset (``api_schemas.presets.get_preset`` plus
    ``--set``-style overrides) on synthetic CIFAR-size data (``trainer.data.make_synthetic``: 3x32x32,
    10 classes), timing ``run.train_step(x, y)`` over batches from ``run.loader`` (the data stays on the
    device as uint8 and each batch is cropped/flipped there). The runtime follows the spec: on a GPU bf16
    autocast and channels_last are on and ``torch.compile`` is off unless ``--compile``
    (``--no-bf16`` / ``--no-channels-last`` turn the others off).
reference
    the loop as the official LBGAT code (github dvlab-research/LBGAT, ``lbgat.py`` and
    ``train_lbgat_cifar100.py``) and the TRADES-style baselines write it, re-implemented here from that
    description: fp32 (no autocast), contiguous NCHW, no compile; the data is a CPU uint8 dataset read
    through a ``torch.utils.data.DataLoader`` (batch 128, shuffled, ``--ref-workers`` worker processes,
    0 by default so the loading runs in this process) whose ``__getitem__`` augments ONE image at a time
    in Python (zero-pad 4, random 32x32 crop, random horizontal flip, then to float in [0, 1], like
    torchvision's RandomCrop + RandomHorizontalFlip + ToTensor); every batch is copied to the device.
    LBGAT: the robust model in eval mode, 10 PGD steps on KL(softmax(f(x)) || softmax(f(x_adv))) from
    x + 0.001*N(0, 1) that RECOMPUTE f(x) at every step, then train mode, ``optimizer.zero_grad()``,
    out_adv = f(x_adv), out_natural = f(x), out_teacher = teacher(x) (in that order),
    loss = MSE(out_adv, out_teacher) + CE(out_teacher, y) + alpha * (1/B) * KL_sum(out_natural || out_adv),
    backward, one SGD step over both models' parameters (lr 0.1, momentum 0.9, weight decay 2e-4).
    PGD-AT: eval mode, 10 PGD steps on CE from a uniform start in the eps ball, train mode, CE(f(x_adv), y).

Both loops use the spec's eps (0.031), step size (0.007), number of steps (10), alpha, batch size and
optimizer settings, so they compute the same thing (``--check`` verifies it: one fp32 step of each from
identical weights, batch and random start must give the same loss and parameters). Cases:

``lbgat-wrn34-10``
    preset ``lbgat-trades-a0-cifar10``: LBGAT+TRADES (alpha 0 unless ``--alpha``), robust WRN-34-10,
    teacher ``lbgat_teacher_resnet18``, PGD-10 KL attack, batch 128.
``pgd-at-resnet18``
    preset ``vanilla-at-cifar10`` with a ResNet-18: Madry PGD-AT (PGD-10 CE attack, uniform start),
    batch 128.

``--small`` (the default when there is no GPU) swaps the models for ``tiny_cnn`` (width 32 robust,
width 16 teacher) so that the benchmark runs on a laptop CPU in well under a minute per case; its
figures only show that the script works, the GPU figures are the ones that matter.

The timed region of each loop is ``steps`` iterations of "next batch + one training step" after
``warmup`` iterations, bracketed by ``torch.cuda.synchronize`` on a GPU and timed with
``time.perf_counter``. Reported per loop: images/s, ms per step and the achieved TFLOP/s of *useful*
work, computed from the SAME FLOP count for both loops (so the TFLOP/s ratio equals the images/s
ratio), with F_r and F_t the forward FLOPs of one image through the robust model and the teacher
(``trainer.models.count_flops``: 2 x multiply-accumulates of the Conv2d and Linear layers) and a
backward pass counted as twice a forward:

    LBGAT:   FLOPs/image = F_r                  (clean forward for the KL target, once)
                         + steps * 2 * F_r      (attack: forward + input-gradient backward)
                         + 2 * 3 * F_r          (loss: f(x_adv) and f(x), forward + full backward)
                         + 3 * F_t              (loss: teacher(x), forward + full backward)
    PGD-AT:  FLOPs/image = steps * 2 * F_r + 3 * F_r

Backend flags are process-wide and so shared by both loops: ``TrainingRun`` turns on
``cudnn.benchmark`` on a GPU (which helps the reference as well), and PyTorch's default lets cuDNN use
TF32 for the fp32 convolutions of both ("fp32" here means "no autocast", as in the official code).

The reference executes ``steps`` more robust forwards per image than this count in the LBGAT case
(f(x) at every attack step), which is exactly the waste the count does not reward.

Target (one H100, case ``lbgat-wrn34-10``, defaults, same math): ours >= 4x the reference's images/s.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from _common import describe_device, resolve_device
from torch import Tensor, nn

from api_schemas.presets import get_preset
from api_schemas.spec import ExperimentSpec
from trainer.data import ArrayDataset, make_synthetic
from trainer.loop import Datasets, TrainingRun
from trainer.models import count_flops, create_model

log = logging.getLogger("benchmarks.throughput")

IMAGE_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
H100_TARGET_RATIO = 4.0  # lbgat-wrn34-10: ours / reference images/s on one H100


@dataclass(frozen=True)
class Case:
    name: str
    preset: str
    overrides: tuple[str, ...]  # paper models
    small_overrides: tuple[str, ...]  # laptop-sized models
    kind: str  # "lbgat" or "pgd_at": which reference loop


CASES: dict[str, Case] = {
    "lbgat-wrn34-10": Case(
        name="lbgat-wrn34-10",
        preset="lbgat-trades-a0-cifar10",
        overrides=("model.robust={name: wrn34_10}", "model.teacher={name: lbgat_teacher_resnet18}"),
        small_overrides=(
            "model.robust={name: tiny_cnn, width: 32}",
            "model.teacher={name: tiny_cnn, width: 16}",
        ),
        kind="lbgat",
    ),
    "pgd-at-resnet18": Case(
        name="pgd-at-resnet18",
        preset="vanilla-at-cifar10",
        overrides=("model.robust={name: resnet18}",),
        small_overrides=("model.robust={name: tiny_cnn, width: 32}",),
        kind="pgd_at",
    ),
}


# ---------------------------------------------------------------------------------------------- spec


def build_spec(case: Case, args: argparse.Namespace, device: torch.device) -> ExperimentSpec:
    overrides = list(case.small_overrides if args.small else case.overrides)
    overrides += [
        "dataset.name=synthetic",
        f"optimization.batch_size={args.batch_size}",
        f"runtime.device={device.type}",
        "runtime.progress=false",
    ]
    if case.kind == "lbgat":
        overrides.append(f"method.alpha={args.alpha}")
    if args.no_bf16:
        overrides.append("runtime.precision=tf32")  # fp32 tensors, TF32 tensor cores
    if args.no_channels_last:
        overrides.append("runtime.channels_last=false")
    if args.compile:
        overrides.append("runtime.compile=true")
    overrides += args.set  # the user's own --set KEY=VALUE come last and win
    spec = get_preset(case.preset, overrides)
    _check_reference_supports(case, spec)
    return spec


def _check_reference_supports(case: Case, spec: ExperimentSpec) -> None:
    """The reference loop implements one setting per case; refuse specs it would not reproduce."""
    tm, m = spec.threat_model, spec.method
    problems = []
    if tm.norm != "linf":
        problems.append("threat_model.norm must be linf")
    if spec.optimization.optimizer != "sgd" or spec.optimization.nesterov:
        problems.append("optimization must be plain SGD (momentum, no nesterov)")
    if case.kind == "lbgat":
        if m.name != "lbgat" or m.regularizer != "trades" or m.robust_ce:
            problems.append("method must be lbgat with regularizer trades and robust_ce false")
        if tm.loss not in (None, "kl") or tm.random_start not in (None, "normal"):
            problems.append("the attack must be the default KL attack from x + 0.001*N(0,1)")
    else:
        if m.name != "pgd_at":
            problems.append("method must be pgd_at")
        if tm.loss not in (None, "ce") or tm.random_start not in (None, "uniform"):
            problems.append("the attack must be the default CE attack from a uniform start")
    if problems:
        raise SystemExit(
            f"{case.name}: the reference loop cannot reproduce this spec: " + "; ".join(problems)
        )


# ---------------------------------------------------------------------------------------------- FLOPs


def useful_flops_per_image(kind: str, f_robust: int, f_teacher: int, steps: int) -> tuple[int, str]:
    """The useful FLOPs of one training image and the formula that produced them (see the docstring)."""
    if kind == "lbgat":
        total = f_robust + steps * 2 * f_robust + 2 * 3 * f_robust + 3 * f_teacher
        formula = f"F_r + {steps}*2*F_r + 2*3*F_r + 3*F_t = {1 + 2 * steps + 6}*F_r + 3*F_t"
    else:
        total = steps * 2 * f_robust + 3 * f_robust
        formula = f"{steps}*2*F_r + 3*F_r = {2 * steps + 3}*F_r"
    return total, formula


# ---------------------------------------------------------------------------------------------- reference


class PerImageAugmented(torch.utils.data.Dataset):
    """CIFAR-style training set that augments one image per ``__getitem__``, as torchvision transforms do.

    RandomCrop(32, padding=4) with zero fill, RandomHorizontalFlip(0.5), then ToTensor (float in [0, 1]);
    the random numbers come from torch's global generator, as in torchvision.
    """

    def __init__(self, images: Tensor, labels: Tensor, padding: int = 4, flip: bool = True) -> None:
        self.images = images.cpu()  # uint8 [N, C, H, W]
        self.labels = labels.cpu()
        self.padding = padding
        self.flip = flip

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        img = self.images[i]
        _, h, w = img.shape
        p = self.padding
        if p:
            padded = F.pad(img, (p, p, p, p))
            top = int(torch.randint(0, 2 * p + 1, (1,)).item())
            left = int(torch.randint(0, 2 * p + 1, (1,)).item())
            img = padded[:, top : top + h, left : left + w]
        if self.flip and torch.rand(1).item() < 0.5:
            img = img.flip(-1)
        return img.float().div(255.0), self.labels[i]


def reference_lbgat_step(
    model: nn.Module,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_natural: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    alpha: float,
    beta: float = 1.0,
) -> Tensor:
    """One LBGAT(+TRADES) step the way the official code writes it (fp32, f(x) recomputed every step)."""
    batch_size = x_natural.shape[0]
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape, device=x_natural.device).detach()
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = F.kl_div(
                F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1), reduction="sum"
            )
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - eps), x_natural + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    out_adv = model(x_adv)
    out_natural = model(x_natural)
    out_teacher = teacher(x_natural)
    loss_kl = (1.0 / batch_size) * F.kl_div(
        F.log_softmax(out_adv, dim=1), F.softmax(out_natural, dim=1), reduction="sum"
    )
    loss = F.mse_loss(out_adv, out_teacher) + beta * F.cross_entropy(out_teacher, y) + alpha * loss_kl
    loss.backward()
    optimizer.step()
    return loss.detach()


def reference_pgd_at_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x_natural: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
) -> Tensor:
    """One Madry PGD-AT step as the plain reference loops write it (fp32, eval mode during the attack)."""
    model.eval()
    x_adv = x_natural.detach() + eps * (2 * torch.rand(x_natural.shape, device=x_natural.device) - 1)
    x_adv = torch.clamp(x_adv, 0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - eps), x_natural + eps)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    x_adv = x_adv.detach()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x_adv), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@dataclass
class Reference:
    """The reference loop's models, optimizer and step function for one spec."""

    robust: nn.Module
    teacher: nn.Module | None
    optimizer: torch.optim.Optimizer
    step: Callable[[Tensor, Tensor], Tensor]


def build_reference(kind: str, spec: ExperimentSpec, device: torch.device) -> Reference:
    ref = spec.model.robust
    robust = create_model(ref.name, num_classes=NUM_CLASSES, in_channels=IMAGE_SHAPE[0], **ref.kwargs())
    robust = robust.to(device)
    teacher = None
    params = list(robust.parameters())
    if kind == "lbgat":
        tref = spec.model.teacher
        assert tref is not None
        teacher = create_model(
            tref.name, num_classes=NUM_CLASSES, in_channels=IMAGE_SHAPE[0], **tref.kwargs()
        )
        teacher = teacher.to(device)
        params += list(teacher.parameters())
    opt = spec.optimization
    optimizer = torch.optim.SGD(params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    tm = spec.threat_model
    attack = {"eps": tm.eps, "step_size": tm.step_size, "steps": tm.steps}
    if kind == "lbgat":
        method = spec.method
        assert teacher is not None

        def step(x: Tensor, y: Tensor) -> Tensor:
            return reference_lbgat_step(
                robust, teacher, optimizer, x, y, alpha=method.alpha, beta=method.beta, **attack
            )

    else:

        def step(x: Tensor, y: Tensor) -> Tensor:
            return reference_pgd_at_step(robust, optimizer, x, y, **attack)

    return Reference(robust=robust, teacher=teacher, optimizer=optimizer, step=step)


def reference_batches(
    data: ArrayDataset, spec: ExperimentSpec, device: torch.device, workers: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless batches from a DataLoader with per-image CPU augmentation, copied to the device."""
    ds = spec.dataset
    dataset = PerImageAugmented(
        data.images, data.labels, padding=ds.crop_padding if ds.augment else 0, flip=ds.augment and ds.flip
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=spec.optimization.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    while True:
        for x, y in loader:
            yield x.to(device), y.to(device)


def our_batches(run: TrainingRun) -> Iterator[tuple[Tensor, Tensor]]:
    epoch = 0
    while True:
        run.loader.set_epoch(epoch)
        yield from run.loader
        epoch += 1


# ---------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(
    step: Callable[[Tensor, Tensor], Tensor],
    batches: Iterator[tuple[Tensor, ...]],
    *,
    warmup: int,
    steps: int,
    device: torch.device,
) -> tuple[float, int, float]:
    """Seconds and images of `steps` (next batch + step) iterations after `warmup` ones; last loss."""
    loss = torch.zeros(())
    for _ in range(warmup):
        x, y = next(batches)
        loss = step(x, y)
    _sync(device)
    images = 0
    start = time.perf_counter()
    for _ in range(steps):
        x, y = next(batches)
        loss = step(x, y)
        images += y.shape[0]
    _sync(device)
    seconds = time.perf_counter() - start
    return seconds, images, float(loss.float().item())


@dataclass
class LoopResult:
    images_per_s: float
    ms_per_step: float
    tflops: float
    last_loss: float
    settings: str


@dataclass
class CaseResult:
    case: str
    device: str
    small: bool
    robust: str
    teacher: str | None
    batch_size: int
    attack: str
    flops_formula: str
    f_robust_gflop: float
    f_teacher_gflop: float
    useful_gflop_per_image: float
    ours: LoopResult
    reference: LoopResult
    ratio: float
    check: dict[str, float] | None = None
    target_ratio: float | None = None
    warmup: int = 0
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _model_label(ref: Any) -> str:
    kwargs = ref.kwargs()
    return ref.name + ("(" + ", ".join(f"{k}={v}" for k, v in kwargs.items()) + ")" if kwargs else "")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def make_datasets(n_train: int, seed: int) -> Datasets:
    train = make_synthetic(n_train, num_classes=NUM_CLASSES, shape=IMAGE_SHAPE, seed=seed)
    test = make_synthetic(64, num_classes=NUM_CLASSES, shape=IMAGE_SHAPE, seed=seed + 1)
    return Datasets(train=train, val=None, test=test)


# ---------------------------------------------------------------------------------------------- check


def check_same_math(
    case: Case, spec: ExperimentSpec, data: Datasets, device: torch.device
) -> dict[str, float]:
    """One fp32 step of ours and of the reference from the same weights, batch and random start.

    Returns the absolute loss difference and the largest parameter difference after the step (both
    ~1e-6 or below when the two loops compute the same thing; a GPU's non-deterministic kernels may
    flip the sign of a few near-zero attack gradients and leave somewhat larger differences).
    """
    fp32 = spec.model_copy(
        update={
            "runtime": spec.runtime.model_copy(
                update={"precision": "tf32", "channels_last": False, "compile": False}
            )
        }
    )
    run = TrainingRun(fp32, datasets=data, device=device)
    ref = build_reference(case.kind, spec, device)
    ref.robust.load_state_dict(run.robust.state_dict())
    if ref.teacher is not None and run.teacher is not None:
        ref.teacher.load_state_dict(run.teacher.state_dict())
    n = spec.optimization.batch_size
    x = data.train.images[:n].to(device).float().div(255.0)
    y = data.train.labels[:n].to(device)
    torch.manual_seed(1234)
    ours_loss, _ = run.train_step(x, y)
    torch.manual_seed(1234)
    ref_loss = ref.step(x, y)
    ours_params = [*run.robust.parameters(), *(run.teacher.parameters() if run.teacher is not None else [])]
    ref_params = [*ref.robust.parameters(), *(ref.teacher.parameters() if ref.teacher is not None else [])]
    param_diff = max((a - b).abs().max().item() for a, b in zip(ours_params, ref_params, strict=True))
    result = {
        "ours_loss": float(ours_loss.item()),
        "reference_loss": float(ref_loss.item()),
        "loss_abs_diff": abs(float(ours_loss.item()) - float(ref_loss.item())),
        "max_param_abs_diff": param_diff,
    }
    del run, ref
    _free(device)
    return result


# ---------------------------------------------------------------------------------------------- driver


def time_ours(
    spec: ExperimentSpec, data: Datasets, args: argparse.Namespace, device: torch.device
) -> tuple[int, int, tuple[float, int, float], str]:
    """Forward FLOPs of the robust model and the teacher, the timing of ours, and its settings."""
    run = TrainingRun(spec, datasets=data, device=device)
    f_robust = count_flops(run.robust, IMAGE_SHAPE)
    f_teacher = count_flops(run.teacher, IMAGE_SHAPE) if run.teacher is not None else 0
    rt = run.rt
    settings = (
        f"{'bf16 autocast' if rt.bf16 else 'fp32'}, {'channels_last' if rt.channels_last else 'NCHW'}, "
        f"{'compiled' if rt.compile else 'eager'}, on-device uint8 data + batched crop/flip"
    )

    def step(x: Tensor, y: Tensor) -> Tensor:
        return run.train_step(x, y)[0]

    timing = time_loop(step, our_batches(run), warmup=args.warmup, steps=args.steps, device=device)
    return f_robust, f_teacher, timing, settings


def time_reference(
    kind: str, spec: ExperimentSpec, data: Datasets, args: argparse.Namespace, device: torch.device
) -> tuple[float, int, float]:
    torch.manual_seed(spec.seed)
    ref = build_reference(kind, spec, device)
    batches = reference_batches(data.train, spec, device, args.ref_workers)
    return time_loop(ref.step, batches, warmup=args.warmup, steps=args.steps, device=device)


def run_case(case: Case, args: argparse.Namespace, device: torch.device) -> CaseResult:
    spec = build_spec(case, args, device)
    batch = spec.optimization.batch_size
    data = make_datasets(batch * max(args.warmup + args.steps, 2), seed=spec.seed)
    tm = spec.threat_model

    check = None
    if args.check:
        log.info("%s: checking that both loops compute the same step (fp32)", case.name)
        check = check_same_math(case, spec, data, device)

    log.info("%s: timing ours (%d warm-up + %d timed steps)", case.name, args.warmup, args.steps)
    f_robust, f_teacher, ours_timing, ours_settings = time_ours(spec, data, args, device)
    flops_per_image, formula = useful_flops_per_image(case.kind, f_robust, f_teacher, tm.steps)
    _free(device)
    log.info("%s: timing the reference loop", case.name)
    ref_timing = time_reference(case.kind, spec, data, args, device)
    _free(device)

    def result(timing: tuple[float, int, float], settings: str) -> LoopResult:
        sec, imgs, loss = timing
        return LoopResult(
            images_per_s=imgs / sec,
            ms_per_step=1e3 * sec / args.steps,
            tflops=flops_per_image * imgs / sec / 1e12,
            last_loss=loss,
            settings=settings,
        )

    ours = result(ours_timing, ours_settings)
    reference = result(
        ref_timing,
        "fp32, NCHW, eager, CPU uint8 data + per-image crop/flip in a DataLoader "
        f"({args.ref_workers} workers), copied to the device each step",
    )
    robust_label = _model_label(spec.model.robust)
    teacher_label = _model_label(spec.model.teacher) if case.kind == "lbgat" and spec.model.teacher else None
    attack = f"PGD-{tm.steps} {'KL' if case.kind == 'lbgat' else 'CE'} linf eps {tm.eps} step {tm.step_size}"
    extra: dict[str, Any] = {"preset": case.preset}
    if case.kind == "lbgat":
        extra["alpha"] = spec.method.alpha
    return CaseResult(
        case=case.name,
        device=describe_device(device),
        small=args.small,
        robust=robust_label,
        teacher=teacher_label,
        batch_size=batch,
        attack=attack,
        flops_formula=formula,
        f_robust_gflop=f_robust / 1e9,
        f_teacher_gflop=f_teacher / 1e9,
        useful_gflop_per_image=flops_per_image / 1e9,
        ours=ours,
        reference=reference,
        ratio=ours.images_per_s / reference.images_per_s,
        check=check,
        target_ratio=H100_TARGET_RATIO if case.kind == "lbgat" and not args.small else None,
        warmup=args.warmup,
        steps=args.steps,
        extra=extra,
    )


def print_case(r: CaseResult) -> None:
    models = f"robust {r.robust}" + (f", teacher {r.teacher}" if r.teacher else "")
    print(f"\n== {r.case} on {r.device}{'  [--small models]' if r.small else ''}")
    print(f"   {models}; batch {r.batch_size}; {r.attack}; {r.warmup} warm-up + {r.steps} timed steps")
    teacher = f", F_t = {r.f_teacher_gflop:.4g} GFLOP" if r.teacher else ""
    print(
        f"   useful FLOPs/image = {r.flops_formula} = {r.useful_gflop_per_image:.4g} GFLOP"
        f"  (F_r = {r.f_robust_gflop:.4g} GFLOP{teacher}; same count for both loops)"
    )
    print(f"   {'loop':<10} {'images/s':>10} {'ms/step':>10} {'TFLOP/s':>9} {'last loss':>10}  settings")
    for label, loop in (("ours", r.ours), ("reference", r.reference)):
        print(
            f"   {label:<10} {loop.images_per_s:>10.1f} {loop.ms_per_step:>10.1f} {loop.tflops:>9.3f} "
            f"{loop.last_loss:>10.4f}  {loop.settings}"
        )
    target = ""
    if r.target_ratio is not None:
        if "H100" in r.device:
            verdict = "met" if r.ratio >= r.target_ratio else "NOT met"
            target = f"  (H100 target >= {r.target_ratio:g}x: {verdict})"
        else:
            target = f"  (the >= {r.target_ratio:g}x target applies to an H100; this is not one)"
    print(f"   ratio ours / reference = {r.ratio:.2f}x{target}")
    if r.check is not None:
        c = r.check
        print(
            f"   check (one fp32 step each, same weights/batch/seed): loss ours {c['ours_loss']:.6f} "
            f"reference {c['reference_loss']:.6f} |diff| {c['loss_abs_diff']:.2e}, "
            f"max |param diff| {c['max_param_abs_diff']:.2e}"
        )
    sys.stdout.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Images/s of our training step vs. a reference loop written like the official LBGAT code.",
    )
    p.add_argument(
        "--case", choices=[*CASES, "all"], default="lbgat-wrn34-10", help="default: lbgat-wrn34-10"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument(
        "--small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tiny_cnn models (width 32 robust, 16 teacher) instead of the paper's; default: on without CUDA",
    )
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on GPU, 5 on CPU)")
    p.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps first (default 5 GPU, 10 with --compile, 2 CPU)",
    )
    p.add_argument("--batch-size", type=int, default=128, help="default: 128")
    p.add_argument(
        "--alpha", type=float, default=0.0, help="LBGAT+TRADES regularizer weight, both loops (default: 0)"
    )
    p.add_argument("--no-bf16", action="store_true", help="ours without bf16 autocast")
    p.add_argument("--no-channels-last", action="store_true", help="ours without channels_last")
    p.add_argument("--compile", action="store_true", help="ours with torch.compile")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra spec override (as `lbgat train --set`), e.g. threat_model.steps=5; the reference follows it",
    )
    p.add_argument(
        "--ref-workers", type=int, default=0, help="DataLoader worker processes of the reference (default: 0)"
    )
    p.add_argument("--check", action="store_true", help="first verify one fp32 step of both loops agrees")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[CaseResult]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if args.small is None:
        args.small = not on_gpu
    if args.steps is None:
        args.steps = 20 if on_gpu else 5
    if args.warmup is None:
        args.warmup = (10 if args.compile else 5) if on_gpu else 2
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if on_gpu:
        torch.cuda.set_device(device)

    names = list(CASES) if args.case == "all" else [args.case]
    results = []
    for name in names:
        result = run_case(CASES[name], args, device)
        print_case(result)
        results.append(result)
    if args.json:
        print(json.dumps({"torch": torch.__version__, "results": [asdict(r) for r in results]}, indent=2))
    return results


if __name__ == "__main__":
    main()
