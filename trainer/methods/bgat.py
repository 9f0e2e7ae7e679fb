"""BGAT: the robust model's adversarial logits pulled to a fixed, pre-trained natural teacher.

The teacher (one checkpoint or the mean logits of an ensemble, as the paper's WideResNet +
InceptionResNetV2) is frozen: eval mode throughout, no gradient, not in the optimizer. The attack is
the same KL attack as LBGAT's. Ensemble members may have different architectures: each of our
checkpoints names its own, a plain state dict is rebuilt as `method.teacher_models[i]` (else
`model.teacher`).
"""

from __future__ import annotations

import torch
from torch import nn

from trainer import losses
from trainer.checkpoint import load_model
from trainer.methods import register_method
from trainer.methods.lbgat import LBGAT


class LogitEnsemble(nn.Module):
    """Mean of the members' logits; frozen."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(0)


@register_method
class BGAT(LBGAT):
    """Same attack and forwards as LBGAT; the teacher is loaded, frozen and gets no CE term."""

    name = "bgat"
    trains_teacher = False
    teacher_mode_during_attack = "eval"

    def build_teacher(self, experiment, num_classes, in_channels):
        paths = self.spec.teacher_checkpoints
        refs = self.spec.teacher_models or [experiment.model.teacher] * len(paths)
        members = []
        for path, ref in zip(paths, refs, strict=True):
            member = load_model(path, fallback_ref=ref, num_classes=num_classes, in_channels=in_channels)
            members.append(member)
        return LogitEnsemble(members)

    def teacher_logits(self, teacher, x):
        with torch.no_grad():
            return teacher(x)

    def guided_loss(self, logits_adv, logits_teacher, y, logits_nat):
        spec = self.spec
        return losses.bgat(
            logits_adv,
            logits_teacher,
            y,
            logits_nat=logits_nat,
            alpha=spec.alpha,
            regularizer=spec.regularizer,
            robust_ce=spec.robust_ce,
        )
