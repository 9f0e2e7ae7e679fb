"""Adversarial Logit Pairing as the LBGAT paper runs it: CE(f(x_adv)) + alpha * MSE(f(x_adv), f(x)).

The attack is PGD on CE from a uniform start (Kannan et al. pair logits of PGD examples).
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@register_method
class ALP(Method):
    name = "alp"
    attack_loss = "ce"
    attack_random_start = "uniform"

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits_adv = robust(x_adv)
        logits_nat = robust(x)
        loss = losses.alp(logits_nat, logits_adv, y, self.spec.alpha)
        return StepOutput(loss=loss, logits_adv=logits_adv, logits_nat=logits_nat)
