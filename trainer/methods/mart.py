"""MART (Wang et al., ICLR 2020): misclassification-aware adversarial training.

Semantics of the official code (YisenWang/MART, mart.py), which this follows:
- attack: PGD on CE from x + 0.001*N(0,1), the model in eval mode;
- loss, model in training mode, forwards in the official order f(x), f(x_adv):
  BCE(f(x_adv), y) + alpha * sum_k KL(p(x) || p(x_adv)) * (1 - p_y(x)), both averaged over the batch
  (`trainer.losses.mart`). Nothing is detached: the clean logits get gradients from the KL and its weight.
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@register_method
class MART(Method):
    name = "mart"
    attack_loss = "ce"
    attack_random_start = "normal"

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits_nat = robust(x)
        logits_adv = robust(x_adv)
        loss = losses.mart(logits_nat, logits_adv, y, self.spec.alpha)
        return StepOutput(loss=loss, logits_adv=logits_adv, logits_nat=logits_nat)
