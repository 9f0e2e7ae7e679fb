"""LBGAT (Algorithm 1): M_robust and M_natural trained together by one optimizer.

Semantics of the official code (dvlab-research/LBGAT, lbgat.py), which this follows:
- attack: KL(f(x) || f(x_adv)) from x + 0.001*N(0,1), the robust model in eval mode, the teacher not
  involved (and left in training mode: the official script never switches it). `threat_model.loss:
  ce` selects the CE attack of the paper's Eq. 1 instead.
- loss, all models in training mode, forwards in the official order M_r(x_adv), M_r(x), M_n(x):
  MSE(M_r(x_adv), M_n(x)) + beta*CE(M_n(x), y) + alpha*R. The teacher gets gradients from both terms.
- with the TRADES or ALP regularizer M_r(x) is computed even at alpha = 0, as the official code does
  (that forward still updates BatchNorm statistics with clean data: LBGAT+TRADES(alpha=0) is not
  exactly plain LBGAT).
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput, teacher_from_spec


@register_method
class LBGAT(Method):
    name = "lbgat"
    attack_loss = "kl"
    attack_random_start = "normal"
    uses_teacher = True
    trains_teacher = True
    teacher_mode_during_attack = "train"

    def build_teacher(self, experiment, num_classes, in_channels):
        return teacher_from_spec(experiment, num_classes, in_channels)

    def teacher_logits(self, teacher, x):
        return teacher(x)

    def guided_loss(self, logits_adv, logits_teacher, y, logits_nat):
        spec = self.spec
        return losses.lbgat(
            logits_adv,
            logits_teacher,
            y,
            logits_nat=logits_nat,
            alpha=spec.alpha,
            beta=spec.beta,
            regularizer=spec.regularizer,
            robust_ce=spec.robust_ce,
        )

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits_adv = robust(x_adv)
        logits_nat = robust(x) if self.spec.regularizer != "none" else None
        logits_teacher = self.teacher_logits(teacher, x)
        loss = self.guided_loss(logits_adv, logits_teacher, y, logits_nat)
        return StepOutput(
            loss=loss, logits_adv=logits_adv, logits_nat=logits_nat, logits_teacher=logits_teacher
        )
