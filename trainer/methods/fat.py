"""Friendly Adversarial Training (Zhang et al., ICML 2020): train on friendly, early-stopped PGD examples.

The attack is PGD that stops each example tau steps after it first crosses the decision boundary
(trainer.attacks.pgd with `early_stop_tau`), following the official `earlystop.py`; the outer loss
is unchanged from the base method. Variants, as the official scripts run them:
- 'trades' (FAT_for_TRADES.py; the FAT baseline of CAT's Tables 2-3): KL attack from
  x + 0.001*N(0,1), model in eval mode, TRADES loss CE(f(x), y) + alpha * KL(f(x) || f(x_adv));
  dynamic tau 0, 1, 2, 3 from (1-based) epochs 31, 51, 71; omega 0.
- 'ce' (FAT.py): CE attack from a uniform start, omega 0.001 noise per step, CE on the friendly
  examples; dynamic tau 0, 1, 2 from epochs 51 and 91.
The official code reorders the batch (stopped examples first) before the loss; the losses are
per-example means, so keeping the order changes nothing. One difference: the official 'trades'
start x + 0.001*N(0,1) is clipped to [0, 1], ours is TRADES' unclipped start (the first step's
projection clips it); only the very first early-stopping check can see the difference.
"""

from __future__ import annotations

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import AttackConfig, Method, StepOutput

#: official dynamic tau: 0-based epochs from which tau is one larger (FAT_for_TRADES.py, FAT.py)
DYNAMIC_TAU_MILESTONES = {"trades": (30, 50, 70), "ce": (50, 90)}
DEFAULT_OMEGA = {"trades": 0.0, "ce": 0.001}
DEFAULT_ALPHA = 6.0


@register_method
class FAT(Method):
    name = "fat"

    @property
    def attack_loss(self) -> str:  # type: ignore[override]
        return "kl" if self.spec.variant == "trades" else "ce"

    @property
    def attack_random_start(self) -> str:  # type: ignore[override]
        return "normal" if self.spec.variant == "trades" else "uniform"

    def tau(self, epoch: int) -> int:
        """tau in the given (0-based) epoch: the spec's tau plus one per milestone reached."""
        milestones = self.spec.tau_milestones
        if milestones is None:
            milestones = DYNAMIC_TAU_MILESTONES[self.spec.variant]
        return self.spec.tau + sum(1 for m in milestones if epoch >= m)

    def attack_config(self) -> AttackConfig:
        omega = self.spec.omega if self.spec.omega is not None else DEFAULT_OMEGA[self.spec.variant]
        return AttackConfig(
            norm=self.threat.norm,
            eps=self.threat.eps,
            step_size=self.threat.step_size,
            steps=self.threat.steps,
            loss=self.threat.loss or self.attack_loss,
            random_start=self.threat.random_start or self.attack_random_start,
            kappa=self.threat.kappa,
            early_stop_tau=self.tau(self.epoch),
            step_noise=omega,
        )

    def compute_loss(self, robust, teacher, x, x_adv, y) -> StepOutput:
        variant = self.spec.variant
        logits_nat = robust(x) if variant == "trades" else None
        logits_adv = robust(x_adv)
        alpha = self.spec.alpha if self.spec.alpha is not None else DEFAULT_ALPHA
        loss = losses.fat(logits_adv, y, logits_nat=logits_nat, alpha=alpha, variant=variant)
        return StepOutput(loss=loss, logits_adv=logits_adv, logits_nat=logits_nat)
