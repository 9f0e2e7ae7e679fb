"""Evaluation jobs on Ray: a checkpoint under an evaluation suite, in fixed shards, resumable.

`python -m workers.run --job-id ID` runs this when experiments/<ID>/spec.json is an
`EvaluationJobSpec` (kind "evaluation"). The driver (`run_evaluation`):

1. `prepare`: downloads the checkpoint (and the transfer source) to a temporary folder, checks its
   sha256 when the spec gives one, loads it with the weights-only loader and runs it on two test
   images, loads the test split and checks an extended evaluation's records fit; any of these
   failing is bad input (`EvaluationInputError`, exit 2) and no worker starts.
2. cuts the evaluated examples (the first `n_examples` of the split) into shards of
   `suite.shard_size`, ids 0..n_shards-1, fixed whatever the number of workers, and skips every
   shard already in the store: one whose ShardInfo exists with this suite's digest and this
   checkpoint's sha256 (a killed, cancelled-then-retried or preempted job recomputes nothing stored).
3. runs the other shards on `num_workers` Ray actors (`ShardEvaluator`: each loads the model and
   the split once), handing out shards one at a time to whichever actor is free; an actor writes
   each shard's records to the store as soon as it finishes them: `<k:05d>.npz` (index, label,
   clean, robust, broken_by[, x_adv]) first, then `<k:05d>.json` (ShardInfo), which marks the shard
   done. The driver logs one line per shard and appends the running accuracies to progress.jsonl.
4. `summarize_evaluation`: reads every shard's records back and writes summary.json, computed by
   `api_schemas.evaluations.summarize` from the records alone.

Store layout under experiments/<ID>/: spec.json; eval/shards/<k:05d>.{npz,json}; eval/progress.jsonl
(one line per finished shard: {"shards_done", "n_shards", "attempt", "accuracy": {"clean", <attack
label>..., "robust"}}); eval/summary.json (EvaluationSummary).

Incremental (`spec.base`): the base evaluation's records of each shard are read, their first
`base.n_attacks` columns copied, and the added attacks run on the examples still robust to every
earlier one. Transfer (`spec.transfer_source`): the suite's transfer attacks run PGD on that model
and score the target.

The attempt recorded in each ShardInfo (`job_attempt`): LBGAT_ATTEMPT when set; else the suffix
`-a<N>` of the Ray job's submission id (the scheduler submits attempt N of job ID as `ID-aN`; a Ray
job's driver finds it in RAY_JOB_CONFIG_JSON_ENV_VAR's metadata `job_submission_id`); else 1.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import logging
import os
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from api_schemas import SpecError
from api_schemas.evaluations import CheckpointRef, EvaluationJobSpec, EvaluationSummary, ShardInfo, summarize
from api_schemas.protocols import CUSTOM_ID, TEST_SET_SIZES, UnknownProtocol, get_protocol
from api_schemas.spec import TransferAttackSpec
from trainer.checkpoint import CheckpointError, load_model
from trainer.data import DATASET_INFO, ArrayDataset, DatasetNotFoundError, canonical_name
from trainer.evaluation import ExampleRecords, evaluate_records
from trainer.loop import load_test_split
from trainer.provenance import provenance
from workers.preemption import Preempted, stop_wait_s
from workers.settings import StoreSettings, gpu_resource
from workers.storage import ArtifactStore, KeyNotFound, experiment_prefix, open_store

log = logging.getLogger("workers.evaluation")

ENV_ATTEMPT = "LBGAT_ATTEMPT"
_RAY_JOB_CONFIG = "RAY_JOB_CONFIG_JSON_ENV_VAR"
_ATTEMPT_SUFFIX = re.compile(r"-a(\d+)$")


class EvaluationInputError(ValueError):
    """The job cannot run as specified (bad checkpoint, mismatched records, missing data): exit 2."""


# --------------------------------------------------------------------------------------------- keys


def eval_prefix(evaluation_id: str) -> str:
    return experiment_prefix(evaluation_id) + "eval/"


def shard_key(evaluation_id: str, shard: int, ext: str) -> str:
    """experiments/<id>/eval/shards/<shard:05d>.<ext> (ext: npz or json)."""
    return f"{eval_prefix(evaluation_id)}shards/{shard:05d}.{ext}"


def summary_key(evaluation_id: str) -> str:
    return eval_prefix(evaluation_id) + "summary.json"


def progress_key(evaluation_id: str) -> str:
    return eval_prefix(evaluation_id) + "progress.jsonl"


def job_attempt(environ: dict[str, str] | None = None) -> int:
    """The job's attempt number (see the module doc): LBGAT_ATTEMPT, the Ray submission id's -aN, or 1."""
    env = os.environ if environ is None else environ
    given = env.get(ENV_ATTEMPT, "").strip()
    if given:
        if not given.isdigit():
            raise EvaluationInputError(f"{ENV_ATTEMPT}={given!r}: the attempt is a number")
        return int(given)
    try:
        submission = json.loads(env.get(_RAY_JOB_CONFIG) or "{}").get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        submission = None
    match = _ATTEMPT_SUFFIX.search(submission or "")
    return int(match.group(1)) if match else 1


# -------------------------------------------------------------------------------------- checkpoints


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_checkpoint(
    store: ArtifactStore, ref: CheckpointRef, folder: Path, what: str = "checkpoint"
) -> tuple[Path, str]:
    """Download `ref.key` into `folder`; return (path, sha256). A missing key or a sha256 other than
    the one `ref` names is bad input."""
    target = folder / f"{what}-{hashlib.sha256(ref.key.encode()).hexdigest()[:16]}.pt"
    try:
        store.get_file(ref.key, target)
    except KeyNotFound:
        raise EvaluationInputError(f"{what}: no file at {store.url}/{ref.key}") from None
    except ValueError as exc:  # an invalid key
        raise EvaluationInputError(f"{what}.key: {exc}") from None
    digest = sha256_file(target)
    if ref.sha256 is not None and digest != ref.sha256:
        raise EvaluationInputError(
            f"{what}: {ref.key} has sha256 {digest}, not the {ref.sha256} the job names; refused"
        )
    return target, digest


def load_checkpoint_model(
    path: Path, ref: CheckpointRef, dataset: str, device: torch.device, what: str
) -> nn.Module:
    """The model in `path` (weights-only loader), fit to the dataset's classes and channels."""
    info = DATASET_INFO[canonical_name(dataset)]
    try:
        return load_model(
            path,
            which="robust",
            fallback_ref=ref.model,
            num_classes=info.num_classes,
            in_channels=info.channels,
            weights="ema" if ref.weights == "averaged" else "model",
            device=device,
        )
    except (CheckpointError, SpecError) as exc:
        raise EvaluationInputError(f"{what} {ref.label or ref.key}: {exc}") from None


