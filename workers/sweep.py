"""Hyper-parameter sweeps: Ray Tune trials that each fit their own TorchTrainer (the Train V2 pattern).

Every trial is a Tune function (`_trial_driver`) that applies its sampled values to the base spec,
validates the result like any spec, and fits a TorchTrainer whose per-epoch reports reach Tune
through `TuneReportCallback` (what ASHA needs to stop trials early). The Tuner's state lives in the
store under experiments/<id>/tune with a stable name, so a sweep whose driver died is restored
rather than restarted. The result is the trial table, the clean-vs-robust Pareto front and a plot.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from api_schemas import ExperimentSpec, SpecError, TrainSummary, apply_overrides, parse_spec
from workers.preemption import Preempted, stop_requested
from workers.settings import StoreSettings, gpu_resource
from workers.storage import ArtifactStore, KeyNotFound, experiment_prefix, open_store
from workers.training import cluster_has_gpus, make_trainer

log = logging.getLogger("workers.sweep")

TUNE_RUN_NAME = "tune"
DRIVER_CPU = 0.01  # a trial driver only waits on its TorchTrainer; it must not hold a whole core


@dataclass
class TrialRow:
    trial: str
    params: dict[str, Any]
    status: str
    epochs: int | None
    clean_accuracy: float | None
    robust_accuracy: float | None
    robust_attack: str | None
    source: str  # "summary" (final evaluation) or "metrics.jsonl" (stopped early: last validation)
    pareto: bool = False


def _domain(domain: Any) -> Any:
    kind = domain.kind
    if kind == "grid":
        return tune.grid_search(list(domain.values))
    if kind == "choice":
        return tune.choice(list(domain.values))
    if kind == "uniform":
        return tune.uniform(domain.low, domain.high)
    if kind == "loguniform":
        return tune.loguniform(domain.low, domain.high)
    return tune.randint(domain.low, domain.high)


def _override(path: str, value: Any) -> str:
    return f"{path}={json.dumps(value)}"


def trial_spec(base: ExperimentSpec, params: dict[str, Any]) -> ExperimentSpec:
    """The base spec with one trial's sampled values; validated, so a bad combination fails loudly."""
    data = base.model_dump(mode="json")
    data["sweep"] = None
    data = apply_overrides(data, [_override(path, value) for path, value in params.items()])
    return parse_spec(data, source=f"trial {params}")


def _trial_driver(
    config: dict[str, Any], *, base: dict[str, Any], experiment_id: str, settings: StoreSettings
) -> None:
    # Runs inside a Tune trial actor. The settings object (with the store secret) travels pickled
    # with this function because the actor does not inherit the driver's environment.
    spec = trial_spec(ExperimentSpec.model_validate(base), config)
    trial = "trial_" + tune.get_context().get_trial_id()
    store = open_store(settings)
    trainer = make_trainer(
        spec,
        experiment_id=experiment_id,
        trial=trial,
        store=store,
        settings=settings,
        callbacks=[TuneReportCallback()],
    )
    result = trainer.fit()
    if (result.metrics or {}).get("preempted"):
        # an errored trial is run again by Tuner.restore(resume_errored=True), from its checkpoint
        raise Preempted(f"{experiment_id}/{trial}: preempted; just-in-time checkpoint saved")


def max_concurrent_trials(spec: ExperimentSpec) -> int:
    sweep, res = spec.sweep, spec.resources
    assert sweep is not None
    if sweep.max_concurrent_trials is not None:
        return sweep.max_concurrent_trials
    total = ray.cluster_resources()
    use_gpu = cluster_has_gpus() if res.use_gpu is None else res.use_gpu
    if use_gpu:
        return max(1, math.floor(total.get(gpu_resource(), 0) / (res.num_workers * res.gpus_per_worker)))
    return max(1, math.floor(total.get("CPU", 1) / (res.num_workers * res.cpus_per_worker + DRIVER_CPU)))


def _search_alg(spec: ExperimentSpec):
    sweep = spec.sweep
    if sweep.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError as exc:  # optuna missing
            raise SpecError(
                [{"loc": "sweep.search", "msg": f"optuna is not installed here ({exc}); pip install optuna"}]
            ) from None
        return OptunaSearch()
    return None  # the basic variant generator: grid_search expands, distributions are sampled


def _scheduler(spec: ExperimentSpec):
    sweep = spec.sweep
    if sweep.scheduler == "asha":
        return tune.schedulers.ASHAScheduler(
            time_attr="epoch",
            max_t=spec.optimization.epochs,
            grace_period=sweep.grace_period,
            reduction_factor=sweep.reduction_factor,
        )
    return tune.schedulers.FIFOScheduler()


def pareto_front(rows: list[TrialRow]) -> list[TrialRow]:
    """Trials no other trial beats on both clean and robust accuracy (higher is better on both)."""
    scored = [r for r in rows if r.clean_accuracy is not None and r.robust_accuracy is not None]
    front = []
    for r in scored:
        dominated = any(
            o is not r
            and o.clean_accuracy >= r.clean_accuracy
            and o.robust_accuracy >= r.robust_accuracy
            and (o.clean_accuracy > r.clean_accuracy or o.robust_accuracy > r.robust_accuracy)
            for o in scored
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r.clean_accuracy)


