"""What Ray Train costs us: per-epoch overhead of a 1-worker TorchTrainer, and checkpoint upload speed to S3.

Run from the repository root (not a test; nothing here is collected by pytest)::

    python benchmarks/ray_overhead.py                 # both parts; Ray run on a local-directory store
    python benchmarks/ray_overhead.py --s3            # the Ray run's store on S3 (SeaweedFS, or LBGAT_*)
    python benchmarks/ray_overhead.py --skip-upload --epochs 6 --json

Part 1, Ray Train overhead. The same LBGAT epochs (preset ``lbgat-trades-a0-cifar10``, synthetic
CIFAR-size data: ``dataset.name=synthetic``, ``dataset.synthetic_size=N``) are run twice on the same
device:

plain
    in this process: ``TrainingRun(spec, datasets=...)`` and per epoch ``train_epoch()`` +
    ``test_clean_accuracy()`` + a metrics line + ``save()`` of a checkpoint, i.e. what the Ray worker
    does per epoch without Ray. Each epoch's full cycle is timed with ``time.perf_counter``
    (``train_epoch`` synchronizes CUDA; ``save`` copies the tensors to the host).
ray
    ``workers.training.run_training`` (TorchTrainer, 1 worker, ``workers.train_worker``) on the Ray
    cluster this script starts (``ray.init(num_cpus=..., include_dashboard=False)``) or joins
    (``--ray-address``), with the store a local temporary directory, or S3 with ``--s3`` (SeaweedFS
    from ``workers/dev_s3.py``, or the ``LBGAT_*`` settings when they name an s3:// store). The
    worker writes ``extra.finished_at`` (its ``time.time()``) into each line of
    ``experiments/<id>/main/metrics.jsonl``; an epoch's cycle on Ray is the difference of consecutive
    ``finished_at``, so it includes the ``ray.train.report`` (checkpoint upload) of the epoch before.

The first epoch of both is warm-up and not compared (on Ray it has no previous ``finished_at`` anyway);
the figure is ``median(ray cycles) / median(plain cycles)`` over epochs 2..E and the overhead
``(ratio - 1) * 100 %``. Target: < 5 % for a full CIFAR-size epoch (50k images, paper models) on a GPU.
The one-off cost is reported separately: ``fit() wall time - sum of the E epoch cycles`` (epoch 1
counted at the median cycle), split into "before epoch 1 ended" (Ray actors, worker group, data and
models in the worker, the first epoch's warm-up) and "after the last epoch" (its checkpoint report,
``last.pt``, the end-of-run evaluation, ``summary.json``, shutdown). On a remote cluster
(``--ray-address``) those two need the worker's clock to agree with this machine's.

Both runs use every-epoch checkpoints (``checkpoint.every_n_epochs=1``, ``keep_last=2``), a cheap
end-of-run evaluation (``evaluation.attacks=[{kind: fgsm}]``, ``on_best=false``, 256 images),
``runtime.progress=false`` and no learning-rate milestones. On a CPU the models are ``tiny_cnn``
(width 32 robust, 16 teacher, as ``throughput.py --small``) on 512 synthetic images and both runs use
``--threads`` torch threads (``runtime.cpu_threads``; ``resources.cpus_per_worker`` the same), so an
epoch takes seconds; those figures only show that the script works. On a GPU: WRN-34-10 + the ResNet-18
teacher, 50,000 synthetic training images, the first 10,000 of the test split (CIFAR's sizes).

Part 2, checkpoint upload throughput to S3. A file of ``--ckpt-mb`` MB (random bytes; or, with
``--real-ckpt``, a real ``TrainingRun`` checkpoint of the paper models with filled SGD momentum
buffers, ~460 MB) in a folder is uploaded ``--repeats`` times, alternating which goes first, by

pyarrow (as Ray Train)
    what Ray Train V2 does to persist a reported checkpoint (ray 2.60,
    ``ray/train/v2/_internal/execution/storage.py``: ``StorageContext.persist_current_checkpoint``):
    ``fs.create_dir(dest)`` then ``_pyarrow_fs_copy_files(src_dir, dest,
    source_filesystem=LocalFileSystem, destination_filesystem=fs)``, which is
    ``pyarrow.fs.copy_files(..., use_threads=False, chunk_size=64 MiB)`` for an S3 destination; ``fs``
    is the store's ``pyarrow_filesystem()`` (the ``storage_filesystem`` our ``make_trainer`` gives Ray).
minio
    a plain ``minio.Minio(...).fput_object`` of the same file (minio's default multipart part size).

Reported: MB/s (10^6 bytes per second) median of each, and pyarrow / minio (target: >= 80 %). S3 is
SeaweedFS started by this script unless the ``LBGAT_*`` settings name an s3:// store; the objects
written are deleted afterwards. Both ways first upload a 1 MB file once, untimed (client set-up and
first connections). Everything started here (SeaweedFS, Ray) is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from _common import describe_device, resolve_device

from api_schemas.presets import get_preset
from api_schemas.spec import ExperimentSpec
from trainer.loop import TrainingRun, load_datasets
from workers.settings import StoreSettings
from workers.storage import ArtifactStore, S3Store, experiment_prefix, open_store

log = logging.getLogger("benchmarks.ray_overhead")

PRESET = "lbgat-trades-a0-cifar10"
PAPER_MODELS = ("model.robust={name: wrn34_10}", "model.teacher={name: lbgat_teacher_resnet18}")
SMALL_MODELS = ("model.robust={name: tiny_cnn, width: 32}", "model.teacher={name: tiny_cnn, width: 16}")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
OVERHEAD_TARGET_PCT = 5.0  # ray vs plain epoch cycle, full CIFAR-size epoch on a GPU
UPLOAD_TARGET_RATIO = 0.80  # pyarrow (as Ray) MB/s / minio MB/s
MB = 1_000_000
RAY_CHUNK_SIZE = 64 * 1024 * 1024  # Ray's _pyarrow_fs_copy_files default chunk_size


# ---------------------------------------------------------------------------------------------- results


@dataclass
class TrainResult:
    device: str
    models: str
    train_images: int
    batch_size: int
    epochs: int
    threads: int | None
    store: str
    plain_setup_s: float
    plain_cycles_s: list[float]
    plain_train_s: list[float]
    ray_cycles_s: list[float | None]  # None for epoch 1 (no previous finished_at)
    ray_train_s: list[float]
    plain_median_s: float
    ray_median_s: float
    ratio: float
    overhead_pct: float
    fit_wall_s: float
    one_off_s: float
    before_first_epoch_s: float
    after_last_epoch_s: float
    full_size_gpu: bool


@dataclass
class UploadResult:
    endpoint: str
    source: str  # "random" or "checkpoint"
    size_mb: float
    repeats: int
    pyarrow_s: list[float] = field(default_factory=list)
    minio_s: list[float] = field(default_factory=list)
    pyarrow_mb_s: float = 0.0
    minio_mb_s: float = 0.0
    ratio: float = 0.0


# ---------------------------------------------------------------------------------------------- spec


def build_spec(args: argparse.Namespace, device: torch.device) -> ExperimentSpec:
    on_gpu = device.type == "cuda"
    overrides = list(SMALL_MODELS if args.small else PAPER_MODELS)
    overrides += [
        "dataset.name=synthetic",
        f"dataset.synthetic_size={args.train_images}",
        f"optimization.epochs={args.epochs}",
        "optimization.schedule.milestones=[]",
        f"runtime.device={device.type}",
        "runtime.progress=false",
        "evaluation.attacks=[{kind: fgsm}]",
        "evaluation.on_best=false",
        "evaluation.n_examples=256",
        "checkpoint.every_n_epochs=1",
        "checkpoint.keep_last=2",
        "resources.num_workers=1",
        f"resources.use_gpu={'true' if on_gpu else 'false'}",
    ]
    if args.train_images >= CIFAR_TRAIN:
        overrides.append(f"dataset.test_limit={CIFAR_TEST}")
    if not on_gpu:
        overrides += [f"runtime.cpu_threads={args.threads}", f"resources.cpus_per_worker={args.threads}"]
    overrides += args.set  # the user's own --set KEY=VALUE come last and win
    return get_preset(PRESET, overrides)


# ---------------------------------------------------------------------------------------------- S3


class LazyS3:
    """S3 StoreSettings, made once on first use and shared by both parts: the LBGAT_* ones when they name
    an s3:// store, else a SeaweedFS started here (workers/dev_s3.py) and killed when `stack` closes."""

    def __init__(self, stack: contextlib.ExitStack, scratch: Path) -> None:
        self._stack, self._scratch = stack, scratch
        self._settings: StoreSettings | None = None

    def get(self) -> StoreSettings:
        if self._settings is None:
            env = StoreSettings()
            if env.scheme == "s3":
                log.info("S3: %s at %s, from the LBGAT_* settings", env.store_url, env.s3_endpoint)
                self._settings = env
            else:
                from workers.dev_s3 import seaweedfs

                print("   starting SeaweedFS (workers/dev_s3.py) ...", flush=True)
                server = self._stack.enter_context(seaweedfs(self._scratch / "seaweedfs"))
                # a long request timeout: pyarrow uploads whole 64 MiB parts in one request
                self._settings = server.settings(
                    bucket=f"lbgat-bench-{secrets.token_hex(4)}", store_timeout_s=60.0
                )
        return self._settings


