"""RAAT and RAAT++ (Robust Alignment Adversarial Training, App. C and Table 4 of the RAAT paper).

Every image is drawn twice with independent random crop/flip (`two_views`) and both views are
attacked together as one 2B batch, as the official code (FlaAI/RAAT, built on Tack et al.'s Cons-AT
code) does. With delta = x' - x the full adversarial perturbation, the reduced example is
x'' = x + eta * delta (eta = 0.1), and each of the 2B examples falls in one class:

- misclassified: f(x) != y                                   -> trained on the full x'
- boundary:      f(x) == y, f(x') != y and f(x'') != y       -> trained on the reduced x''
- non-boundary:  every other correctly classified example    -> trained on the full x'

(App. C, Eq. 9 defines a boundary sample by an x'' within eta*eps that is misclassified; the official
`adv_train_bd.py` / `mart_loss_bd` find it as x + eta*delta and also require the full x' to be
misclassified, which is what is done here.)

The frozen copy theta-bar. Table 4 writes the indicators with h_theta-bar, "a fixed copy of theta,
which means the corresponding terms are just used as indicators instead of parts of the
optimization objective". So the copy is the model as it is at this step, refreshed every step, with
no gradient: the indicators are computed in `generate`, right after the attack, by the current
weights in the attack's mode (eval, set by the loop) under `torch.no_grad()`, exactly as the official
code (which calls `model.eval()` and takes argmaxes as numpy arrays). No second set of weights is kept.

Loss, model in training mode:
- RAAT:   CE over the 2B training inputs (x' or x'') + lam * DICAR
- RAAT++: BCE over the same inputs + alpha * MART's weighted KL(f(x) || f(x')) + lam * DICAR
DICAR: for the images whose two views are both classified correctly, m = max(b, 1-b) with
b ~ Beta(gamma, gamma) drawn once per batch, JS(f(m x1' + (1-m) x2') || m f(x1) + (1-m) f(x2)) with
softmax temperature T (official code: logits interpolated, T = 0.5; `dicar_target: probabilities`
interpolates the probabilities as Eq. 15 writes it). Forwards follow the official order: RAAT
f(train inputs), f(mix), f(x); RAAT++ f(x'), f(x), f(train inputs), f(mix) (`mart_loss_bd`, whose
clean logits the DICAR term reuses: a second training-mode forward of the same batch is identical).
Attacks: RAAT uses the Cons-AT code's PGD on CE from a uniform start; RAAT++ MART's PGD on CE from
x + 0.001*N(0,1) (`mart_loss_bd`); both with the model in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from trainer import losses
from trainer.methods import register_method
from trainer.methods.base import Method, StepOutput


@dataclass(frozen=True)
class BoundaryPartition:
    """Boolean masks over the 2B examples; every example is in exactly one of the three."""

    non_boundary: Tensor
    boundary: Tensor
    misclassified: Tensor


def boundary_partition(
    y: Tensor, pred_nat: Tensor, pred_adv: Tensor, pred_reduced: Tensor
) -> BoundaryPartition:
    """Split examples by the frozen model's predictions on x, the full x' and the reduced x''."""
    correct = pred_nat == y
    boundary = correct & (pred_adv != y) & (pred_reduced != y)
    return BoundaryPartition(non_boundary=correct & ~boundary, boundary=boundary, misclassified=~correct)


@dataclass(frozen=True)
class BoundaryBatch:
    """What RAAT's `generate` hands to `compute_loss`: both adversarial examples and the partition."""

    x_adv: Tensor
    x_reduced: Tensor
    partition: BoundaryPartition

    def training_inputs(self) -> Tensor:
        """x'' for boundary examples, x' for all others (the official code's `data_ce`, unpermuted)."""
        boundary = self.partition.boundary.view(-1, *([1] * (self.x_adv.dim() - 1)))
        return torch.where(boundary, self.x_reduced, self.x_adv)