def _check_fits(model: nn.Module, data: ArrayDataset, what: str) -> None:
    """Run the model on two test images: a checkpoint for other image shapes is refused here."""
    x = data.images[:2].float().div(255)
    try:
        with torch.no_grad():
            out = model(x)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EvaluationInputError(
            f"{what} does not fit {data.name} images {tuple(x.shape[1:])}: {first}"
        ) from None
    if out.dim() != 2 or out.shape[1] != data.num_classes:
        raise EvaluationInputError(
            f"{what} gives {tuple(out.shape[1:])} outputs, {data.name} has {data.num_classes} classes"
        )


# ------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """What the driver checked and decided before any worker starts."""

    spec: EvaluationJobSpec
    evaluation_id: str
    n_examples: int
    n_total: int
    n_shards: int
    suite_digest: str
    checkpoint_sha256: str
    transfer_sha256: str | None
    attacks: list[Any]
    attempt: int
    split_size: int

    @property
    def labels(self) -> list[str]:
        return [a.label() for a in self.attacks]

    def bounds(self, shard: int) -> tuple[int, int]:
        size = self.spec.suite.shard_size
        return shard * size, min((shard + 1) * size, self.n_examples)


def full_size(spec: EvaluationJobSpec, split_size: int) -> int:
    """Examples in the protocol's full set: a shipped protocol's (`Protocol.full_size`), else the
    dataset's test-set size capped by the suite's n_examples; the split's size where neither is known."""
    if spec.protocol_id != CUSTOM_ID and spec.protocol_version.isdigit():
        try:
            total = get_protocol(f"{spec.protocol_id}@{spec.protocol_version}").full_size(spec.dataset.name)
        except UnknownProtocol:
            total = None
        if total is not None:
            return total
    total = TEST_SET_SIZES.get(spec.dataset.name, split_size)
    return min(total, spec.suite.n_examples) if spec.suite.n_examples else total


