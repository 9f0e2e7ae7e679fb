"""The evaluation suite on a small trained model: attacks, AutoAttack, transfer, NRR and report shape."""

from __future__ import annotations

import pytest
import torch

from api_schemas import EvaluationSpec, ThreatModel
from api_schemas.results import nrr
from tests.trainer.helpers import digits_spec, trained_digits_model
from trainer.data import load_digits
from trainer.evaluation import accuracy, evaluate
from trainer.loop import TrainingRun

THREAT = ThreatModel(eps=0.1, step_size=0.025, steps=10)


@pytest.fixture(scope="module")
def model():
    return trained_digits_model(steps=200)


@pytest.fixture(scope="module")
def test_set():
    return load_digits(train=False)


def test_white_box_suite_report(model, test_set):
    suite = EvaluationSpec(
        attacks=[
            {"kind": "fgsm"},
            {"kind": "pgd", "steps": 1, "step_size": 0.1, "random_start": "none", "name": "pgd1"},
            {"kind": "pgd", "steps": 20, "step_size": 0.01},
            {"kind": "pgd", "steps": 20, "step_size": 0.01, "loss": "cw"},
            {"kind": "pgd", "steps": 20, "step_size": 0.05, "norm": "l2", "eps": 0.5, "name": "pgd20_l2"},
        ],
        n_examples=200,
    )
    model.train()
    report = evaluate(model, test_set, suite, THREAT)
    assert model.training, "evaluate must restore the model's mode"
    assert report.n_examples == 200
    clean = accuracy(model, test_set.subset(torch.arange(200)))
    assert report.clean_accuracy == pytest.approx(clean)
    assert clean > 0.8
    names = [a.name for a in report.attacks]
    assert names == ["fgsm", "pgd1", "pgd20", "cw20", "pgd20_l2"]
    fgsm, pgd1, pgd20 = report.attack("fgsm"), report.attack("pgd1"), report.attack("pgd20")
    # PGD-1 from x with step eps is FGSM
    assert pgd1.accuracy == pytest.approx(fgsm.accuracy)
    assert pgd20.accuracy < clean and pgd20.accuracy <= fgsm.accuracy + 0.02
    assert report.attack("pgd20_l2").params["norm"] == "l2"
    worst = min(report.attacks, key=lambda a: a.accuracy)
    assert report.robust_accuracy == worst.accuracy and report.worst_attack == worst.name
    assert report.nrr == pytest.approx(nrr(clean, worst.accuracy))
    assert report.mean == pytest.approx((clean + worst.accuracy) / 2)
    for a in report.attacks:
        assert a.nrr == pytest.approx(2 * clean * a.accuracy / (clean + a.accuracy))


def test_autoattack_custom_and_standard(model, test_set):
    suite = EvaluationSpec(
        attacks=[
            {"kind": "pgd", "steps": 20, "step_size": 0.01},
            {"kind": "autoattack", "version": "custom", "attacks": ["apgd-ce", "apgd-t"], "n_examples": 64},
            {"kind": "autoattack", "version": "standard", "n_examples": 16, "name": "aa_std"},
            {
                "kind": "autoattack",
                "version": "custom",
                "attacks": ["apgd-ce"],
                "norm": "l2",
                "eps": 0.5,
                "n_examples": 32,
                "name": "aa_l2",
            },
        ],
        n_examples=64,
    )
    report = evaluate(model, test_set, suite, THREAT)
    aa = report.attack("autoattack_custom")
    assert aa.n_examples == 64 and aa.params["attacks"] == ["apgd-ce", "apgd-t"]
    # AutoAttack is at least about as strong as PGD-20 on the same images
    assert aa.accuracy <= report.attack("pgd20").accuracy + 0.03
    std = report.attack("aa_std")
    assert std.n_examples == 16 and std.params["attacks"] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert 0 <= std.accuracy <= 1
    assert report.attack("aa_l2").params["norm"] == "l2"


def test_transfer_from_source_checkpoint(model, test_set, tmp_path):
    source_run = TrainingRun(digits_spec({"name": "natural"}, dataset={"train_limit": 512}), out_dir=tmp_path)
    for epoch in range(3):
        source_run.loader.set_epoch(epoch)
        for x, y in source_run.loader:
            source_run.train_step(x, y)
    source = source_run.save(tmp_path / "source.pt")
    suite = EvaluationSpec(
        attacks=[
            {"kind": "pgd", "steps": 10, "step_size": 0.02},
            {"kind": "transfer", "source_checkpoint": str(source), "steps": 10, "step_size": 0.02},
        ],
        n_examples=200,
    )
    report = evaluate(model, test_set, suite, THREAT)
    white, black = report.attack("pgd10"), report.attack("transfer")
    assert black.params["source_checkpoint"] == str(source)
    # transferred examples hurt less than white-box ones, and (a little) more than none
    assert white.accuracy < black.accuracy <= report.clean_accuracy
