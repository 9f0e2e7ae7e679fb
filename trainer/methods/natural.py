"""Natural training: CE on clean inputs, no attack (the source model of the black-box tables)."""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@register_method
class Natural(Method):
    name = "natural"
    attack_loss = None

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits = robust(x)
        return StepOutput(loss=losses.natural(logits, y), logits_nat=logits)
