"""What a method is: its attack objective, the model modes during the attack, and a loss from logits.

The shared loop (trainer.loop) sets train/eval modes, runs the attack through `generate`, calls
`compute_loss` and steps the optimizer; a method never does any of those itself.

A method may own an auxiliary network with its own objective and optimizer (CAT's mask network
g_phi): it builds it in `build_auxiliary`, uses it in `compute_loss` (passed as `auxiliary=`), and
returns its objective from `auxiliary_loss`, which the loop minimises with a second optimizer after
the robust model's step, as Algorithm 1 of CAT updates theta and then phi in every step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from api_schemas import ThreatModel
from trainer import attacks

Mode = Literal["train", "eval"]


@dataclass(frozen=True)
class AttackConfig:
    norm: str
    eps: float
    step_size: float
    steps: int
    loss: str
    random_start: str
    kappa: float = 0.0
    #: early-stopped PGD (FAT): steps allowed past the first misclassified iterate; None: plain PGD
    early_stop_tau: int | None = None
    #: std of Gaussian noise added to every step (FAT's omega)
    step_noise: float = 0.0
    #: l_2 PGD as advertorch runs it ('advertorch': box-uniform start, clip to the box, then the ball)
    l2_variant: str = "default"
    #: half-width of the l_inf uniform start (None: eps) and whether x' stays in [0, 1]
    start_radius: float | None = None
    clip: bool = True

    def run(self, model: nn.Module, x: Tensor, y: Tensor, *, logits_clean: Tensor | None = None) -> Tensor:
        return attacks.pgd(
            model,
            x,
            y,
            eps=self.eps,
            step_size=self.step_size,
            steps=self.steps,
            norm=self.norm,  # type: ignore[arg-type]
            loss=self.loss,  # type: ignore[arg-type]
            random_start=self.random_start,  # type: ignore[arg-type]
            kappa=self.kappa,
            logits_clean=logits_clean,
            early_stop_tau=self.early_stop_tau,
            step_noise=self.step_noise,
            l2_variant=self.l2_variant,  # type: ignore[arg-type]
            start_radius=self.start_radius,
            clip=self.clip,
        )


@dataclass
class StepOutput:
    """The loss to minimise plus the logits the loop turns into training metrics."""

    loss: Tensor
    logits_adv: Tensor | None = None
    logits_nat: Tensor | None = None
    logits_teacher: Tensor | None = None
    parts: dict[str, Tensor] = field(default_factory=dict)
    #: what `Method.auxiliary_loss` needs from this step (e.g. CAT's mask, still attached to g_phi)
    auxiliary_inputs: dict[str, Tensor] = field(default_factory=dict)


class Method:
    """Base class. Subclasses set the class attributes and implement `compute_loss`."""

    name: ClassVar[str]
    #: inner-maximisation objective ('ce', 'kl', 'cw') and start, or None for no attack
    attack_loss: ClassVar[str | None] = "ce"
    attack_random_start: ClassVar[str] = "uniform"
    #: modes while the attack runs (the teacher is never part of the attack; its mode still matters
    #: for BatchNorm-free equivalence with the official code, which leaves it in training mode);
    #: `threat_model.model_mode` overrides the robust model's (see `attack_model_mode`)
    robust_mode_during_attack: ClassVar[Mode] = "eval"
    teacher_mode_during_attack: ClassVar[Mode] = "train"
    #: teacher weights updated by the shared optimizer (LBGAT) or frozen (BGAT)
    trains_teacher: ClassVar[bool] = False
    uses_teacher: ClassVar[bool] = False
    #: robust model's mode while `auxiliary_loss` runs (only for methods with an auxiliary network)
    robust_mode_during_auxiliary: ClassVar[Mode] = "train"
    #: train on two random augmentations of every image (Cons-AT, RAAT): the loop then passes both
    #: views stacked, x[:B] and x[B:] being the two views of the same B images, and y repeated
    two_views: ClassVar[bool] = False
    #: the loss reads the weight-averaged robust model (ReBAT, RAAT#): the loop passes it to
    #: `compute_loss` as the keyword argument `averaged`, in the mode `averaged_mode` names
    uses_averaged: ClassVar[bool] = False

    def __init__(self, spec: Any, threat: ThreatModel) -> None:
        self.spec = spec
        self.threat = threat
        self.epoch = 0

    def setup(self, experiment: Any) -> None:
        """Called once by the loop with the whole ExperimentSpec, for methods that depend on other parts
        of it (ReBAT: the epoch at which weight averaging starts)."""

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop before each epoch (0-based), for methods whose attack follows a schedule."""
        self.epoch = epoch

    def averaged_mode(self) -> Mode:
        """Mode of the averaged model while `compute_loss` runs (methods with `uses_averaged`)."""
        return "eval"

    def post_step_view(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """What the loop forwards after the update of a training-mode attack (see the loop): the
        whole batch, or for RAAT# the first view only, as its script forwards X alone."""
        return x, y

    def attack_config(self) -> AttackConfig | None:
        if self.attack_loss is None:
            return None
        return AttackConfig(
            norm=self.threat.norm,
            eps=self.threat.eps,
            step_size=self.threat.step_size,
            steps=self.threat.steps,
            loss=self.threat.loss or self.attack_loss,
            random_start=self.threat.random_start or self.attack_random_start,
            kappa=self.threat.kappa,
            l2_variant=self.threat.l2_variant,
            start_radius=self.threat.start_radius,
            clip=self.threat.clip,
        )

    def attack_model_mode(self) -> Mode:
        """The robust model's mode during the training attack: the spec's, else the method's.

        'train' is the attack of Rice et al.'s and CAT's code (`attack_pgd` on a model in training
        mode): BatchNorm normalises every attack forward by its own batch statistics and every one
        of them moves the running averages; `generate` then forwards the final x' once more, as
        `attack_pgd` does to choose among restarts, and the loop forwards x once more after the
        update(s), as those loops do to log training accuracy (`TrainingRun.train_step`). Those
        two forwards change no weight, only the running averages that evaluation uses.
        """
        return self.threat.model_mode or self.robust_mode_during_attack

    def build_teacher(self, experiment: Any, num_classes: int, in_channels: int) -> nn.Module | None:
        """The teacher network for this run, or None for methods without one."""
        return None

    def build_auxiliary(self, experiment: Any, in_channels: int) -> nn.Module | None:
        """An auxiliary network trained by `auxiliary_loss` with its own optimizer, or None."""
        return None

    def auxiliary_lr(self) -> float | None:
        """The auxiliary optimizer's learning rate at lr-schedule factor 1; None: optimization.lr."""
        return None

    def auxiliary_loss(self, robust: nn.Module, out: StepOutput, y: Tensor) -> Tensor:
        """The auxiliary network's objective, after the robust model's step, from `out.auxiliary_inputs`.

        `robust` is the updated robust model; the loop back-propagates into the auxiliary network's
        parameters only.
        """
        raise NotImplementedError(f"method {self.name!r} has no auxiliary network")

    def generate(self, robust: nn.Module, x: Tensor, y: Tensor) -> Tensor | None:
        config = self.attack_config()
        if config is None:
            return None
        x_adv = config.run(robust, x, y)
        if self.attack_model_mode() == "train":
            with torch.no_grad():
                robust(x_adv)  # attack_pgd's closing forward of x' (see attack_model_mode)
        return x_adv

    def compute_loss(
        self, robust: nn.Module, teacher: nn.Module | None, x: Tensor, x_adv: Tensor | None, y: Tensor
    ) -> StepOutput:
        """The training loss from training-mode forwards. Methods with an auxiliary network also
        take it as the keyword argument `auxiliary` (the loop passes it only to them)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        config = self.attack_config()
        return {
            "method": self.name,
            "attack": None if config is None else config.__dict__,
            "robust_mode_during_attack": self.attack_model_mode(),
            "teacher_mode_during_attack": self.teacher_mode_during_attack if self.uses_teacher else None,
        }


def teacher_from_spec(spec: Any, num_classes: int, in_channels: int) -> nn.Module:
    """A fresh teacher of the architecture in `spec.model.teacher` (LBGAT's M_natural)."""
    from trainer.models import create_model

    ref = spec.model.teacher
    return create_model(ref.name, num_classes=num_classes, in_channels=in_channels, **ref.kwargs())