@register_method
class RAAT(Method):
    name = "raat"
    attack_loss = "ce"
    attack_random_start = "uniform"
    two_views = True

    def generate(self, robust: nn.Module, x: Tensor, y: Tensor) -> BoundaryBatch:  # type: ignore[override]
        x_adv = super().generate(robust, x, y)
        assert x_adv is not None
        x_reduced = x + self.spec.eta * (x_adv - x)
        with torch.no_grad():
            # eval mode: every example's output is independent of the batch, so one forward of the
            # three stacked inputs gives the official code's three forwards
            logits = robust(torch.cat([x, x_adv, x_reduced]))
            pred_nat, pred_adv, pred_reduced = logits.argmax(1).chunk(3)
        partition = boundary_partition(y, pred_nat, pred_adv, pred_reduced)
        return BoundaryBatch(x_adv=x_adv, x_reduced=x_reduced, partition=partition)

    def mix_weight(self) -> float:
        """m = max(b, 1 - b), b ~ Beta(gamma, gamma), from torch's global RNG (saved in checkpoints)."""
        gamma = torch.tensor(float(self.spec.gamma))
        b = torch.distributions.Beta(gamma, gamma).sample().item()
        return max(b, 1.0 - b)

    def dicar_inputs(
        self, robust: nn.Module, x: Tensor, batch: BoundaryBatch, logits_nat: Tensor | None, like: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, float, Tensor | None]:
        """Logits for DICAR on the images whose two views are both correctly classified.

        Returns (f(mix of x1', x2'), f(x1), f(x2)) restricted to those images, the mixing weight and
        the clean logits of all 2B examples (computed here when not given and some image qualifies).
        With no such image, as the official code, nothing is forwarded and no weight is drawn: the
        three are empty slices of `like` and the DICAR term is 0.
        """
        mis_1, mis_2 = batch.partition.misclassified.chunk(2)
        rows = ~(mis_1 | mis_2)
        if not bool(rows.any()):
            empty = like[:0]
            return empty, empty, empty, 1.0, logits_nat
        mix = self.mix_weight()
        adv_1, adv_2 = batch.x_adv.chunk(2)
        logits_mix = robust(mix * adv_1[rows] + (1 - mix) * adv_2[rows])
        if logits_nat is None:
            logits_nat = robust(x)
        nat_1, nat_2 = logits_nat.chunk(2)
        return logits_mix, nat_1[rows], nat_2[rows], mix, logits_nat

    @staticmethod
    def _parts(batch: BoundaryBatch, dicar_rows: int) -> dict[str, Tensor]:
        p = batch.partition
        return {
            "non_boundary": p.non_boundary.sum(),
            "boundary": p.boundary.sum(),
            "misclassified": p.misclassified.sum(),
            "dicar_rows": torch.tensor(dicar_rows),
        }

    def compute_loss(self, robust, teacher, x, x_adv: BoundaryBatch, y) -> StepOutput:  # type: ignore[override]
        spec = self.spec
        logits_train = robust(x_adv.training_inputs())
        mix_adv, nat_1, nat_2, mix, logits_nat = self.dicar_inputs(robust, x, x_adv, None, logits_train)
        loss = losses.raat(
            logits_train,
            y,
            mix_adv,
            nat_1,
            nat_2,
            mix,
            lam=spec.lam,
            temperature=spec.temperature,
            target=spec.dicar_target,
        )
        # train accuracy "adv" is measured on the training inputs (x'' for boundary examples)
        return StepOutput(
            loss=loss,
            logits_adv=logits_train,
            logits_nat=logits_nat,
            parts=self._parts(x_adv, mix_adv.shape[0]),
        )


@register_method
class RAATPP(RAAT):
    name = "raat_pp"
    attack_random_start = "normal"

    def compute_loss(self, robust, teacher, x, x_adv: BoundaryBatch, y) -> StepOutput:  # type: ignore[override]
        spec = self.spec
        logits_adv = robust(x_adv.x_adv)
        logits_nat = robust(x)
        logits_train = robust(x_adv.training_inputs())
        mix_adv, nat_1, nat_2, mix, _ = self.dicar_inputs(robust, x, x_adv, logits_nat, logits_train)
        loss = losses.raat_pp(
            logits_train,
            y,
            logits_nat,
            logits_adv,
            mix_adv,
            nat_1,
            nat_2,
            mix,
            lam=spec.lam,
            alpha=spec.alpha,
            temperature=spec.temperature,
            target=spec.dicar_target,
        )
        return StepOutput(
            loss=loss,
            logits_adv=logits_adv,
            logits_nat=logits_nat,
            parts=self._parts(x_adv, mix_adv.shape[0]),
        )
