"""Per-epoch metrics as Ray application metrics (workers/metrics_export.py): which gauges a metrics.jsonl
row sets, with which tags; the real export through Ray's agent to Prometheus is tests/e2e/test_web.py's."""

from __future__ import annotations

from typing import Any

from service.ray_jobs import job_metadata
from workers import metrics_export
from workers.metrics_export import EXPERIMENT_USER_ENV, EpochGauges


class FakeGauge:
    def __init__(self, name: str, description: str, tag_keys: tuple[str, ...]) -> None:
        self.name, self.tag_keys, self.values = name, tag_keys, []

    def set(self, value: float, tags: dict[str, str]) -> None:
        assert set(tags) == set(self.tag_keys), (self.name, tags)
        self.values.append((value, tags))


ROW: dict[str, Any] = {
    "epoch": 3,
    "lr": 0.01,
    "loss": 0.75,
    "train_adv_accuracy": 0.41,
    "train_clean_accuracy": 0.62,
    "teacher_accuracy": None,
    "test_clean_accuracy": 0.7,
    "images_per_second": 1234.5,
    "seconds": 2.0,
    "val": {"clean_acc": 0.66, "pgd_acc": 0.38},
    "extra": {"finished_at": 1.0},
}


def test_an_epoch_sets_every_gauge_with_the_runs_tags(monkeypatch) -> None:
    made: dict[str, FakeGauge] = {}

    def make(name, description, tag_keys):
        made[name] = FakeGauge(name, description, tag_keys)
        return made[name]

    monkeypatch.setenv(EXPERIMENT_USER_ENV, "alice")
    gauges = EpochGauges("lbgat-c10-1a2b3c4d", "main", make_gauge=make)
    gauges.report(ROW)
    gauges.report({**ROW, "epoch": 4, "loss": 0.5})
    tags = {"experiment": "lbgat-c10-1a2b3c4d", "trial": "main", "user": "alice"}
    assert made["lbgat_train_epoch"].values == [(3.0, tags), (4.0, tags)]
    assert made["lbgat_train_loss"].values[-1] == (0.5, tags)
    assert made["lbgat_train_learning_rate"].values[-1] == (0.01, tags)
    assert made["lbgat_train_images_per_second"].values[-1] == (1234.5, tags)
    accuracy = {t["kind"]: v for v, t in made["lbgat_train_accuracy"].values[:5]}
    assert accuracy == {
        "train_adv": 0.41,
        "train_clean": 0.62,
        "test_clean": 0.7,
        "val_clean": 0.66,
        "val_pgd": 0.38,
    }
    assert len(made) == 5, "each gauge is created once per run"


def test_a_failing_metrics_agent_never_fails_the_run(monkeypatch, caplog) -> None:
    class Broken(FakeGauge):
        def set(self, value, tags):
            raise ConnectionError("metrics agent down")

    monkeypatch.setattr(metrics_export, "_warned", False)
    gauges = EpochGauges("e", "t0", "bob", make_gauge=lambda *a: Broken(*a))
    gauges.report(ROW)
    gauges.report(ROW)
    assert [r.message for r in caplog.records].count(
        "could not export training metrics to Ray's metrics agent: metrics agent down"
    ) == 1


def test_without_the_control_plane_the_user_tag_says_so(monkeypatch) -> None:
    monkeypatch.delenv(EXPERIMENT_USER_ENV, raising=False)
    assert EpochGauges("e", "main", make_gauge=FakeGauge).tags["user"] == "unknown"


def test_the_ray_job_is_named_like_the_queue() -> None:
    meta = job_metadata(experiment_id="lbgat-c10-1a2b3c4d", name="lbgat-c10", user="alice")
    assert meta == {
        "job_name": "lbgat-c10 (lbgat-c10-1a2b3c4d) by alice",
        "lbgat_experiment": "lbgat-c10-1a2b3c4d",
        "lbgat_user": "alice",
    }
