"""BGAT: the robust model's adversarial logits pulled to a fixed, pre-trained natural teacher.

The teacher (one checkpoint or the mean logits of an ensemble, as the paper's WideResNet +
InceptionResNetV2) is frozen: eval mode throughout, no gradient, not in the optimizer. The attack is
the same KL attack as LBGAT's.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer import losses
from trainer.checkpoint import load_model
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


class LogitEnsemble(nn.Module):
    """Mean of the members' logits; frozen."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


@register_method
class BGAT(Method):
    name = "bgat"
    attack_loss = "kl"
    attack_random_start = "normal"
    uses_teacher = True
    trains_teacher = False
    teacher_mode_during_attack = "eval"

    def build_teacher(self, experiment, num_classes, in_channels):
        members = []
        for path in self.spec.teacher_checkpoints:
            member = load_model(
                path, fallback_ref=experiment.model.teacher, num_classes=num_classes, in_channels=in_channels
            )
            members.append(member)
        return LogitEnsemble(members)

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        spec = self.spec
        logits_adv = robust(x_adv)
        logits_nat = robust(x) if spec.regularizer != "none" else None
        with torch.no_grad():
            logits_teacher = teacher(x)
        loss = losses.bgat(
            logits_adv,
            logits_teacher,
            y,
            logits_nat=logits_nat,
            alpha=spec.alpha,
            regularizer=spec.regularizer,
            robust_ce=spec.robust_ce,
        )
        return StepOutput(
            loss=loss, logits_adv=logits_adv, logits_nat=logits_nat, logits_teacher=logits_teacher
        )
