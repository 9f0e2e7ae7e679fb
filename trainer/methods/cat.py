"""Calibrated Adversarial Training (Huang, Menkovski, Pei, Pechenizkiy): CAT-cent and CAT-cw.

Algorithm 1, per mini-batch:
1. x' = x + delta by PGD on CE ('cent') or CW_inf with confidence kappa ('cw'), from a uniform start
   in the eps ball (Sec. 5.1.1: random start in training), the robust model f in eval mode as in
   the other methods here.
2. The soft mask M = g_phi(x, delta) in (0, 1) and the calibrated example x_cali = x + M * delta
   (Eq. 10-11). Since 0 < M < 1 elementwise, x_cali lies between x and x' in every pixel: inside
   the eps ball (l_inf and l_2) and the [0, 1] box whenever x' is.
3. theta is updated by Eq. 13, CE(f(x), y) * (1 - p_y(x)) + beta * KL(f(x) || f(x_cali)), with M
   held fixed (`losses.cat`); the shared loop steps f's optimizer.
4. phi is updated by Eq. 14, KL(f(x') || f(x_cali)) + beta1 * CE(f(x_cali), y), with the updated f
   (`losses.cat_mask`, `auxiliary_loss`); the shared loop steps g_phi's own optimizer. The mask of
   step 2 is reused: phi has not changed since, and its graph is still attached.

The paper gives no code; where it is silent (the mask network's input and upsampling, see
trainer.models.cat_mask; g_phi's optimizer, here f's settings and schedule at `mask_lr`; f's mode
in step 4, here training mode as in step 3), the choices are documented where they are made.
The step reports no adversarial logits: f(x_cali) is neither the clean nor the adversarial
prediction, so the epoch metrics show CAT's training accuracy on clean inputs only.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import AttackConfig, Method, StepOutput

#: CW_inf confidence of CAT-cw on CIFAR (App. C.2)
DEFAULT_KAPPA = 50.0


@register_method
class CAT(Method):
    name = "cat"
    attack_loss = "ce"
    attack_random_start = "uniform"

    def attack_config(self) -> AttackConfig:
        cw = self.spec.variant == "cw"
        return AttackConfig(
            norm=self.threat.norm,
            eps=self.threat.eps,
            step_size=self.threat.step_size,
            steps=self.threat.steps,
            loss="cw" if cw else "ce",
            random_start=self.threat.random_start or self.attack_random_start,
            kappa=(DEFAULT_KAPPA if self.spec.kappa is None else self.spec.kappa) if cw else 0.0,
        )

    def build_auxiliary(self, experiment, in_channels) -> nn.Module:
        from trainer.models import create_model

        return create_model(self.spec.mask_model, in_channels=in_channels)

    def auxiliary_lr(self) -> float | None:
        return self.spec.mask_lr

    def compute_loss(
        self,
        robust: nn.Module,
        teacher: nn.Module | None,
        x: Tensor,
        x_adv: Tensor | None,
        y: Tensor,
        *,
        auxiliary: nn.Module,
    ) -> StepOutput:
        assert x_adv is not None
        delta = (x_adv - x).detach()
        mask = auxiliary(x, delta)
        x_cali = x + mask.detach() * delta
        logits_nat = robust(x)
        logits_cali = robust(x_cali)
        loss = losses.cat(logits_nat, logits_cali, y, self.spec.beta)
        return StepOutput(
            loss=loss,
            logits_nat=logits_nat,
            auxiliary_inputs={"x": x, "x_adv": x_adv, "delta": delta, "mask": mask},
        )

    def auxiliary_loss(self, robust: nn.Module, out: StepOutput, y: Tensor) -> Tensor:
        x, x_adv, delta, mask = (out.auxiliary_inputs[k] for k in ("x", "x_adv", "delta", "mask"))
        with torch.no_grad():
            logits_adv = robust(x_adv)
        logits_cali = robust(x + mask * delta)
        return losses.cat_mask(logits_cali, logits_adv, y, self.spec.beta1)


def calibrate(mask_net: nn.Module, x: Tensor, x_adv: Tensor) -> tuple[Tensor, Tensor]:
    """The soft mask and the calibrated example x + M * (x_adv - x), detached (for analysis and plots)."""
    with torch.no_grad():
        delta = x_adv - x
        mask = mask_net(x, delta)
        return mask, x + mask * delta
