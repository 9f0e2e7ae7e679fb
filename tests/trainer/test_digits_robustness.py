"""On a real dataset (scikit-learn's digits), adversarial training buys clearly more PGD robustness.

Same model, data, schedule and PGD-20 evaluation for all runs; only the method differs.
"""

from __future__ import annotations

import pytest

from api_schemas.presets import get_preset
from trainer.loop import TrainingRun

COMMON = [
    "optimization.epochs=12",
    "optimization.schedule.milestones=[9]",
    "runtime.progress=false",
    "evaluation.attacks=[{kind: pgd, steps: 20, step_size: 0.01}]",
    "evaluation.on_best=false",
    "selection.metric=null",
]
METHODS = {
    "natural": ["method={name: natural}", "model.teacher=null"],
    "pgd_at": ["method={name: pgd_at}", "model.teacher=null"],
    "lbgat": [],  # the preset itself: LBGAT+TRADES(alpha=0)
    "cat": ["method={name: cat, mask_model: cat_mask_mnist_cnn}", "model.teacher=null"],  # CAT-cent
    "fat": ["method={name: fat}", "model.teacher=null"],  # FAT for TRADES
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for name, overrides in METHODS.items():
        spec = get_preset("digits", COMMON + overrides)
        summary = TrainingRun(spec, out_dir=tmp_path_factory.mktemp(name)).fit()
        out[name] = (summary.final.clean_accuracy, summary.final.attack("pgd20").accuracy)
    return out


def test_adversarial_training_beats_natural_training_on_pgd(results):
    nat_clean, nat_pgd = results["natural"]
    assert nat_clean > 0.95
    for name in ("pgd_at", "lbgat", "cat", "fat"):
        clean, pgd = results[name]
        assert pgd > nat_pgd + 0.2, f"{name}: PGD-20 accuracy {pgd:.3f} vs natural {nat_pgd:.3f}"
        assert clean > 0.9, f"{name}: clean accuracy {clean:.3f}"
