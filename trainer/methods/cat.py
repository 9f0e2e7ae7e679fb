"""Calibrated Adversarial Training (Huang, Menkovski, Pei, Pechenizkiy): CAT-cent and CAT-cw.

Follows the official code, TienjinHuang/Calibrated-adversarial-training (`Codes/Train_CIFAR10.py`,
`Train_CIFAR100.py`, `Train_MNIST.py`, `resnet.py`); Algorithm 1, per mini-batch:
1. x' = x + delta by PGD on CE ('cent') or CW_inf with confidence kappa ('cw') from a uniform start
   in the eps ball, the robust model f in **training** mode (`attack_pgd` runs on the model as the
   loop left it: BatchNorm on batch statistics, running averages moved by every attack forward,
   plus the closing forward of x'; `Method.attack_model_mode`). `threat_model.model_mode: eval`
   gives the eval-mode attack of the other methods here. The MNIST code starts from U(-0.1, 0.1) and
   never clips to [0, 1] (`threat_model.start_radius`, `threat_model.clip`; the MNIST presets).
2. The soft mask M = g_phi(x + delta) in (0, 1) (the mask network reads the adversarial example
   itself, trainer.models.cat_mask) and the calibrated example x_cali = x + M * delta (Eq. 10-11).
   Since 0 < M < 1 elementwise, x_cali lies between x and x' in every pixel: inside the eps ball
   and, whenever x' is, the [0, 1] box (so the official clamp of x_cali is a no-op).
3. theta is updated by Eq. 13, CE(f(x), y) * (1.0000001 - p_y(x)) + beta * KL(f(x) || f(x_cali)),
   with M held fixed (`losses.cat`); f(x_cali) is forwarded before f(x), the official CIFAR order
   (it decides BatchNorm's running averages). The shared loop steps f's optimizer.
4. phi is updated by Eq. 14, KL(f(x') || f(x_cali)) + beta1 * CE(f(x_cali), y), with the updated f
   in training mode (`losses.cat_mask`, `auxiliary_loss`); the loop steps g_phi's own optimizer
   (the official code: SGD with f's settings and lr schedule; Adam 1e-3 on MNIST). The mask of
   step 2 is reused: phi has not changed since, so recomputing it, as the official code does,
   gives the same mask (only g_phi's own running averages, which nothing reads, differ).
Then, as the official loop logs its training accuracy, the loop forwards x once more in training
mode (`TrainingRun.train_step`); the epoch metrics report that post-update clean accuracy.
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
    robust_mode_during_attack = "train"

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
            start_radius=self.threat.start_radius,
            clip=self.threat.clip,
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
        x_adv = x_adv.detach()
        delta = x_adv - x
        mask = auxiliary(x_adv)
        x_cali = x + mask.detach() * delta
        logits_cali = robust(x_cali)
        logits_nat = robust(x)
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
        mask = mask_net(x_adv)
        return mask, x + mask * (x_adv - x)
