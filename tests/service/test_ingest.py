"""Leaderboard fields read from a run's summary.json: the numbers, and what they mean (the precision
the weights were trained in, the split their checkpoint was selected on)."""

from __future__ import annotations

from api_schemas.jobs import ResultRow
from service.ingest import result_fields


def _report(clean: float, pgd: float, aa: float, **extra: object) -> dict[str, object]:
    return {
        "clean_accuracy": clean,
        "robust_accuracy": min(pgd, aa),
        "nrr": 2 * clean * min(pgd, aa) / (clean + min(pgd, aa)),
        "attacks": [
            {"name": "pgd20", "kind": "pgd", "accuracy": pgd},
            {"name": "autoattack", "kind": "autoattack", "accuracy": aa},
        ],
        **extra,
    }


def test_a_checkpoint_selected_on_the_test_set_is_marked_with_its_precision():
    summary = {
        "final": _report(0.80, 0.50, 0.47, training_precision="fp32"),
        "best": _report(0.82, 0.53, 0.49, training_precision="fp32", selection_split="test"),
        "precision": "fp32",
        "selection_split": "test",
    }
    row = result_fields(summary)
    assert row["clean_accuracy"] == 0.82 and row["autoattack_accuracy"] == 0.49
    assert row["attacks"] == {"pgd20": 0.53, "autoattack": 0.49}
    assert row["precision"] == "fp32" and row["selection_split"] == "test"
    parsed = ResultRow.model_validate(
        {
            **row,
            "experiment_id": "e",
            "name": "n",
            "owner": "o",
            "team": "t",
            "method": "trades",
            "dataset": "cifar10",
            "norm": "linf",
            "eps": 8 / 255,
        }
    )
    assert parsed.selection_split == "test" and parsed.precision == "fp32"


def test_the_last_epochs_model_has_no_selection_split():
    summary = {"final": _report(0.9, 0.4, 0.35, training_precision="bf16"), "best": None, "precision": "bf16"}
    row = result_fields(summary)
    assert row["clean_accuracy"] == 0.9 and row["precision"] == "bf16" and row["selection_split"] is None


def test_summaries_written_before_precision_was_recorded_still_ingest():
    row = result_fields({"final": _report(0.7, 0.3, 0.3)})
    assert row["precision"] is None and row["selection_split"] is None and row["nrr"] is not None
