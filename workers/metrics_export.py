"""Per-epoch training metrics as Ray application metrics, so that they appear where the cluster's
metrics already go (Ray's metrics agent -> Prometheus -> Grafana and the Ray dashboard's charts).

Rank 0 of each run sets one gauge per quantity after every epoch, tagged with the experiment id, the
trial and the submitting user (`LBGAT_EXPERIMENT_USER`, which the control plane puts in the Ray job's
environment). Prometheus names carry Ray's `ray_` prefix:

* `ray_lbgat_train_epoch`, `ray_lbgat_train_loss`, `ray_lbgat_train_learning_rate`,
  `ray_lbgat_train_images_per_second` - tags `experiment`, `trial`, `user`;
* `ray_lbgat_train_accuracy` - the same tags plus `kind`: `train_adv`, `train_clean`, `test_clean`,
  `teacher`, `val_clean`, `val_pgd` (the accuracies the epoch measured).

A metrics agent that does not answer must never cost a training run: a failure to record is logged
once per process and training goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("workers.metrics")

EXPERIMENT_USER_ENV = "LBGAT_EXPERIMENT_USER"
TAG_KEYS = ("experiment", "trial", "user")

#: metrics.jsonl field -> the `kind` tag of ray_lbgat_train_accuracy
ACCURACY_FIELDS = {
    "train_adv_accuracy": "train_adv",
    "train_clean_accuracy": "train_clean",
    "test_clean_accuracy": "test_clean",
    "teacher_accuracy": "teacher",
}
VAL_FIELDS = {"clean_acc": "val_clean", "pgd_acc": "val_pgd"}

# name -> (description, extra tag keys)
GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lbgat_train_epoch": ("Epochs finished by the run", ()),
    "lbgat_train_loss": ("Training loss of the last epoch", ()),
    "lbgat_train_learning_rate": ("Learning rate at the end of the last epoch", ()),
    "lbgat_train_images_per_second": ("Training throughput of the last epoch (images/s, all workers)", ()),
    "lbgat_train_accuracy": ("Accuracies measured in the last epoch (0-1), by kind", ("kind",)),
}

_warned = False


def _ray_gauge(name: str, description: str, tag_keys: tuple[str, ...]) -> Any:
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=tag_keys)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def epoch_values(metrics: Mapping[str, Any]) -> list[tuple[str, float, dict[str, str]]]:
    """(gauge, value, extra tags) for one metrics.jsonl row; fields the epoch did not measure are left out."""
    out: list[tuple[str, float, dict[str, str]]] = []
    for field, name in (
        ("epoch", "lbgat_train_epoch"),
        ("loss", "lbgat_train_loss"),
        ("lr", "lbgat_train_learning_rate"),
        ("images_per_second", "lbgat_train_images_per_second"),
    ):
        value = _number(metrics.get(field))
        if value is not None:
            out.append((name, value, {}))
    for field, kind in ACCURACY_FIELDS.items():
        value = _number(metrics.get(field))
        if value is not None:
            out.append(("lbgat_train_accuracy", value, {"kind": kind}))
    for field, kind in VAL_FIELDS.items():
        value = _number((metrics.get("val") or {}).get(field))
        if value is not None:
            out.append(("lbgat_train_accuracy", value, {"kind": kind}))
    return out


class EpochGauges:
    """The gauges of one run (experiment, trial, user); `report(row)` after each epoch."""

    def __init__(
        self,
        experiment_id: str,
        trial: str,
        user: str | None = None,
        *,
        make_gauge: Callable[[str, str, tuple[str, ...]], Any] = _ray_gauge,
    ) -> None:
        self.tags = {
            "experiment": experiment_id,
            "trial": trial,
            "user": user if user is not None else os.environ.get(EXPERIMENT_USER_ENV, "") or "unknown",
        }
        self._make = make_gauge
        self._gauges: dict[str, Any] = {}

    def _gauge(self, name: str) -> Any:
        if name not in self._gauges:
            description, extra = GAUGES[name]
            self._gauges[name] = self._make(name, description, TAG_KEYS + extra)
        return self._gauges[name]

    def report(self, metrics: Mapping[str, Any]) -> None:
        global _warned
        try:
            for name, value, extra in epoch_values(metrics):
                self._gauge(name).set(value, tags={**self.tags, **extra})
        except Exception as exc:  # the metrics agent is a convenience, never a reason to fail a run
            if not _warned:
                _warned = True
                log.warning("could not export training metrics to Ray's metrics agent: %s", exc)
