"""The evaluation suite: clean accuracy, FGSM, PGD-k (CE/CW/KL), AutoAttack, Square and black-box transfer.

Evaluation always runs in fp32 with the model in eval mode (the mode is restored afterwards): a
reduced-precision or training-mode forward can mask gradients and overstate robustness.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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
from api_schemas.results import nrr
from trainer import attacks
from trainer.data import ArrayDataset, DeviceLoader

log = logging.getLogger("trainer.evaluation")

_AA_NORMS = {"linf": "Linf", "l2": "L2"}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


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


def _resolve(attack: Any, threat: ThreatModel) -> tuple[float, str]:
    eps = attack.eps if attack.eps is not None else threat.eps
    norm = getattr(attack, "norm", None) or threat.norm
    return eps, norm


def _pgd_kwargs(attack: PGDAttackSpec | TransferAttackSpec, threat: ThreatModel) -> dict[str, Any]:
    eps, norm = _resolve(attack, threat)
    kwargs = {
        "eps": eps,
        "norm": norm,
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
    """Accuracy under one PGD attack (used for best-checkpoint selection)."""
    kwargs = _pgd_kwargs(attack, threat)
    correct = 0
    with eval_mode(model):
        for x, y in _batches(dataset, batch_size, device):
            x_adv = attacks.pgd(model, x, y, **kwargs)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == y).sum().item()
    return correct / max(len(dataset), 1)


def _white_box(
    model: nn.Module, dataset: ArrayDataset, attack: Any, threat: ThreatModel, batch_size: int, device
) -> tuple[float, dict]:
    if isinstance(attack, FGSMAttackSpec):
        eps, norm = _resolve(attack, threat)
        run = lambda x, y: attacks.fgsm(model, x, y, eps=eps, norm=norm)  # noqa: E731
        params: dict[str, Any] = {"eps": eps, "norm": norm}
    else:
        params = _pgd_kwargs(attack, threat)
        run = lambda x, y: attacks.pgd(model, x, y, **params)  # noqa: E731
    correct = 0
    for x, y in _batches(dataset, batch_size, device):
        x_adv = run(x, y)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum().item()
    return correct / max(len(dataset), 1), params


def _transfer(
    model: nn.Module,
    dataset: ArrayDataset,
    attack: TransferAttackSpec,
    threat: ThreatModel,
    batch_size: int,
    device,
) -> tuple[float, dict]:
    from trainer.checkpoint import load_model

    source = load_model(attack.source_checkpoint, device=device)
    params = _pgd_kwargs(attack, threat)
    correct = 0
    for x, y in _batches(dataset, batch_size, device):
        x_adv = attacks.pgd(source, x, y, **params)
        with torch.no_grad():
            correct += (model(x_adv).argmax(1) == y).sum().item()
    return correct / max(len(dataset), 1), {**params, "source_checkpoint": attack.source_checkpoint}


def _autoattack(
    model: nn.Module,
    dataset: ArrayDataset,
    attack: AutoAttackSpec,
    threat: ThreatModel,
    batch_size: int,
    device,
) -> tuple[float, dict]:
    from pyautoattack import AutoAttack

    eps, norm = _resolve(attack, threat)
    x = dataset.images.to(device).float().div_(255)
    y = dataset.labels.to(device)
    kwargs: dict[str, Any] = {
        "norm": _AA_NORMS[norm],
        "eps": eps,
        "version": attack.version,
        "device": device,
        "seed": 0,
    }
    if attack.version == "custom":
        kwargs["attacks"] = list(attack.attacks or [])
    adversary = AutoAttack(model, **kwargs)
    adversary.verbose = False
    x_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)[0]
    # Measure ourselves on what AutoAttack returns, and check it kept to the threat model.
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if size.max().item() > eps * (1 + 1e-4) + 1e-6:
        raise RuntimeError(
            f"AutoAttack returned a perturbation of {norm} size {size.max().item():.5f} > eps {eps}"
        )
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            pred = model(x_adv[start : start + batch_size]).argmax(1)
            correct += (pred == y[start : start + batch_size]).sum().item()
    params = {"eps": eps, "norm": norm, "version": attack.version, "attacks": adversary.attacks_to_run}
    return correct / max(len(y), 1), params


def _square(
    model: nn.Module,
    dataset: ArrayDataset,
    attack: SquareAttackSpec,
    threat: ThreatModel,
    batch_size: int,
    device,
) -> tuple[float, dict]:
    """Square Attack through pyautoattack's implementation, batch by batch.

    pyautoattack's Square reseeds torch's global generator from `seed`; the attack runs inside
    `fork_rng` so that evaluating never changes the random stream of the run that asked for it.
    """
    from pyautoattack.square import SquareAttack

    eps, norm = _resolve(attack, threat)
    square = SquareAttack(
        model,
        norm=_AA_NORMS[norm],
        n_queries=attack.n_queries,
        eps=eps,
        p_init=attack.p_init,
        n_restarts=attack.n_restarts,
        seed=attack.seed,
        verbose=False,
        resc_schedule=attack.rescale_schedule,
        device=device,
    )
    devices = [torch.device(device)] if torch.device(device).type == "cuda" else []
    correct = 0
    for x, y in _batches(dataset, batch_size, device):
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            x_adv = square.perturb(x, y)
            _check_in_ball(x_adv, x, eps, norm, "Square")
            correct += (model(x_adv).argmax(1) == y).sum().item()
    params = {
        "eps": eps,
        "norm": norm,
        "n_queries": attack.n_queries,
        "p_init": attack.p_init,
        "n_restarts": attack.n_restarts,
        "seed": attack.seed,
    }
    return correct / max(len(dataset), 1), params


def _check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, who: str) -> None:
    """Refuse a result from an external attack implementation that left the threat model."""
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    if size.max().item() > eps * (1 + 1e-4) + 1e-6:
        raise RuntimeError(
            f"{who} returned a perturbation of {norm} size {size.max().item():.5f} > eps {eps}"
        )
    if x_adv.min().item() < -1e-6 or x_adv.max().item() > 1 + 1e-6:
        raise RuntimeError(f"{who} returned an input outside the [0, 1] box")


def evaluate(
    model: nn.Module,
    dataset: ArrayDataset,
    spec: EvaluationSpec,
    threat: ThreatModel,
    *,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EvalReport:
    """Run the suite on the first `spec.n_examples` images of `dataset`; report accuracies, mean and NRR."""
    data = _first(dataset, spec.n_examples)
    clean = accuracy(model, data, batch_size=spec.batch_size, device=device)
    results: list[AttackResult] = []
    with eval_mode(model):
        for attack in spec.attacks:
            start = time.perf_counter()
            subset = data
            if isinstance(attack, AutoAttackSpec):
                subset = _first(data, attack.n_examples)
                acc, params = _autoattack(model, subset, attack, threat, spec.batch_size, device)
            elif isinstance(attack, SquareAttackSpec):
                subset = _first(data, attack.n_examples)
                acc, params = _square(model, subset, attack, threat, spec.batch_size, device)
            elif isinstance(attack, TransferAttackSpec):
                acc, params = _transfer(model, subset, attack, threat, spec.batch_size, device)
            else:
                acc, params = _white_box(model, subset, attack, threat, spec.batch_size, device)
            subset_clean = (
                clean
                if subset is data
                else accuracy(model, subset, batch_size=spec.batch_size, device=device)
            )
            result = AttackResult(
                name=attack.label(),
                kind=attack.kind,
                accuracy=acc,
                n_examples=len(subset),
                nrr=nrr(subset_clean, acc),
                mean=(subset_clean + acc) / 2,
                seconds=time.perf_counter() - start,
                params=params,
            )
            results.append(result)
            if progress:
                log.info(
                    "%s: %.4f (clean %.4f, %d images, %.1fs)",
                    result.name,
                    acc,
                    subset_clean,
                    len(subset),
                    result.seconds,
                )
    report = EvalReport(clean_accuracy=clean, n_examples=len(data), attacks=results)
    if results:
        worst = min(results, key=lambda r: r.accuracy)
        report.robust_accuracy = worst.accuracy
        report.worst_attack = worst.name
        report.nrr = nrr(clean, worst.accuracy)
        report.mean = (clean + worst.accuracy) / 2
    return report
