"""Per-example evaluation records (`trainer.evaluation.evaluate_records`): determinism, incremental
strengthening on the still-robust examples only, worst case, `summarize` and transfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from api_schemas import EvaluationSpec, ThreatModel
from api_schemas.evaluations import BROKEN_BY_CLEAN, NOT_BROKEN, summarize
from api_schemas.protocols import EvaluationSuite
from tests.trainer.helpers import trained_digits_model
from trainer import attacks as A
from trainer.data import load_digits
from trainer.evaluation import ExampleRecords, evaluate, evaluate_records, resolve_attacks, shard_seed

THREAT = ThreatModel(eps=0.1, step_size=0.025, steps=10)
SUITE = EvaluationSuite(
    threat_model=THREAT,
    attacks=[
        {"kind": "fgsm"},
        {"kind": "pgd", "steps": 10, "step_size": 0.02},
        {"kind": "pgd", "steps": 10, "step_size": 0.02, "loss": "cw"},
        {"kind": "autoattack", "version": "custom", "attacks": ["apgd-ce"]},
    ],
    batch_size=32,
)


@pytest.fixture(scope="module")
def model():
    return trained_digits_model(steps=200)


@pytest.fixture(scope="module")
def shard():
    return load_digits(train=False).subset(torch.arange(80))


@pytest.fixture(scope="module")
def full(model, shard) -> ExampleRecords:
    return evaluate_records(model, shard, SUITE.resolved_attacks(), seed=3, shard=1, start=80, batch_size=32)


def _same(a: ExampleRecords, b: ExampleRecords) -> None:
    for name in ("index", "label", "clean", "robust"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


def test_records_shape_and_determinism(model, shard, full):
    assert full.attacks == ["fgsm", "pgd10", "cw10", "autoattack_custom"]
    assert full.robust.dtype == np.int8 and full.robust.shape == (80, 4)
    np.testing.assert_array_equal(full.index, np.arange(80, 160))
    assert set(np.unique(full.robust)) <= {0, 1}  # nothing skipped in a plain run
    assert (full.robust[~full.clean] == 0).all()  # misclassified clean: robust to nothing
    assert full.clean.mean() > 0 and (full.robust[:, 1] == 1).sum() > 0
    assert (full.robust[:, 1] == 0).sum() > 0, "PGD should break some examples"
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    again = evaluate_records(model, shard, SUITE.resolved_attacks(), seed=3, shard=1, start=80, batch_size=32)
    assert torch.equal(torch.random.get_rng_state(), state), "evaluation must not touch the global stream"
    _same(full, again)
    # PGD's starts are drawn per shard, not per batch: another batch size changes no PGD record
    attacks = SUITE.resolved_attacks()[:3]
    small = evaluate_records(model, shard, attacks, seed=3, shard=1, start=80, batch_size=7)
    np.testing.assert_array_equal(small.robust, full.robust[:, :3])
    # another shard id draws other starts
    other = evaluate_records(model, shard, [attacks[1]], seed=3, shard=2, batch_size=32)
    assert other.params[0]["random_start"] == "uniform"
    broken = full.broken_by()
    assert broken.dtype == np.int16
    assert (broken[~full.clean] == BROKEN_BY_CLEAN).all()
    robust_all = full.clean & (full.robust == 1).all(1)
    assert (broken[robust_all] == NOT_BROKEN).all()
    for i in np.flatnonzero(full.clean & ~robust_all):
        assert full.robust[i, broken[i]] == 0 and (full.robust[i, : broken[i]] == 1).all()


def test_incremental_runs_only_on_still_robust_examples(model, shard, full):
    attacks = SUITE.resolved_attacks()
    base = evaluate_records(model, shard, attacks[:2], seed=3, shard=1, start=80, batch_size=32)
    np.testing.assert_array_equal(base.robust, full.robust[:, :2])
    extended = evaluate_records(
        model, shard, attacks, seed=3, shard=1, start=80, batch_size=32, reuse=base.head(2)
    )
    np.testing.assert_array_equal(extended.robust[:, :2], base.robust)
    assert extended.seconds["fgsm"] == 0.0 and extended.params[:2] == base.params
    still = base.clean & (base.robust == 1).all(1)
    cw = extended.robust[:, 2]
    assert (cw[~still] == -1).all() and set(cw[still]) <= {0, 1}
    # the same seed per example: where it ran, CW gives what it gives in a full run
    np.testing.assert_array_equal(cw[still], full.robust[still, 2])
    aa = extended.robust[:, 3]
    after_cw = still & (cw == 1)
    assert (aa[~after_cw] == -1).all() and set(aa[after_cw]) <= {0, 1}
    # the worst case of the cascade is the worst case of the full run on the white-box part
    np.testing.assert_array_equal(extended.worst_case(), after_cw & (aa == 1))
    assert extended.worst_case().sum() >= full.worst_case().sum() - 3  # AutoAttack batches differ
    assert extended.counts()["robust"] <= min(extended.counts()[a] for a in extended.attacks[:2])


def test_summarize_reproduces_every_number_and_worst_case_is_lowest(full):
    attacks = [
        {**d, "label": a.label()} for d, a in zip(SUITE.attack_dicts(), SUITE.resolved_attacks(), strict=True)
    ]
    summary = summarize(
        labels=full.label.tolist(),
        clean=full.clean.tolist(),
        robust=full.robust.tolist(),
        attacks=attacks,
        evaluation_id="e",
        protocol_id="custom",
        protocol_version="x",
        checkpoint_sha256="0" * 64,
        dataset="digits",
        norm="linf",
        eps=0.1,
        n_total=80,
        partial=False,
        seed=3,
        shard_size=80,
        n_shards=1,
    )
    counts = full.counts()
    assert summary.clean_accuracy == counts["clean"] / 80
    for result in summary.attacks:
        assert result.accuracy == counts[result.name] / 80
        assert summary.robust_accuracy <= result.accuracy
    assert summary.robust_accuracy == counts["robust"] / 80
    assert summary.autoattack_accuracy == counts["autoattack_custom"] / 80
    first = full.broken_by()
    worst = max(range(4), key=lambda j: ((first == j).sum(), -j))
    assert summary.worst_attack == full.attacks[worst]


def test_adversarial_images_are_the_first_breaking_attacks(model, shard):
    attacks = SUITE.resolved_attacks()[:3]
    records = evaluate_records(model, shard, attacks, seed=1, batch_size=32, save_adversarial=True)
    x = shard.images.float() / 255
    x_adv = torch.from_numpy(records.x_adv)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32
    assert (x_adv - x).abs().amax().item() <= 0.1 + 1e-6
    with torch.no_grad():
        wrong = model(x_adv).argmax(1) != shard.labels
    broken = records.clean & (records.robust == 0).any(1)
    assert wrong[torch.from_numpy(broken)].all()
    robust = records.worst_case()
    assert not wrong[torch.from_numpy(robust)].any()
    torch.testing.assert_close(x_adv[~torch.from_numpy(records.clean)], x[~torch.from_numpy(records.clean)])


def test_transfer_from_a_source_model(model, shard):
    source = trained_digits_model(steps=120, seed=5)
    given = EvaluationSpec(
        attacks=[
            {"kind": "pgd", "steps": 10, "step_size": 0.02},
            {"kind": "transfer", "source_checkpoint": "src", "steps": 10, "step_size": 0.02},
        ]
    ).attacks
    attacks = resolve_attacks(given, THREAT)
    records = evaluate_records(model, shard, attacks, batch_size=32, transfer_sources={"src": source})
    white, black = (records.robust == 1).sum(0)
    assert white < black <= records.clean.sum()
    assert records.params[1]["source_checkpoint"] == "src" and records.params[1]["eps"] == 0.1
    # the transferred examples are those of PGD on the source with the same seed
    run = torch.from_numpy(np.flatnonzero(records.clean))
    x = shard.images.float() / 255
    starts = A.initial_point(
        x,
        eps=0.1,
        norm="linf",
        random_start="uniform",
        generator=torch.Generator().manual_seed(shard_seed(0, 0, 1)),
    )
    adv = A.pgd(source, x[run], shard.labels[run], eps=0.1, step_size=0.02, steps=10, x_init=starts[run])
    with torch.no_grad():
        expected = (model(adv).argmax(1) == shard.labels[run]).numpy()
    np.testing.assert_array_equal(records.robust[run.numpy(), 1] == 1, expected)


def test_evaluate_is_a_reduction_of_the_records(model):
    test_set = load_digits(train=False)
    spec = EvaluationSpec(
        attacks=[
            {"kind": "pgd", "steps": 10, "step_size": 0.02},
            {"kind": "square", "n_queries": 20, "n_examples": 24},
        ],
        n_examples=60,
        batch_size=16,
    )
    report = evaluate(model, test_set, spec, THREAT, shard_size=25)
    parts = [
        evaluate_records(
            model,
            test_set.subset(torch.arange(a, min(a + 25, 60))),
            resolve_attacks(spec.attacks, THREAT),
            shard=k,
            start=a,
            batch_size=16,
            skip=np.array([[False, i >= 24] for i in range(a, min(a + 25, 60))]),
        )
        for k, a in enumerate(range(0, 60, 25))
    ]
    records = ExampleRecords.concat(parts)
    assert report.clean_accuracy == records.clean.mean()
    assert report.attack("pgd10").accuracy == (records.robust[:, 0] == 1).mean()
    square = report.attack("square20")
    assert square.n_examples == 24 and square.accuracy == (records.robust[:24, 1] == 1).mean()
    assert (records.robust[24:, 1] == -1).all()
