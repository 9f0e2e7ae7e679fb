"""CAT's evaluation protocol and the l_2 threat model: Square, CW_inf confidence, PGD without random
start, FGSM l_2, AutoAttack l_2, and l_2 training with l_2 selection."""

from __future__ import annotations

import json

import pytest
import torch

from api_schemas import EvaluationSpec, ThreatModel
from tests.trainer.helpers import digits_batch, digits_spec, trained_digits_model
from trainer import attacks
from trainer.data import load_digits
from trainer.evaluation import evaluate
from trainer.loop import TrainingRun

THREAT = ThreatModel(eps=0.1, step_size=0.025, steps=10)
L2 = ThreatModel(norm="l2", eps=0.5, step_size=0.125, steps=10)


@pytest.fixture(scope="module")
def model():
    return trained_digits_model(steps=200)


@pytest.fixture(scope="module")
def test_set():
    return load_digits(train=False)


def test_square_attack_with_few_queries(model, test_set):
    suite = EvaluationSpec(
        attacks=[
            {"kind": "square", "n_queries": 40, "n_examples": 48},
            {"kind": "square", "n_queries": 40, "n_examples": 48, "norm": "l2", "eps": 0.5, "name": "sq_l2"},
        ],
        n_examples=64,
    )
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    report = evaluate(model, test_set, suite, THREAT)
    # pyautoattack reseeds the global generator; evaluation must leave the run's stream alone
    assert torch.equal(torch.random.get_rng_state(), state)
    square = report.attack("square40")
    assert square.kind == "square" and square.n_examples == 48
    assert square.params["n_queries"] == 40 and square.params["norm"] == "linf"
    clean48 = EvaluationSpec(attacks=[], n_examples=48)
    clean = evaluate(model, test_set, clean48, THREAT).clean_accuracy
    # a black-box search only ever turns correct examples wrong, and 40 queries already find some
    assert square.accuracy < clean
    assert report.attack("sq_l2").params["norm"] == "l2" and report.attack("sq_l2").accuracy <= clean
    # the same seed gives the same result
    again = evaluate(model, test_set, suite, THREAT)
    assert again.attack("square40").accuracy == square.accuracy


def test_square_default_is_5000_queries():
    assert EvaluationSpec(attacks=[{"kind": "square"}]).attacks[0].n_queries == 5000


def test_cw_confidence_keeps_pushing_misclassified_examples(model):
    x, y = digits_batch(64, seed=11)
    # push every example across the boundary first, then continue with CW from there
    x_wrong = attacks.pgd(model, x, y, eps=0.3, step_size=0.05, steps=20)
    with torch.no_grad():
        crossed = model(x_wrong).argmax(1) != y
    start, labels = x_wrong[crossed][:8], y[crossed][:8]
    assert len(start) > 0
    kw = {"eps": 0.1, "step_size": 0.01, "steps": 5, "loss": "cw", "random_start": "none"}
    # kappa 0: the margin term is clamped once the example is wrong, no gradient, no movement
    still = attacks.pgd(model, start, labels, kappa=0.0, **kw)
    torch.testing.assert_close(still, start, rtol=0, atol=0)
    # kappa 50 (CAT's CW_inf): it keeps lowering the margin down to -50
    pushed = attacks.pgd(model, start, labels, kappa=50.0, **kw)
    assert not torch.equal(pushed, start)
    margin = lambda inp: -attacks.cw_margin(model(inp).detach(), labels, kappa=1e9)  # noqa: E731
    assert (margin(pushed) <= margin(start) + 1e-6).all() and margin(pushed).mean() < margin(start).mean()


def test_pgd_without_random_start_is_deterministic(model, test_set):
    suite = EvaluationSpec(
        attacks=[
            {"kind": "pgd", "steps": 20, "step_size": 0.003, "random_start": "none", "name": "pgd20_nrs"},
            {"kind": "pgd", "steps": 30, "step_size": 0.003, "loss": "cw", "kappa": 50, "name": "cw30"},
        ],
        n_examples=64,
    )
    torch.manual_seed(1)
    a = evaluate(model, test_set, suite, THREAT)
    torch.manual_seed(2)
    b = evaluate(model, test_set, suite, THREAT)
    assert a.attack("pgd20_nrs").accuracy == b.attack("pgd20_nrs").accuracy
    x, y = digits_batch(16)
    torch.manual_seed(3)
    first = attacks.pgd(model, x, y, eps=0.1, step_size=0.01, steps=5)
    torch.manual_seed(4)
    torch.testing.assert_close(
        attacks.pgd(model, x, y, eps=0.1, step_size=0.01, steps=5), first, rtol=0, atol=0
    )
    assert a.attack("cw30").params["kappa"] == 50


def test_fgsm_l2_is_one_normalised_step(model):
    x, y = digits_batch(16, seed=2)
    x_adv = attacks.fgsm(model, x, y, eps=0.5, norm="l2")
    size = (x_adv - x).flatten(1).norm(dim=1)
    assert size.max() <= 0.5 + 1e-5 and size.mean() > 0.3  # box clipping may shorten some
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_l2_threat_model_resolves_fgsm_pgd_and_autoattack(model, test_set):
    suite = EvaluationSpec(
        attacks=[
            {"kind": "fgsm"},
            {"kind": "pgd", "steps": 10, "step_size": None, "name": "pgd10"},
            # standard minus FAB-T and Square (slow on a CPU); the norm comes from the threat model
            {
                "kind": "autoattack",
                "version": "custom",
                "attacks": ["apgd-ce", "apgd-t"],
                "n_examples": 16,
                "name": "aa",
            },
        ],
        n_examples=32,
    )
    report = evaluate(model, test_set, suite, L2)
    assert report.attack("fgsm").params["norm"] == "l2"
    pgd = report.attack("pgd10").params
    assert (pgd["norm"], pgd["eps"], pgd["step_size"]) == ("l2", 0.5, 0.125)
    aa = report.attack("aa")
    assert aa.params["norm"] == "l2" and aa.params["eps"] == 0.5 and aa.n_examples == 16
    assert report.attack("pgd10").accuracy < report.clean_accuracy


def test_l2_training_and_selection_run_end_to_end(tmp_path):
    spec = digits_spec(
        {"name": "fat", "variant": "ce", "tau_milestones": []},
        dataset={"train_limit": 160, "val_size": 32},
        threat_model={"norm": "l2", "eps": 0.5, "step_size": 0.125, "steps": 3},
        evaluation={
            "attacks": [{"kind": "pgd", "steps": 3, "step_size": 0.125}, {"kind": "fgsm"}],
            "n_examples": 32,
        },
        selection={"metric": "clean_plus_pgd", "attack": {"steps": 3, "step_size": None}},
    )
    summary = TrainingRun(spec, out_dir=tmp_path).fit()
    assert summary.final.attack("fgsm").params["norm"] == "l2"
    assert summary.best_epoch is not None and summary.best is not None
    # best checkpoint by CAT's criterion: clean + PGD accuracy on the held-out split
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    sums = [line["val"]["clean_acc"] + line["val"]["pgd_acc"] for line in lines]
    assert summary.best_metric == pytest.approx(max(sums))
    assert summary.best_epoch == 1 + sums.index(max(sums))
