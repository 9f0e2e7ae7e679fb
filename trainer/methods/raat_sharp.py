"""RAAT#: RAAT built on ReBAT's code (RAAT paper, Sec. 5.3 and Table 3).

Follows the official code, FlaAI/RAAT `RAAT#_Code_(Sec_5.3)/train_cifar.py` (ReBAT's
`train_cifar_wa.py` with RAAT's loss; run by its `train.sh`: PreActResNet-18, `--lr-factor 1.5
--beta 1.0`, no `--val`). Per step, with X and X_aug two random crops/flips of the same images
(`two_views`; the loop stacks them as x[:B], x[B:]):

1. delta = attack_pgd(model, X), delta_aug = attack_pgd(model, X_aug): two separate attacks (each its
   own batch, so each its own BatchNorm statistics), the model in training mode, each with its
   closing forward of x' (`Method.attack_model_mode`).
2. The boundary partition of the first view by the weight-averaged model f_wa under no_grad:
   misclassified f_wa(X) != y; boundary f_wa(X) == y, f_wa(X + delta) != y, f_wa(X + eta*delta) != y;
   non-boundary the rest (three separate forwards). f_wa plays RAAT's frozen copy theta-bar.
3. CE (mean over the B examples) of f on X + eta*delta for boundary samples and X + delta otherwise.
4. DICAR over the images whose two views f_wa classifies correctly (f_wa(X_aug) is a fourth
   forward): m = max(b, 1-b), b ~ Beta(gamma, gamma); JS_T(f(m x' + (1-m) x'_aug) ||
   m f(X) + (1-m) f(X_aug)) with f(X) and f(X_aug) two forwards. The forwards run whenever such
   images exist; the term is weighted by ReBAT's regulariser weight: beta from the epoch at which
   weight averaging starts (105), 0 before (`losses.raat_sharp`).
5. f(X + delta) once more (the script's `robust_output`, logged as the training robust accuracy);
   ReBAT's KL(f_wa(x') || f(x')) on it is commented out in the released script (`boat_beta`).
6. After the update the loop forwards X (the first view only, `post_step_view`) in training mode,
   then the average moves (decay 0 before epoch 105, 0.999 after).

The averaged model is in training mode until the end of the epoch in which averaging starts, as the
script's deepcopy of the training-mode model (`averaged_mode`; see trainer.methods.rebat): before
epoch 106 the partition uses batch statistics of each of its forwards. Everything else (learning
rate, data, selection) is ReBAT's; see the presets.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput
from trainer.methods.raat import boundary_partition
from trainer.methods.rebat import AveragedRegularizer


@register_method
class RAATSharp(AveragedRegularizer, Method):
    name = "raat_sharp"
    attack_loss = "ce"
    attack_random_start = "uniform"
    robust_mode_during_attack = "train"
    two_views = True
    uses_averaged = True

    def generate(self, robust: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        half = x.shape[0] // 2
        views = [super().generate(robust, x[:half], y[:half]), super().generate(robust, x[half:], y[half:])]
        return torch.cat(views)  # type: ignore[arg-type]

    def mix_weight(self) -> float:
        """m = max(b, 1 - b), b ~ Beta(gamma, gamma), from torch's global RNG (saved in checkpoints)."""
        gamma = torch.tensor(float(self.spec.gamma))
        b = torch.distributions.Beta(gamma, gamma).sample().item()
        return max(b, 1.0 - b)

    def post_step_view(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        half = x.shape[0] // 2
        return x[:half], y[:half]

    def compute_loss(self, robust, teacher, x, x_adv, y, *, averaged: nn.Module) -> StepOutput:  # type: ignore[override]
        spec = self.spec
        half = x.shape[0] // 2
        x_1, x_2 = x[:half], x[half:]
        adv_1, adv_2 = x_adv[:half], x_adv[half:]
        y_1 = y[:half]
        reduced = x_1 + spec.eta * (adv_1 - x_1)
        with torch.no_grad():  # separate forwards: in training mode each has its own statistics
            pred_nat = averaged(x_1).argmax(1)
            pred_adv = averaged(adv_1).argmax(1)
            pred_reduced = averaged(reduced).argmax(1)
        partition = boundary_partition(y_1, pred_nat, pred_adv, pred_reduced)
        boundary = partition.boundary.view(-1, *([1] * (x.dim() - 1)))
        logits_ce = robust(torch.where(boundary, reduced, adv_1))
        with torch.no_grad():
            pred_nat_2 = averaged(x_2).argmax(1)
        rows = (pred_nat == y_1) & (pred_nat_2 == y_1)
        if bool(rows.any()):
            mix = self.mix_weight()
            logits_mix = robust(mix * adv_1[rows] + (1 - mix) * adv_2[rows])
            nat_1, nat_2 = robust(x_1)[rows], robust(x_2)[rows]
        else:  # as the script: no forward, no draw, no term
            mix, logits_mix = 1.0, logits_ce[:0]
            nat_1 = nat_2 = logits_ce[:0]
        logits_adv = robust(adv_1)
        on = self.regularizer_on()
        logits_averaged = None
        if on and spec.boat_beta > 0:
            with torch.no_grad():
                logits_averaged = averaged(adv_1)
        loss = losses.raat_sharp(
            logits_ce,
            y_1,
            logits_mix,
            nat_1,
            nat_2,
            mix,
            beta=spec.beta if on else 0.0,
            temperature=spec.temperature,
            logits_adv=logits_adv,
            logits_adv_averaged=logits_averaged,
            boat_beta=spec.boat_beta if on else 0.0,
        )
        parts = {
            "non_boundary": partition.non_boundary.sum(),
            "boundary": partition.boundary.sum(),
            "misclassified": partition.misclassified.sum(),
            "dicar_rows": rows.sum(),
        }
        # the first view's x' (B of the 2B examples), as the script logs its robust accuracy
        return StepOutput(loss=loss, logits_adv=logits_adv, parts=parts)
