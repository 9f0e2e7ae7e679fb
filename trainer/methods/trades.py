"""TRADES: KL attack from x + 0.001*N(0,1) with the model in eval mode, then CE(f(x)) + alpha*KL.

In training mode the official code forwards f(x), f(x_adv) and f(x) again (inside the KL); the
second f(x) is identical to the first in training mode (same batch statistics), so this computes it
once: the loss and every gradient are the same, only BatchNorm's running averages see one update
fewer per step.
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@register_method
class Trades(Method):
    name = "trades"
    attack_loss = "kl"
    attack_random_start = "normal"

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits_nat = robust(x)
        logits_adv = robust(x_adv)
        loss = losses.trades(logits_nat, logits_adv, y, self.spec.alpha)
        return StepOutput(loss=loss, logits_adv=logits_adv, logits_nat=logits_nat)