def absolute_dataset_root(spec: EvaluationJobSpec, base: Path | None = None) -> EvaluationJobSpec:
    """The spec with dataset.root absolute against the job's working directory (actors start elsewhere)."""
    root = spec.dataset.root
    if "://" in root or Path(root).is_absolute():
        return spec
    dataset = spec.dataset.model_copy(update={"root": str((base or Path.cwd()) / root)})
    return spec.model_copy(update={"dataset": dataset})


def _load_split(spec: EvaluationJobSpec) -> ArrayDataset:
    try:
        return load_test_split(spec.dataset)
    except DatasetNotFoundError as exc:
        raise EvaluationInputError(str(exc).splitlines()[0] if str(exc) else "dataset not found") from None


def _check_base(
    store: ArtifactStore, spec: EvaluationJobSpec, n_examples: int, checkpoint_sha256: str
) -> None:
    """The extended evaluation must be of this checkpoint, with our first attacks, seed, shards and
    dataset, and have every shard this job needs."""
    base = spec.base
    assert base is not None
    try:
        base_spec = EvaluationJobSpec.model_validate(
            store.get_json(experiment_prefix(base.evaluation_id) + "spec.json")
        )
    except KeyNotFound:
        raise EvaluationInputError(f"base: no evaluation {base.evaluation_id} in the store") from None
    except ValidationError as exc:
        raise EvaluationInputError(
            f"base: {base.evaluation_id} is not an evaluation ({exc.errors()[0]['msg']})"
        ) from None
    ours, theirs, n = spec.suite.attack_dicts(), base_spec.suite.attack_dicts(), base.n_attacks
    if n > len(theirs) or n >= len(ours) or theirs[:n] != ours[:n]:
        raise EvaluationInputError(
            f"base.n_attacks: the first {n} attacks of {base.evaluation_id} are not the first {n} of this suite"
        )
    for name in ("seed", "shard_size"):
        if getattr(base_spec.suite, name) != getattr(spec.suite, name):
            raise EvaluationInputError(
                f"base: {base.evaluation_id} has another suite.{name}; its records do not align with these"
            )
    split = {"name", "resize_to", "test_limit", "synthetic_size"}  # what fixes the test split's examples
    if base_spec.dataset.model_dump(include=split) != spec.dataset.model_dump(include=split):
        raise EvaluationInputError(f"base: {base.evaluation_id} evaluated another test split")
    labels = [a.label() for a in spec.suite.resolved_attacks()[:n]]
    size = spec.suite.shard_size
    for shard in range(spec.suite.n_shards(n_examples)):
        info = read_shard_info(store, base.evaluation_id, shard)
        if info is None:
            raise EvaluationInputError(f"base: {base.evaluation_id} has no finished shard {shard}")
        if info.checkpoint_sha256 != checkpoint_sha256:
            raise EvaluationInputError(f"base: {base.evaluation_id} evaluated another checkpoint")
        stop = min((shard + 1) * size, n_examples)
        if info.start != shard * size or info.stop < stop or info.attacks[:n] != labels:
            raise EvaluationInputError(
                f"base: shard {shard} of {base.evaluation_id} holds examples {info.start}..{info.stop - 1} "
                f"under {info.attacks}, not what this job extends"
            )


def prepare(
    spec: EvaluationJobSpec, *, evaluation_id: str, store: ArtifactStore, attempt: int | None = None
) -> Plan:
    """Check everything that can be checked before a worker starts (see the module doc)."""
    attack_list = spec.suite.resolved_attacks()
    transfers = [a for a in attack_list if isinstance(a, TransferAttackSpec)]
    if transfers and spec.transfer_source is None:
        raise EvaluationInputError("transfer_source: the suite has transfer attacks; name their source model")
    if spec.transfer_source is not None and not transfers:
        raise EvaluationInputError("transfer_source: the suite has no transfer attack that would use it")
    data = _load_split(spec)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="lbgat-eval-") as folder:
        path, digest = fetch_checkpoint(store, spec.checkpoint, Path(folder))
        model = load_checkpoint_model(path, spec.checkpoint, spec.dataset.name, device, "checkpoint")
        _check_fits(model, data, "checkpoint")
        transfer_digest = None
        if spec.transfer_source is not None:
            path, transfer_digest = fetch_checkpoint(
                store, spec.transfer_source, Path(folder), "transfer_source"
            )
            source = load_checkpoint_model(
                path, spec.transfer_source, spec.dataset.name, device, "transfer_source"
            )
            _check_fits(source, data, "transfer_source")
    n_examples = spec.n_examples(len(data))
    if spec.base is not None:
        _check_base(store, spec, n_examples, digest)
    return Plan(
        spec=spec,
        evaluation_id=evaluation_id,
        n_examples=n_examples,
        n_total=full_size(spec, len(data)),
        n_shards=spec.suite.n_shards(n_examples),
        suite_digest=spec.suite.digest(),
        checkpoint_sha256=digest,
        transfer_sha256=transfer_digest,
        attacks=attack_list,
        attempt=job_attempt() if attempt is None else attempt,
        split_size=len(data),
    )


