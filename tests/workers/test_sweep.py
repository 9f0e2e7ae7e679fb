"""A 4-trial Ray Tune sweep with ASHA, each trial a TorchTrainer run, results in S3."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from api_schemas.presets import get_preset
from workers import run as entry
from workers.storage import open_store
from workers.sweep import TrialRow, pareto_front


def test_pareto_front_hand_case():
    def row(name, clean, robust):
        return TrialRow(name, {}, "completed", 1, clean, robust, "pgd", "summary")

    rows = [
        row("a", 0.9, 0.3),
        row("b", 0.8, 0.5),
        row("c", 0.7, 0.4),
        row("d", 0.6, 0.6),
        row("e", 0.8, 0.5),
    ]
    front = pareto_front(rows)
    # c is dominated by b; b and e tie (neither dominates the other)
    assert [r.trial for r in front] == ["d", "b", "e", "a"]


@pytest.mark.usefixtures("ray_cluster")
def test_asha_sweep_writes_table_front_and_plot(s3_env, tmp_path):
    spec = get_preset(
        "digits",
        [
            "optimization.epochs=4",
            "optimization.schedule.milestones=[3]",
            "runtime.progress=false",
            "evaluation.attacks=[{kind: pgd, steps: 5, step_size: 0.03}]",
            "evaluation.on_best=false",
            "resources.cpus_per_worker=0.5",
            "sweep={parameters: {method.alpha: {kind: grid, values: [0.0, 1.0, 3.0, 6.0]}}, scheduler: asha,"
            " grace_period: 1, reduction_factor: 2, metric: val_pgd_acc}",
        ],
    )
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert entry.main(["--spec", str(path), "--experiment-id", "sweep4"]) == 0

    store = open_store(s3_env)
    prefix = "experiments/sweep4/"
    table = store.get_json(prefix + "trials.json")
    assert len(table) == 4
    assert sorted(r["params"]["method.alpha"] for r in table) == [0.0, 1.0, 3.0, 6.0]
    assert {r["status"] for r in table} <= {"completed", "stopped"}
    for r in table:
        assert 0 <= r["clean_accuracy"] <= 1 and 0 <= r["robust_accuracy"] <= 1
        if r["status"] == "completed":  # a finished trial has its own summary and checkpoints
            assert store.exists(f"{prefix}{r['trial']}/summary.json")
            assert store.exists(f"{prefix}{r['trial']}/checkpoints/last.pt")
    front = store.get_json(prefix + "pareto.json")
    assert front and {r["trial"] for r in front} <= {r["trial"] for r in table}
    assert {r["trial"] for r in front} == {r["trial"] for r in table if r["pareto"]}
    rows = list(csv.DictReader(io.StringIO(store.get_bytes(prefix + "trials.csv").decode())))
    assert len(rows) == 4 and "method.alpha" in rows[0]
    png = store.get_bytes(prefix + "plots/pareto.png")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # each trial's per-epoch metrics went through Tune to ASHA and into the store
    for r in table:
        lines = store.get_bytes(f"{prefix}{r['trial']}/metrics.jsonl").decode().splitlines()
        assert len(lines) == r["epochs"] and all("val" in json.loads(l) for l in lines)

    # the Tune run has a stable name in the store: running the same experiment again restores it
    # (finished trials are not trained again) instead of starting a second sweep
    before = {r["trial"]: r for r in table}
    assert entry.main(["--spec", str(path), "--experiment-id", "sweep4"]) == 0
    again = {r["trial"]: r for r in store.get_json(prefix + "trials.json")}
    assert again.keys() == before.keys()
    for trial, row in again.items():
        assert row["epochs"] == before[trial]["epochs"]
        assert row["clean_accuracy"] == before[trial]["clean_accuracy"]