def plot_pareto(rows: list[TrialRow], title: str) -> bytes:
    """PNG scatter of clean vs robust accuracy with the Pareto front drawn through."""
    from workers.settings import keep_matplotlib_out_of_home

    keep_matplotlib_out_of_home()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.clean_accuracy is not None and r.robust_accuracy is not None]
    front = [r for r in scored if r.pareto]
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    ax.scatter(
        [r.clean_accuracy for r in scored], [r.robust_accuracy for r in scored], c="tab:blue", label="trials"
    )
    if front:
        ax.plot(
            [r.clean_accuracy for r in front],
            [r.robust_accuracy for r in front],
            "o-",
            c="tab:red",
            label="Pareto front",
        )
    for r in scored:
        label = ", ".join(
            f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.')[-1]}={v}"
            for k, v in r.params.items()
        )
        ax.annotate(
            label,
            (r.clean_accuracy, r.robust_accuracy),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel("robust accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _row(result: Any, store: ArtifactStore, experiment_id: str) -> TrialRow:
    metrics = result.metrics or {}
    tid = metrics.get("trial_id")
    if not tid:  # no report reached Tune: recover the id from the trial folder's name
        found = re.search(r"_([0-9a-f]+_\d{5})_", (result.path or "").rstrip("/").split("/")[-1])
        tid = found.group(1) if found else "unknown"
    trial = f"trial_{tid}"
    params = dict(result.config or {})
    status = "error" if result.error else "completed"
    try:
        summary = TrainSummary.model_validate(
            store.get_json(experiment_prefix(experiment_id, trial) + "summary.json")
        )
    except KeyNotFound:
        summary = None
    if summary is not None:
        return TrialRow(
            trial,
            params,
            status,
            summary.epochs,
            summary.final.clean_accuracy,
            summary.final.robust_accuracy,
            summary.final.worst_attack,
            "summary",
        )
    # Stopped early (ASHA) or failed: no final evaluation. The store's metrics.jsonl is the most
    # complete record (its last epoch may not have reached Tune before the stop).
    try:
        lines = (
            store.get_bytes(experiment_prefix(experiment_id, trial) + "metrics.jsonl").decode().splitlines()
        )
    except KeyNotFound:
        lines = []
    last = json.loads(lines[-1]) if lines else {}
    val = last.get("val") or {}
    if status == "completed" and lines:
        status = "stopped"
    return TrialRow(
        trial,
        params,
        status,
        len(lines) if lines else None,
        val.get("clean_acc", metrics.get("val_clean_acc")),
        val.get("pgd_acc", metrics.get("val_pgd_acc")),
        "val_pgd" if "pgd_acc" in val or "val_pgd_acc" in metrics else None,
        "metrics.jsonl",
    )


def write_results(
    store: ArtifactStore, experiment_id: str, rows: list[TrialRow], spec: ExperimentSpec
) -> dict[str, str]:
    prefix = experiment_prefix(experiment_id)
    front = pareto_front(rows)
    for r in rows:
        r.pareto = r in front
    table = [asdict(r) for r in rows]
    store.put_json(prefix + "trials.json", table)
    out = io.StringIO()
    names = sorted({k for r in rows for k in r.params})
    writer = csv.writer(out)
    writer.writerow(
        [
            "trial",
            *names,
            "status",
            "epochs",
            "clean_accuracy",
            "robust_accuracy",
            "robust_attack",
            "source",
            "pareto",
        ]
    )
    for r in rows:
        writer.writerow(
            [
                r.trial,
                *[r.params.get(n) for n in names],
                r.status,
                r.epochs,
                r.clean_accuracy,
                r.robust_accuracy,
                r.robust_attack,
                r.source,
                r.pareto,
            ]
        )
    store.put_bytes(prefix + "trials.csv", out.getvalue().encode())
    store.put_json(prefix + "pareto.json", [asdict(r) for r in front])
    store.put_bytes(prefix + "plots/pareto.png", plot_pareto(rows, f"{spec.name}: clean vs robust accuracy"))
    return {
        name: store.url + "/" + prefix + name
        for name in ("trials.json", "trials.csv", "pareto.json", "plots/pareto.png")
    }


def run_sweep(
    spec: ExperimentSpec, *, experiment_id: str, store: ArtifactStore, settings: StoreSettings
) -> list[TrialRow]:
    """Run (or restore) the sweep of `spec.sweep` and store its table, Pareto front and plot."""
    sweep = spec.sweep
    if sweep is None:
        raise ValueError("spec has no sweep section")
    filesystem, base = store.pyarrow_filesystem()
    storage_path = f"{base.rstrip('/')}/{experiment_prefix(experiment_id).rstrip('/')}"
    driver = tune.with_parameters(
        _trial_driver, base=spec.model_dump(mode="json"), experiment_id=experiment_id, settings=settings
    )
    trainable = tune.with_resources(driver, {"CPU": DRIVER_CPU})
    path = f"{storage_path}/{TUNE_RUN_NAME}"
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        log.info("restoring sweep %s from %s", experiment_id, path)
        tuner = tune.Tuner.restore(
            path, trainable=trainable, storage_filesystem=filesystem, resume_errored=True
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={p: _domain(d) for p, d in sweep.parameters.items()},
            tune_config=tune.TuneConfig(
                metric=sweep.metric,
                mode=sweep.mode,
                search_alg=_search_alg(spec),
                scheduler=_scheduler(spec),
                num_samples=sweep.num_samples,
                max_concurrent_trials=max_concurrent_trials(spec),
            ),
            run_config=tune.RunConfig(
                name=TUNE_RUN_NAME, storage_path=storage_path, storage_filesystem=filesystem
            ),
        )
    results = tuner.fit()
    if stop_requested(experiment_id) is not None:
        raise Preempted(f"{experiment_id}: sweep preempted; its trials resume when the job runs again")
    rows = [_row(result, store, experiment_id) for result in results]
    write_results(store, experiment_id, rows, spec)
    return rows