# ---------------------------------------------------------------------------------------- records


def records_to_npz(records: ExampleRecords) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **records.arrays())
    return buffer.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def read_shard_info(store: ArtifactStore, evaluation_id: str, shard: int) -> ShardInfo | None:
    try:
        return ShardInfo.model_validate(store.get_json(shard_key(evaluation_id, shard, "json")))
    except KeyNotFound:
        return None
    except (ValidationError, ValueError):
        return None  # a torn or foreign file: the shard is not done


def read_shard_records(
    store: ArtifactStore, evaluation_id: str, shard: int, info: ShardInfo
) -> ExampleRecords:
    arrays = npz_arrays(store.get_bytes(shard_key(evaluation_id, shard, "npz")))
    return ExampleRecords.from_arrays(arrays, info.attacks)


def shard_done(info: ShardInfo | None, plan: Plan, shard: int) -> bool:
    start, stop = plan.bounds(shard)
    return (
        info is not None
        and info.shard == shard
        and (info.start, info.stop) == (start, stop)
        and info.suite_digest == plan.suite_digest
        and info.checkpoint_sha256 == plan.checkpoint_sha256
        and info.attacks == plan.labels
    )


def done_shards(store: ArtifactStore, plan: Plan) -> dict[int, ShardInfo]:
    """The shards already in the store for this suite and checkpoint."""
    names = {o.key for o in store.list(eval_prefix(plan.evaluation_id) + "shards/")}
    done = {}
    for shard in range(plan.n_shards):
        if shard_key(plan.evaluation_id, shard, "json") not in names:
            continue
        if shard_key(plan.evaluation_id, shard, "npz") not in names:
            continue
        info = read_shard_info(store, plan.evaluation_id, shard)
        if shard_done(info, plan, shard):
            done[shard] = info
    return done


# ----------------------------------------------------------------------------------------- worker


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