# ---------------------------------------------------------------------------------------------- part 1


def run_plain(
    spec: ExperimentSpec, device: torch.device, out_dir: Path
) -> tuple[float, list[float], list[float]]:
    """(setup seconds, per-epoch cycle seconds, per-epoch train_epoch seconds) of the plain trainer."""
    start = time.perf_counter()
    datasets = load_datasets(spec)
    run = TrainingRun(spec, out_dir=out_dir, device=device, datasets=datasets)
    setup = time.perf_counter() - start
    metrics_path = out_dir / "metrics.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    cycles, trains = [], []
    for _ in range(spec.optimization.epochs):
        t0 = time.perf_counter()
        metrics = run.train_epoch(progress=False)
        metrics.test_clean_accuracy = run.test_clean_accuracy()
        run.history.append(metrics.model_dump(mode="json"))
        with metrics_path.open("a") as f:
            f.write(metrics.model_dump_json() + "\n")
        run.save(out_dir / f"epoch_{run.epoch:04d}.pt")
        (out_dir / f"epoch_{run.epoch - 2:04d}.pt").unlink(missing_ok=True)  # keep_last=2, as on Ray
        cycles.append(time.perf_counter() - t0)
        trains.append(metrics.seconds)
        log.info("plain epoch %d: cycle %.2fs (train %.2fs)", run.epoch, cycles[-1], metrics.seconds)
    del run, datasets
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the Ray worker is another process on the same GPU
    return setup, cycles, trains


