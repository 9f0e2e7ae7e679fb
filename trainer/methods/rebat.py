"""ReBAT: ReBalanced Adversarial Training (Wang, Li, Yang, Lin, Wang; NeurIPS 2023).

Follows the official code, PKU-ML/ReBAT `train_cifar_wa.py` (run as its README: `--val --lr-factor
1.5 --beta 1.0`, PreActResNet-18), which is Rice et al.'s robust-overfitting loop plus:

- a weight average (WA) of the model, `moving_average(model_wa, model, decay_rate, update_bn=True)`
  after every step: decay 0 (a plain copy) before `--warmup-epochs` 105, 0.999 from then on, BN
  running statistics averaged the same way (`optimization.weight_averaging: {decay: 0.999,
  start_epoch: 105, buffers: average}`);
- the BoAT regulariser: from the same epoch, the loss on x' gains
  beta * KL(softmax(f_wa(x')) || softmax(f(x'))) (`F.kl_div(..., reduction='batchmean')`, the WA
  model under no_grad), added only below 1e10; before it, plain PGD-AT (`losses.rebat`).

Modes, as the script: the attack is `attack_pgd` on the model in training mode (BatchNorm on batch
statistics, every attack forward moving the running averages, plus its closing forward of x'), the
loss in training mode, then the loop forwards x once more in training mode after the update and
before the average moves (the script's `output = model(normalize(X))`); see
`Method.attack_model_mode`. The WA copy is a deepcopy of the training-mode model that the script
first switches to eval mode when it first evaluates it, at the end of the epoch in which averaging
starts: during that epoch its forwards use batch statistics (`averaged_mode: train_until_start`;
`eval` uses its running averages throughout).

Learning rate: piecewise, lr_max / 1.5 at epoch 100 and / 1.5^2 at 150 of 200, evaluated at
epoch + (i + 1) / n (`schedule.per_step_piecewise`). The script's `--use-reg-schedule` (off in every
command of its README), its CutMix and ReBAT++'s stronger attack are not implemented.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, Mode, StepOutput


class AveragedRegularizer:
    """The part ReBAT and RAAT# share: when their regulariser is on, and the averaged model's mode."""

    spec: object
    epoch: int
    start_epoch: int = 0

    def setup(self, experiment) -> None:
        averaging = experiment.optimization.weight_averaging
        if averaging is None:  # the spec refuses this; a method built by hand may not have one
            raise ValueError(f"method '{experiment.method.name}' needs optimization.weight_averaging")
        self.start_epoch = averaging.start_epoch

    def regularizer_on(self) -> bool:
        """From the epoch at which weight averaging starts (the scripts' `epoch >= warmup_epochs`)."""
        return self.epoch >= self.start_epoch

    def averaged_mode(self) -> Mode:
        if self.spec.averaged_mode == "train_until_start" and self.epoch <= self.start_epoch:  # type: ignore[attr-defined]
            return "train"
        return "eval"


@register_method
class ReBAT(AveragedRegularizer, Method):
    name = "rebat"
    attack_loss = "ce"
    attack_random_start = "uniform"
    robust_mode_during_attack = "train"
    uses_averaged = True

    def compute_loss(self, robust, teacher, x, x_adv, y, *, averaged: nn.Module) -> StepOutput:  # type: ignore[override]
        logits_adv = robust(x_adv)
        beta = self.spec.beta if self.regularizer_on() else 0.0
        logits_averaged: Tensor | None = None
        if beta > 0:  # the script forwards the averaged model only then
            with torch.no_grad():
                logits_averaged = averaged(x_adv)
        loss = losses.rebat(logits_adv, logits_averaged, y, beta)
        return StepOutput(loss=loss, logits_adv=logits_adv, parts={"beta": torch.tensor(beta)})