class ShardEvaluator:
    """Evaluates shards of one job: loads the model(s) and the split once, then `run(shard)` per shard,
    writing its records to the store. `run_evaluation` runs it as a Ray actor (`ray.remote`); it also
    runs in-process (pass `store`)."""

    def __init__(
        self,
        plan: Plan,
        *,
        threads: int | None = None,
        use_gpu: bool = False,
        store: ArtifactStore | None = None,
    ) -> None:
        if threads is not None:
            torch.set_num_threads(threads)
        self.plan = plan
        self.store = store or open_store()
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        spec = plan.spec
        self.data = _load_split(spec)
        self.sources: dict[str, nn.Module] = {}
        # the files go as soon as the models are loaded (an actor is killed, not shut down)
        with tempfile.TemporaryDirectory(prefix="lbgat-eval-worker-") as folder:
            # the sha256 the driver saw: every worker evaluates the very bytes it checked
            ref = spec.checkpoint.model_copy(update={"sha256": plan.checkpoint_sha256})
            path, _ = fetch_checkpoint(self.store, ref, Path(folder))
            self.model = load_checkpoint_model(path, ref, spec.dataset.name, self.device, "checkpoint")
            if spec.transfer_source is not None:
                ref = spec.transfer_source.model_copy(update={"sha256": plan.transfer_sha256})
                path, _ = fetch_checkpoint(self.store, ref, Path(folder), "transfer_source")
                source = load_checkpoint_model(path, ref, spec.dataset.name, self.device, "transfer_source")
                for attack in plan.attacks:
                    if isinstance(attack, TransferAttackSpec):
                        self.sources[attack.source_checkpoint] = source
        self.device_name = _device_name(self.device)

    def ready(self) -> str:
        return self.device_name

    def _base_records(self, shard: int) -> ExampleRecords | None:
        base = self.plan.spec.base
        if base is None:
            return None
        info = read_shard_info(self.store, base.evaluation_id, shard)
        start, _ = self.plan.bounds(shard)
        if info is None or info.checkpoint_sha256 != self.plan.checkpoint_sha256 or info.start != start:
            raise EvaluationInputError(
                f"base: {base.evaluation_id} has no finished shard {shard} of this checkpoint to extend"
            )
        if info.attacks[: base.n_attacks] != self.plan.labels[: base.n_attacks]:
            raise EvaluationInputError(
                f"base: shard {shard} of {base.evaluation_id} holds attacks {info.attacks}"
            )
        records = read_shard_records(self.store, base.evaluation_id, shard, info)
        _, stop = self.plan.bounds(shard)
        if info.stop < stop:
            raise EvaluationInputError(
                f"base: shard {shard} of {base.evaluation_id} stops at {info.stop}, not {stop}"
            )
        if info.stop > stop:  # the base evaluated more examples: its last shard is longer
            keep = stop - start
            arrays = {k: v[:keep] for k, v in records.arrays().items()}
            records = ExampleRecords.from_arrays(arrays, info.attacks)
        return records.head(base.n_attacks)

    def run(self, shard: int) -> dict[str, Any]:
        """Evaluate one shard, write `<k>.npz` then `<k>.json`; return the ShardInfo and the counts."""
        plan, spec = self.plan, self.plan.spec
        start, stop = plan.bounds(shard)
        began = time.perf_counter()
        records = evaluate_records(
            self.model,
            self.data.subset(torch.arange(start, stop)),
            plan.attacks,
            seed=spec.suite.seed,
            shard=shard,
            start=start,
            batch_size=spec.suite.batch_size,
            device=self.device,
            reuse=self._base_records(shard),
            transfer_sources=self.sources,
            save_adversarial=spec.save_adversarial,
        )
        seconds = time.perf_counter() - began
        info = ShardInfo(
            shard=shard,
            start=start,
            stop=stop,
            attacks=records.attacks,
            suite_digest=plan.suite_digest,
            checkpoint_sha256=plan.checkpoint_sha256,
            attempt=plan.attempt,
            seconds=seconds,
            attack_seconds=records.seconds,
            reused_attacks=spec.base.n_attacks if spec.base is not None else 0,
            device=self.device_name,
        )
        write_shard(self.store, plan.evaluation_id, info, records)
        return {"info": info.model_dump(mode="json"), "counts": records.counts(), "n": len(records)}


def write_shard(store: ArtifactStore, evaluation_id: str, info: ShardInfo, records: ExampleRecords) -> None:
    """The records first, then the info that marks the shard done (a reader never sees info without them)."""
    store.put_bytes(shard_key(evaluation_id, info.shard, "npz"), records_to_npz(records))
    store.put_json(shard_key(evaluation_id, info.shard, "json"), info.model_dump(mode="json"))


# ----------------------------------------------------------------------------------------- driver


class _Running:
    """Running accuracies over the finished shards, for log lines and progress.jsonl."""

    def __init__(self, labels: list[str]) -> None:
        self.labels = labels
        self.n = 0
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, n: int, counts: dict[str, int]) -> None:
        self.n += n
        self.counts.update(counts)

    def accuracy(self) -> dict[str, float]:
        keys = ["clean", *self.labels, "robust"]
        return {k: round(self.counts[k] / self.n, 6) if self.n else 0.0 for k in keys}


def _brief(acc: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in acc.items())


def cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get(gpu_resource(), 0) > 0


def _actor_options(spec: EvaluationJobSpec, settings: StoreSettings, use_gpu: bool) -> dict[str, Any]:
    """Each actor's CPUs and, where GPUs are used, `gpus_per_worker` of the GPU resource
    (LBGAT_GPU_RESOURCE: a custom resource standing for a GPU is held, the actor runs on CPUs)."""
    name = gpu_resource()
    options: dict[str, Any] = {
        "num_cpus": spec.cpus_per_worker,
        "num_gpus": spec.gpus_per_worker if use_gpu and name == "GPU" else 0,
        # credentials travel as environment variables of the actor processes, not as arguments
        "runtime_env": {"env_vars": settings.as_env()},
        # shards are idempotent: a restarted actor recomputes at most the shard it lost
        "max_restarts": 1,
        "max_task_retries": 1,
    }
    if use_gpu and name != "GPU":
        options["resources"] = {name: spec.gpus_per_worker}
    return options