def run_ray(
    spec: ExperimentSpec, store: ArtifactStore, settings: StoreSettings
) -> tuple[float, float, list[dict[str, Any]]]:
    """(fit start, fit end, metrics lines) of one run_training on the connected Ray cluster."""
    from workers.training import run_training

    experiment_id = f"ray-overhead-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    prefix = experiment_prefix(experiment_id, "main")
    start = time.time()
    try:
        run_training(spec, experiment_id=experiment_id, trial="main", store=store, settings=settings)
        end = time.time()
        lines = [json.loads(line) for line in store.get_bytes(prefix + "metrics.jsonl").decode().splitlines()]
    finally:
        with contextlib.suppress(Exception):
            store.delete_prefix(experiment_prefix(experiment_id))
    return start, end, lines


def measure_training(
    args: argparse.Namespace, device: torch.device, scratch: Path, s3: LazyS3
) -> TrainResult:
    spec = build_spec(args, device)
    # With --s3 the server starts first, so that both runs share the machine with it (idle as it is).
    s3_store = s3.get() if args.s3 else None
    print(f"   plain trainer: {spec.optimization.epochs} epochs ...", flush=True)
    setup, plain_cycles, plain_train = run_plain(spec, device, scratch / "plain")

    if not args.ray_address:
        # the Ray started below: token auth on a token in the scratch folder, loopback only (set
        # before Ray is imported, which reads the loopback flag once)
        from workers.ray_auth import ensure_token_file, local_ray_env

        os.environ.update(local_ray_env(ensure_token_file(scratch / "ray")))
    import ray

    if s3_store is not None:
        settings = s3_store
    else:
        if args.ray_address:
            log.warning("--ray-address without --s3: the store is a local folder the workers must see")
        settings = StoreSettings(_env_file=None, artifact_store=f"file://{scratch / 'store'}")  # type: ignore[call-arg]
    store = open_store(settings)
    store.check()

    started_ray = False
    if not ray.is_initialized():
        if args.ray_address:
            ray.init(address=args.ray_address, log_to_driver=args.verbose)
        else:
            ray.init(
                num_cpus=max(os.cpu_count() or 1, int(spec.resources.cpus_per_worker + 0.999)),
                include_dashboard=False,
                log_to_driver=args.verbose,
            )
        started_ray = True
    try:
        print(
            f"   Ray Train (1 worker, store {store.url}): {spec.optimization.epochs} epochs ...", flush=True
        )
        fit_start, fit_end, lines = run_ray(spec, store, settings)
    finally:
        if started_ray:
            ray.shutdown()

    finished = [line.get("extra", {}).get("finished_at") for line in lines]
    if len(lines) != spec.optimization.epochs or any(f is None for f in finished):
        raise SystemExit(
            f"metrics.jsonl of the Ray run has {len(lines)} lines, finished_at in "
            f"{sum(f is not None for f in finished)}; expected {spec.optimization.epochs} with extra.finished_at"
        )
    ray_cycles: list[float | None] = [None] + [b - a for a, b in pairwise(finished)]
    plain_med = statistics.median(plain_cycles[1:])
    ray_med = statistics.median([c for c in ray_cycles[1:] if c is not None])
    fit_wall = fit_end - fit_start
    epochs_sum = (finished[-1] - finished[0]) + ray_med  # epoch 1 counted at the median cycle
    ratio = ray_med / plain_med
    return TrainResult(
        device=describe_device(device),
        models="tiny_cnn w32 + teacher tiny_cnn w16" if args.small else "wrn34_10 + lbgat_teacher_resnet18",
        train_images=args.train_images,
        batch_size=spec.optimization.batch_size,
        epochs=spec.optimization.epochs,
        threads=None if device.type == "cuda" else args.threads,
        store=store.url if args.s3 else "local directory",
        plain_setup_s=setup,
        plain_cycles_s=plain_cycles,
        plain_train_s=plain_train,
        ray_cycles_s=ray_cycles,
        ray_train_s=[float(line["seconds"]) for line in lines],
        plain_median_s=plain_med,
        ray_median_s=ray_med,
        ratio=ratio,
        overhead_pct=(ratio - 1.0) * 100.0,
        fit_wall_s=fit_wall,
        one_off_s=fit_wall - epochs_sum,
        before_first_epoch_s=finished[0] - fit_start - ray_med,
        after_last_epoch_s=fit_end - finished[-1],
        full_size_gpu=device.type == "cuda" and args.train_images >= CIFAR_TRAIN and not args.small,
    )


