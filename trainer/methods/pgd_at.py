"""Vanilla adversarial training (Madry et al.): CE on PGD-CE examples from a uniform random start.

The robust model is in eval mode while the attack runs, as in the TRADES/LBGAT code bases that the
LBGAT paper used to run its baselines.
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@register_method
class PGDAT(Method):
    name = "pgd_at"
    attack_loss = "ce"
    attack_random_start = "uniform"

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits_adv = robust(x_adv)
        return StepOutput(loss=losses.pgd_at(logits_adv, y), logits_adv=logits_adv)