def run_evaluation(
    spec: EvaluationJobSpec,
    *,
    evaluation_id: str,
    store: ArtifactStore,
    settings: StoreSettings,
    plan: Plan | None = None,
    attempt: int | None = None,
    stop: threading.Event | None = None,
) -> EvaluationSummary:
    """Evaluate every shard not yet stored on the connected Ray cluster; write and return the summary.

    `stop` set (the driver got SIGTERM: a preemption) hands out no more shards and waits for the
    running ones while the job's grace lasts (less a second), then raises `Preempted`: the shards
    done are stored, and the job run again computes only the others."""
    import ray

    spec = absolute_dataset_root(spec)
    plan = plan or prepare(spec, evaluation_id=evaluation_id, store=store, attempt=attempt)
    plan.spec = spec
    done = done_shards(store, plan)
    todo = collections.deque(k for k in range(plan.n_shards) if k not in done)
    running = _Running(plan.labels)
    for shard, info in sorted(done.items()):
        running.add(info.stop - info.start, read_shard_records(store, evaluation_id, shard, info).counts())
    use_gpu = cluster_has_gpus() if spec.use_gpu is None else spec.use_gpu
    n_workers = min(spec.num_workers, len(todo))
    log.info(
        "evaluation %s (attempt %d): %d examples in %d shards of %d; %d already stored, %d to run on %d %s worker(s)",
        evaluation_id,
        plan.attempt,
        plan.n_examples,
        plan.n_shards,
        spec.suite.shard_size,
        len(done),
        len(todo),
        n_workers,
        "GPU" if use_gpu else "CPU",
    )
    if todo:
        _warn_if_no_room(ray, spec, use_gpu)
        threads = spec.cpu_threads or max(1, int(spec.cpus_per_worker))
        actor_cls = ray.remote(ShardEvaluator)
        options = _actor_options(spec, settings, use_gpu)
        on_gpu = use_gpu and gpu_resource() == "GPU"
        actors = [
            actor_cls.options(**options).remote(plan, threads=None if on_gpu else threads, use_gpu=on_gpu)
            for _ in range(n_workers)
        ]
        try:
            _dispatch(ray, actors, todo, plan, store, running, len(done), stop)
        finally:
            for actor in actors:
                ray.kill(actor)
    summary = summarize_evaluation(store, plan)
    store.put_json(summary_key(evaluation_id), summary.model_dump(mode="json"))
    log.info(
        "evaluation %s: clean %.4f, robust (worst case) %.4f over %d examples; summary at %s/%s",
        evaluation_id,
        summary.clean_accuracy,
        summary.robust_accuracy,
        summary.n_examples,
        store.url,
        summary_key(evaluation_id),
    )
    return summary


def _warn_if_no_room(ray, spec: EvaluationJobSpec, use_gpu: bool) -> None:
    """Say so when the cluster, as it is now, has no room for a single worker (an autoscaler may
    still add a node; until then the job waits, as Ray Train does)."""
    total = ray.cluster_resources()
    needs = {"CPU": spec.cpus_per_worker, **({"GPU": spec.gpus_per_worker} if use_gpu else {})}
    short = {k: v for k, v in needs.items() if total.get(k, 0) < v}
    if short:
        log.warning(
            "the cluster has %s; one evaluation worker needs %s: waiting for room",
            {k: total.get(k, 0) for k in short},
            short,
        )