def print_training(r: TrainResult) -> None:
    threads = f"; {r.threads} torch thread(s) each" if r.threads is not None else ""
    print(f"\n== Ray Train overhead on {r.device}")
    print(
        f"   preset {PRESET}: {r.models}; {r.train_images} synthetic images, batch {r.batch_size}; "
        f"{r.epochs} epochs{threads}; Ray store: {r.store}"
    )
    print(
        f"   {'epoch':>5} {'plain cycle s':>14} {'plain train s':>14} {'ray cycle s':>12} {'ray train s':>12}"
    )
    for i in range(r.epochs):
        ray_cycle = r.ray_cycles_s[i]
        shown = "-" if ray_cycle is None else f"{ray_cycle:.3f}"
        note = "  (warm-up, not compared)" if i == 0 else ""
        print(
            f"   {i + 1:>5} {r.plain_cycles_s[i]:>14.3f} {r.plain_train_s[i]:>14.3f} {shown:>12} "
            f"{r.ray_train_s[i]:>12.3f}{note}"
        )
    print(
        f"   median cycle, epochs 2..{r.epochs}: plain {r.plain_median_s:.3f} s, ray {r.ray_median_s:.3f} s"
    )
    if r.full_size_gpu:
        verdict = "met" if r.overhead_pct < OVERHEAD_TARGET_PCT else "NOT met"
        target = f"  (target < {OVERHEAD_TARGET_PCT:g} %: {verdict})"
    else:
        target = (
            f"  (the < {OVERHEAD_TARGET_PCT:g} % target applies to a full CIFAR-size epoch of the "
            "paper models on a GPU; this is not one)"
        )
    print(f"   ratio ray / plain = {r.ratio:.3f}x, overhead {r.overhead_pct:+.1f} %{target}")
    print(
        f"   one-off cost on Ray: {r.one_off_s:.1f} s = fit() {r.fit_wall_s:.1f} s - {r.epochs} epoch cycles "
        f"(epoch 1 at the median); before epoch 1 ended {r.before_first_epoch_s:.1f} s, after the last "
        f"epoch {r.after_last_epoch_s:.1f} s (plain trainer setup: {r.plain_setup_s:.1f} s)"
    )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- part 2


