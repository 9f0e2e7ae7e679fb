"""Cons-AT (Tack et al., AAAI 2022): consistency regularisation between two augmentations' attacks.

Semantics of the official code (alinlab/consistency-adversarial, adv_train_consistency.py), the code
base the RAAT paper ran its Table 1/5 baselines with:
- every image is drawn twice with independent random crop/flip (`two_views`); both views are attacked
  together as one 2B batch by PGD on CE from a uniform random start, the model in eval mode
  (advertorch's PGDAttack inside `EvalBN`);
- loss, training mode, one forward of the 2B adversarial examples: CE averaged over all 2B +
  lam * JS(p(x1') || p(x2')) with softmax temperature T (`trainer.losses.cons_at`).
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@register_method
class ConsAT(Method):
    name = "cons_at"
    attack_loss = "ce"
    attack_random_start = "uniform"
    two_views = True

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        logits_adv = robust(x_adv)
        first, second = logits_adv.chunk(2)
        spec = self.spec
        loss = losses.cons_at(first, second, y[: len(first)], spec.lam, spec.temperature)
        return StepOutput(loss=loss, logits_adv=logits_adv)
