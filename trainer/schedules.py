"""Learning-rate schedules of the papers, as a pure function of (epoch, step) so that resuming needs no state."""

from __future__ import annotations

import math

from api_schemas import OptimizationSpec


def learning_rate(opt: OptimizationSpec, epoch: int, step: int = 0, steps_per_epoch: int = 1) -> float:
    """The lr for optimisation step `step` of 0-based `epoch`.

    piecewise: lr * gamma^(number of milestones <= epoch), set per epoch (TRADES/LBGAT scripts), or
    with `per_step` of milestones <= epoch + (step + 1) / steps_per_epoch (Rice et al., ReBAT);
    cosine: per step from lr to 0 over the whole run; first_epoch_lr overrides epoch 0 (the official
    LBGAT script trains its first epoch at 0.02).
    """
    sched = opt.schedule
    if epoch == 0 and sched.first_epoch_lr is not None:
        return sched.first_epoch_lr
    if sched.kind == "constant":
        return opt.lr
    if sched.kind == "piecewise":
        t = epoch + (step + 1) / max(steps_per_epoch, 1) if sched.per_step else epoch
        return opt.lr * sched.gamma ** sum(1 for m in sched.milestones if t >= m)
    progress = (epoch + step / max(steps_per_epoch, 1)) / opt.epochs
    return 0.5 * opt.lr * (1 + math.cos(math.pi * min(progress, 1.0)))