def write_random(path: Path, size: int) -> None:
    chunk = 4 << 20
    with path.open("wb") as f:
        left = size
        while left:
            n = min(chunk, left)
            f.write(os.urandom(n))
            left -= n


def write_real_checkpoint(path: Path) -> None:
    """A TrainingRun checkpoint of the paper models (CPU), with SGD momentum buffers as after a step."""
    from trainer.data import make_synthetic
    from trainer.loop import Datasets

    spec = get_preset(
        PRESET,
        [*PAPER_MODELS, "dataset.name=synthetic", "runtime.device=cpu", "runtime.progress=false"],
    )
    tiny = Datasets(train=make_synthetic(64, seed=0), val=None, test=make_synthetic(16, seed=1))
    run = TrainingRun(spec, out_dir=path.parent, device="cpu", datasets=tiny)
    for group in run.optimizer.param_groups:
        for p in group["params"]:
            run.optimizer.state[p]["momentum_buffer"] = torch.randn_like(p)  # random: not compressible
    run.save(path)
    del run
    gc.collect()


def measure_upload(args: argparse.Namespace, scratch: Path, s3: LazyS3) -> UploadResult:
    import minio
    import pyarrow.fs

    settings = s3.get()
    store = S3Store(settings)
    store.check()
    fs, base = store.pyarrow_filesystem()
    client = minio.Minio(
        settings.s3_endpoint or "",
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value() if settings.s3_secret_key else None,
        secure=settings.s3_secure,
        region=settings.s3_region,
    )
    src_dir = scratch / "upload" / "checkpoint_000000"
    src_dir.mkdir(parents=True)
    src = src_dir / "state.pt"
    if args.real_ckpt:
        print("   building a checkpoint of the paper models ...", flush=True)
        write_real_checkpoint(src)
    else:
        write_random(src, int(args.ckpt_mb * MB))
    size = src.stat().st_size
    result = UploadResult(
        endpoint=settings.s3_endpoint or "",
        source="checkpoint" if args.real_ckpt else "random",
        size_mb=size / MB,
        repeats=args.repeats,
    )
    bench = f"bench/ray-overhead-{secrets.token_hex(4)}/"
    object_base = f"{store.prefix}/{bench}" if store.prefix else bench

    def via_pyarrow(i: int, folder: Path = src_dir) -> float:
        dest = f"{base}/{bench}pyarrow-{i}"
        t0 = time.perf_counter()
        fs.create_dir(dest)
        pyarrow.fs.copy_files(
            str(folder),
            dest,
            source_filesystem=pyarrow.fs.LocalFileSystem(),
            destination_filesystem=fs,
            use_threads=False,
            chunk_size=RAY_CHUNK_SIZE,
        )
        seconds = time.perf_counter() - t0
        landed = fs.get_file_info(f"{dest}/{src.name}").size
        if folder == src_dir and landed != size:
            raise SystemExit(f"pyarrow upload {i}: {landed} bytes landed, expected {size}")
        return seconds

    def via_minio(i: int, folder: Path = src_dir) -> float:
        name = f"{object_base}minio-{i}/{src.name}"
        t0 = time.perf_counter()
        client.fput_object(store.bucket, name, str(folder / src.name))
        seconds = time.perf_counter() - t0
        landed = client.stat_object(store.bucket, name).size
        if folder == src_dir and landed != size:
            raise SystemExit(f"minio upload {i}: {landed} bytes landed, expected {size}")
        return seconds

    print(f"   uploading {size / MB:.1f} MB x {args.repeats} each way to {store.url} ...", flush=True)
    try:
        # Untimed warm-up of both ways with a 1 MB file: client set-up and the first connections.
        warm_dir = scratch / "upload" / "warm-up"
        warm_dir.mkdir()
        write_random(warm_dir / src.name, MB)
        via_pyarrow(-1, warm_dir)
        via_minio(-1, warm_dir)
        store.delete_prefix(bench)
        for i in range(args.repeats):
            order = (via_pyarrow, via_minio) if i % 2 == 0 else (via_minio, via_pyarrow)
            for fn in order:
                seconds = fn(i)
                (result.pyarrow_s if fn is via_pyarrow else result.minio_s).append(seconds)
                log.info("upload %d %s: %.3fs", i, fn.__name__, seconds)
            store.delete_prefix(bench)  # keep the server's disk use at one copy each
    finally:
        with contextlib.suppress(Exception):
            store.delete_prefix(bench)
    result.pyarrow_mb_s = size / MB / statistics.median(result.pyarrow_s)
    result.minio_mb_s = size / MB / statistics.median(result.minio_s)
    result.ratio = result.pyarrow_mb_s / result.minio_mb_s
    return result