def _dispatch(
    ray,
    actors,
    todo,
    plan: Plan,
    store: ArtifactStore,
    running: _Running,
    n_done: int,
    stop: threading.Event | None = None,
) -> None:
    """Give each actor one shard at a time, as soon as it is ready or free; until every shard is done.
    An actor that never starts (no room on the cluster) holds no shard: the others finish the job.
    Once `stop` is set no shard is handed out; running ones may finish until the grace is spent."""
    starting = {actor.ready.remote(): actor for actor in actors}
    busy: dict[Any, tuple[Any, int]] = {}
    deadline: float | None = None

    def assign(actor) -> None:
        if todo and (stop is None or not stop.is_set()):
            shard = todo.popleft()
            busy[actor.run.remote(shard)] = (actor, shard)

    while busy or todo:
        if stop is not None and stop.is_set():
            if deadline is None:
                deadline = time.monotonic() + max(stop_wait_s() - 1.0, 0.0)
                log.warning("stop requested: no more shards handed out; %d running", len(busy))
            if not busy or time.monotonic() >= deadline:
                raise Preempted(
                    f"evaluation {plan.evaluation_id} stopped with {len(todo) + len(busy)} shard(s) "
                    "left; the stored ones are kept"
                )
        waiting = list(busy) + list(starting)
        ready_list, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
        if not ready_list:
            continue
        (ready,) = ready_list
        if ready in starting:
            actor = starting.pop(ready)
            ray.get(ready)
            assign(actor)
            continue
        actor, shard = busy.pop(ready)
        result = ray.get(ready)
        n_done += 1
        info = ShardInfo.model_validate(result["info"])
        running.add(result["n"], result["counts"])
        own = {k: v / result["n"] for k, v in result["counts"].items()} if result["n"] else {}
        log.info(
            "shard %d/%d done: %s (%.1fs, %s) | running over %d/%d shards: %s",
            shard,
            plan.n_shards,
            _brief(own),
            info.seconds,
            info.device,
            n_done,
            plan.n_shards,
            _brief(running.accuracy()),
        )
        line = {
            "shards_done": n_done,
            "n_shards": plan.n_shards,
            "shard": shard,
            "attempt": plan.attempt,
            "examples_done": running.n,
            "accuracy": running.accuracy(),
            "time": time.time(),
        }
        store.append_line(progress_key(plan.evaluation_id), json.dumps(line))
        assign(actor)


def summarize_evaluation(store: ArtifactStore, plan: Plan) -> EvaluationSummary:
    """The summary of every shard's records in the store (all must be there and match the plan)."""
    spec, evaluation_id = plan.spec, plan.evaluation_id
    parts, infos = [], []
    for shard in range(plan.n_shards):
        info = read_shard_info(store, evaluation_id, shard)
        if not shard_done(info, plan, shard):
            raise RuntimeError(f"evaluation {evaluation_id}: shard {shard} is missing or of another suite")
        infos.append(info)
        parts.append(read_shard_records(store, evaluation_id, shard, info))
    records = ExampleRecords.concat(parts)
    if len(records) != plan.n_examples or not np.array_equal(records.index, np.arange(plan.n_examples)):
        raise RuntimeError(
            f"evaluation {evaluation_id}: the shards do not cover examples 0..{plan.n_examples - 1}"
        )
    attacks = [
        {**d, "label": a.label()} for d, a in zip(spec.suite.attack_dicts(), plan.attacks, strict=True)
    ]
    threat = spec.suite.threat_model
    source = spec.transfer_source
    return summarize(
        labels=records.label.tolist(),
        clean=records.clean.tolist(),
        robust=records.robust.tolist(),
        attacks=attacks,
        incremental_from=spec.base.n_attacks if spec.base is not None else None,
        evaluation_id=evaluation_id,
        protocol_id=spec.protocol_id,
        protocol_version=spec.protocol_version,
        checkpoint_sha256=plan.checkpoint_sha256,
        checkpoint=spec.checkpoint.label or spec.checkpoint.key,
        weights=spec.checkpoint.weights,
        dataset=spec.dataset.name,
        norm=threat.norm,
        eps=threat.eps,
        n_total=plan.n_total,
        partial=plan.n_examples < plan.n_total,
        training_precision=spec.training_precision,
        selection_split=spec.selection_split,
        seed=spec.suite.seed,
        shard_size=spec.suite.shard_size,
        n_shards=plan.n_shards,
        transfer_source=None if source is None else (source.label or source.key),
        seconds=round(sum(i.seconds for i in infos), 3),
        provenance={
            **provenance(),
            "device": sorted({i.device for i in infos}),
            "attempts": sorted({i.attempt for i in infos}),
            "suite_digest": plan.suite_digest,
            "checkpoint_key": spec.checkpoint.key,
            "transfer_source_sha256": plan.transfer_sha256,
            "num_workers": spec.num_workers,
        },
    )


def parse_job_spec(data: Any, evaluation_id: str) -> EvaluationJobSpec:
    """spec.json as an EvaluationJobSpec; a field error is bad input naming the field's path."""
    try:
        return EvaluationJobSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise EvaluationInputError(f"job {evaluation_id}: {where}: {first['msg']}") from None