def print_upload(r: UploadResult) -> None:
    what = "a paper-model checkpoint" if r.source == "checkpoint" else "random bytes"
    print(f"\n== checkpoint upload to S3 at {r.endpoint}: {r.size_mb:.1f} MB of {what}, {r.repeats} repeats")
    print(f"   {'way':<22} {'median MB/s':>12} {'median s':>10}  all runs (s)")
    for label, mb_s, times in (
        ("pyarrow (as Ray Train)", r.pyarrow_mb_s, r.pyarrow_s),
        ("minio fput_object", r.minio_mb_s, r.minio_s),
    ):
        runs = " ".join(f"{t:.3f}" for t in times)
        print(f"   {label:<22} {mb_s:>12.1f} {statistics.median(times):>10.3f}  {runs}")
    verdict = "met" if r.ratio >= UPLOAD_TARGET_RATIO else "NOT met"
    print(
        f"   pyarrow / minio = {r.ratio * 100:.0f} %  (target >= {UPLOAD_TARGET_RATIO * 100:.0f} %: {verdict})"
    )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Per-epoch overhead of Ray Train over the plain trainer, and checkpoint upload MB/s to S3.",
    )
    p.add_argument(
        "--device", default="auto", help="auto (default), cpu or cuda (Ray gets the GPU it assigns)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="epochs of each run, >= 2 (default 5 on CPU, 4 on GPU)"
    )
    p.add_argument(
        "--small",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tiny_cnn models (width 32 robust, 16 teacher) instead of the paper's; default: on without CUDA",
    )
    p.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="synthetic training images (default 50000 with the paper models, 512 with --small)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU only: torch threads of both runs (runtime.cpu_threads, resources.cpus_per_worker); default 1",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra spec override for both runs (as `lbgat train --set`)",
    )
    p.add_argument(
        "--s3",
        action="store_true",
        help="Ray run's store on S3: SeaweedFS started here, or the LBGAT_* settings if they name s3://",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting one")
    p.add_argument("--ckpt-mb", type=float, default=64.0, help="upload file size in MB (default 64)")
    p.add_argument(
        "--real-ckpt",
        action="store_true",
        help="upload a real checkpoint of the paper models (~460 MB) instead of --ckpt-mb random bytes",
    )
    p.add_argument("--repeats", type=int, default=3, help="uploads each way (default 3)")
    p.add_argument("--skip-train", action="store_true", help="skip part 1 (Ray Train overhead)")
    p.add_argument("--skip-upload", action="store_true", help="skip part 2 (upload throughput)")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="log progress (and Ray's worker logs) to stderr"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if args.small is None:
        args.small = not on_gpu
    if args.epochs is None:
        args.epochs = 4 if on_gpu else 5
    if args.train_images is None:
        args.train_images = 512 if args.small else CIFAR_TRAIN
    if args.epochs < 2:
        raise SystemExit("--epochs must be >= 2 (the first epoch is warm-up)")
    if args.repeats < 1 or args.ckpt_mb <= 0 or args.threads < 1:
        raise SystemExit("--repeats and --threads must be >= 1 and --ckpt-mb > 0")
    if on_gpu:
        torch.cuda.set_device(device)

    results: dict[str, Any] = {"torch": torch.__version__}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lbgat-ray-overhead-")))
        s3 = LazyS3(stack, scratch)
        if not args.skip_train:
            training = measure_training(args, device, scratch, s3)
            print_training(training)
            results["training"] = asdict(training)
        if not args.skip_upload:
            upload = measure_upload(args, scratch, s3)
            print_upload(upload)
            results["upload"] = asdict(upload)
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
