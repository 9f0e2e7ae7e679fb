"""Evaluation scaling: the same evaluation in this process and as an evaluation job on 1 and 2 Ray workers.

Run from the repository root (not a test; nothing here is collected by pytest)::

    python benchmarks/eval_scaling.py                      # CPU: tiny_cnn, 256 images, 8 shards of 32
    python benchmarks/eval_scaling.py --images 512 --json
    python benchmarks/eval_scaling.py --images 128 --repeats 3   # medians of 3 rotated rounds
    python benchmarks/eval_scaling.py --workers 1 2 4 --threads 1

What is timed, on the same model, images, attacks, seed and shards:

plain
    ``trainer.evaluation.evaluate_records`` shard after shard in this process, the model and the
    test split already loaded (what a researcher's loop or training's final evaluation runs).
ray-N
    ``workers.evaluation.run_evaluation`` of an evaluation job (``EvaluationJobSpec``) on N Ray actors,
    end to end: the actors start, each downloads the checkpoint from the store (a local folder) and
    loads the model and the split, shards are handed out one at a time, every shard's records are
    written to the store, and the driver reads them all back for the summary. Its wall time includes
    all of that; ``compute`` is the sum of the shards' own seconds (ShardInfo.seconds).

The model is trained first (natural training, ``trainer.loop.TrainingRun``, a few epochs on synthetic
CIFAR-size data: 3x32x32, 10 classes), so that the attacks have correctly classified examples to work
on. Attacks: PGD-20 (CE, step 2/255, uniform start) and AutoAttack at l_inf eps 8/255; on a CPU
AutoAttack is version custom with ``--aa-attacks`` (default APGD-CE, which pyautoattack's custom
version runs with 5 restarts; FAB-T and Square take minutes per image there) and the model is
``tiny_cnn`` (width 32); on a GPU it is AutoAttack standard and WRN-34-10 (trained one epoch). Each worker uses ``--threads`` torch threads (``cpu_threads``) and as many Ray
CPUs; the plain run uses the same number of threads. On a GPU, the workers share the GPUs there are
(``gpus_per_worker`` = GPUs / workers, at most 1).

With ``--repeats R`` every run is made R times, in a rotated order each round (so that a busy spell of
a shared machine hits every mode alike), and the medians are reported; each line also shows the
1-minute load average. Reported: images/s of each (evaluated images / wall time), the speed-up of N workers over one
worker, and Ray's overhead for one worker: (ray-1 wall / plain wall - 1). On a CPU the script then
measures what the machine gives two processes at that moment (two single-threaded torch processes
at once vs one alone, `machine_ceiling`; 2.00x on two idle cores): on a shared box other work takes
its share of the cores, and no number of workers beats that ceiling. Targets on a 2-core
machine: 2 workers >= 1.7x one worker, one worker's overhead < 10 %. The per-example records of
every run must be identical (the same shards and seeds give the same records on any worker); the
script checks that and says so. Ray is started here (token auth on a token in a temporary folder,
loopback addresses; see workers/ray_auth.py) and stopped at the end; everything is written to a
temporary folder that is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import describe_device, resolve_device

from api_schemas import parse_spec
from api_schemas.evaluations import EvaluationJobSpec
from api_schemas.protocols import EvaluationSuite, custom_protocol_version
from trainer.checkpoint import load_model
from trainer.evaluation import ExampleRecords, evaluate_records
from trainer.loop import TrainingRun, load_test_split
from workers.settings import StoreSettings
from workers.storage import experiment_prefix, open_store

log = logging.getLogger("benchmarks.eval_scaling")

SPEEDUP_TARGET = 1.7  # 2 workers over 1 worker, on the 2-core CI machine
OVERHEAD_TARGET_PCT = 10.0  # 1 Ray worker over the plain in-process evaluation
EPS, STEP = 8 / 255, 2 / 255


def build_training_spec(args: argparse.Namespace, on_gpu: bool):
    model = {"name": "wrn34_10"} if on_gpu else {"name": "tiny_cnn", "width": 32}
    return parse_spec(
        {
            "name": "eval-scaling-model",
            "method": {"name": "natural"},
            "model": {"robust": model},
            "dataset": {"name": "synthetic", "synthetic_size": max(4 * args.images, 4096), "augment": False},
            "threat_model": {"eps": EPS, "step_size": STEP, "steps": 10},
            "optimization": {
                "lr": 0.05,
                "batch_size": 128,
                "epochs": 1 if on_gpu else args.train_epochs,
                "schedule": {"kind": "constant"},
            },
            "evaluation": {"attacks": [{"kind": "fgsm"}], "n_examples": 64},
            "runtime": {
                "device": "cuda" if on_gpu else "cpu",
                "progress": False,
                "cpu_threads": args.threads,
            },
        }
    )


def build_suite(args: argparse.Namespace, on_gpu: bool) -> EvaluationSuite:
    autoattack = (
        {"kind": "autoattack", "version": "standard"}
        if on_gpu
        else {"kind": "autoattack", "version": "custom", "attacks": args.aa_attacks}
    )
    return EvaluationSuite(
        threat_model={"norm": "linf", "eps": EPS, "step_size": STEP, "steps": 20},
        attacks=[{"kind": "pgd", "steps": 20, "step_size": STEP}, autoattack],
        n_examples=args.images,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        seed=0,
    )


def run_plain(checkpoint: Path, job: EvaluationJobSpec, device: torch.device) -> tuple[float, ExampleRecords]:
    model = load_model(checkpoint, device=device)
    data = load_test_split(job.dataset)
    suite = job.suite
    n = job.n_examples(len(data))
    attacks = suite.resolved_attacks()
    parts = []
    start = time.perf_counter()
    for shard, begin in enumerate(range(0, n, suite.shard_size)):
        stop = min(begin + suite.shard_size, n)
        parts.append(
            evaluate_records(
                model,
                data.subset(torch.arange(begin, stop)),
                attacks,
                seed=suite.seed,
                shard=shard,
                start=begin,
                batch_size=suite.batch_size,
                device=device,
            )
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, ExampleRecords.concat(parts)


def stored_records(store, job_id: str, n_shards: int) -> tuple[np.ndarray, np.ndarray, float]:
    from workers.evaluation import npz_arrays, shard_key

    clean, robust, seconds = [], [], 0.0
    for k in range(n_shards):
        arrays = npz_arrays(store.get_bytes(shard_key(job_id, k, "npz")))
        clean.append(arrays["clean"])
        robust.append(arrays["robust"])
        seconds += store.get_json(shard_key(job_id, k, "json"))["seconds"]
    return np.concatenate(clean), np.concatenate(robust), seconds


_BURN = """
import sys, time, torch
torch.set_num_threads(1)
conv = torch.nn.Conv2d(32, 32, 3, padding=1)
x = torch.rand(64, 32, 32, 32, requires_grad=True)
start = time.perf_counter()
for _ in range(int(sys.argv[1])):
    conv(x).square().sum().backward()
print(time.perf_counter() - start)
"""


def machine_ceiling(threads: int, steps: int = 60) -> float:
    """What this machine gives two single-threaded torch processes at once: 2 * (time alone) / (time
    of the slower of two run together). 2.0 on two idle cores; less where other work shares them."""
    import subprocess

    def burn(n: int) -> list[float]:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _BURN, str(steps)], stdout=subprocess.PIPE, text=True, env=env
            )
            for _ in range(n)
        ]
        return [float(p.communicate()[0]) for p in procs]

    alone = burn(1)[0]
    together = max(burn(2))
    return 2 * alone / together


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluation images/s: in-process vs 1 and 2 (or more) Ray workers."
    )
    p.add_argument("--images", type=int, default=256, help="images evaluated (the first n of the test split)")
    p.add_argument("--shard-size", type=int, default=32, help="examples per shard")
    p.add_argument("--batch-size", type=int, default=64, help="attack batch size")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="Ray worker counts to time")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker and for the plain run (CPU)"
    )
    p.add_argument("--train-epochs", type=int, default=3, help="natural-training epochs of the CPU model")
    p.add_argument(
        "--aa-attacks",
        nargs="+",
        default=["apgd-ce"],
        help="on a CPU: AutoAttack's attacks (version custom; its APGD-CE makes 5 restarts)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--no-ceiling", action="store_true", help="skip measuring the machine's two-process ceiling (CPU)"
    )
    p.add_argument("--json", action="store_true", help="also print the figures as one JSON object")
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds of every run, in rotated order; medians are reported"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log the jobs' progress lines")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    if not on_gpu:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="lbgat-eval-scaling-") as folder:
        scratch = Path(folder)
        # a local Ray with token auth on a token in the scratch folder, loopback only (set before
        # Ray is imported, which reads the loopback flag once)
        from workers.ray_auth import ensure_token_file, local_ray_env

        os.environ.update(local_ray_env(ensure_token_file(scratch / "ray")))
        import ray

        from workers.evaluation import run_evaluation

        settings = StoreSettings(_env_file=None, artifact_store=f"file://{scratch / 'store'}")  # type: ignore[call-arg]
        store = open_store(settings)
        store.check()

        spec = build_training_spec(args, on_gpu)
        print(
            f"training the model ({spec.model.robust.name}, {spec.optimization.epochs} epoch(s)) ...",
            flush=True,
        )
        trained = TrainingRun(spec, out_dir=scratch / "train").fit(evaluate_at_end=False)
        checkpoint = scratch / "train" / "checkpoints" / "last.pt"
        data = checkpoint.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        store.put_bytes(f"checkpoints/{sha}.pt", data)
        suite = build_suite(args, on_gpu)

        def job(workers: int) -> EvaluationJobSpec:
            gpus = torch.cuda.device_count() if on_gpu else 0
            return EvaluationJobSpec(
                name=f"scale-{workers}",
                protocol_id="custom",
                protocol_version=custom_protocol_version(suite),
                suite=suite,
                dataset=spec.dataset,
                checkpoint={"key": f"checkpoints/{sha}.pt", "sha256": sha},
                num_workers=workers,
                cpus_per_worker=args.threads,
                cpu_threads=args.threads,
                use_gpu=on_gpu,
                gpus_per_worker=min(1.0, gpus / workers) if on_gpu else 0.0,
            )

        print(
            f"model clean accuracy {trained.final.clean_accuracy:.3f}; evaluating {args.images} images in "
            f"shards of {args.shard_size}: {[a.label() for a in suite.resolved_attacks()]} on {describe_device(device)}",
            flush=True,
        )
        ray.init(
            address="local",  # a new instance, never one that happens to run on the machine
            num_cpus=max(os.cpu_count() or 1, max(args.workers) * args.threads),
            include_dashboard=False,
            log_to_driver=args.verbose,
            _temp_dir=str(scratch / "r"),
        )
        modes: list[int] = [0, *args.workers]  # 0: plain
        walls: dict[int, list[float]] = {m: [] for m in modes}
        computes: dict[int, list[float]] = {m: [] for m in modes}
        reference: tuple[np.ndarray, np.ndarray] | None = None
        identical = True
        try:
            for repeat in range(args.repeats):
                # a rotated order each round, so that a busy spell of the machine hits every mode alike
                for mode in modes[repeat % len(modes) :] + modes[: repeat % len(modes)]:
                    if mode == 0:
                        wall, records = run_plain(checkpoint, job(1), device)
                        clean, robust, compute = records.clean, records.robust, wall
                    else:
                        job_id = f"scale-w{mode}-r{repeat}"
                        spec_w = job(mode)
                        store.put_json(
                            experiment_prefix(job_id) + "spec.json", spec_w.model_dump(mode="json")
                        )
                        start = time.perf_counter()
                        summary = run_evaluation(
                            spec_w, evaluation_id=job_id, store=store, settings=settings, attempt=1
                        )
                        wall = time.perf_counter() - start
                        clean, robust, compute = stored_records(store, job_id, summary.n_shards)
                    if reference is None:
                        reference = (clean, robust)
                    identical &= np.array_equal(clean, reference[0]) and np.array_equal(robust, reference[1])
                    walls[mode].append(wall)
                    computes[mode].append(compute)
                    name = "plain" if mode == 0 else f"ray, {mode} worker(s)"
                    print(
                        f"   [{repeat + 1}/{args.repeats}] {name}: {wall:.1f} s (compute {compute:.1f} s, "
                        f"load {os.getloadavg()[0]:.1f})",
                        flush=True,
                    )
        finally:
            ray.shutdown()

    assert reference is not None
    plain_s = statistics.median(walls[0])
    runs = {
        w: {
            "wall_s": statistics.median(walls[w]),
            "compute_s": statistics.median(computes[w]),
            "walls_s": walls[w],
        }
        for w in args.workers
    }

    n = args.images
    result: dict[str, Any] = {
        "device": describe_device(device),
        "model": spec.model.robust.name,
        "images": n,
        "shard_size": args.shard_size,
        "threads_per_worker": args.threads,
        "attacks": [a.label() for a in suite.resolved_attacks()],
        "repeats": args.repeats,
        "plain": {"wall_s": plain_s, "images_per_s": n / plain_s, "walls_s": walls[0]},
        "ray": {str(w): {**r, "images_per_s": n / r["wall_s"]} for w, r in runs.items()},
        "identical_records": bool(identical),
        "clean_accuracy": float(reference[0].mean()),
    }
    print()
    print(f"{'run':<14}{'wall s':>9}{'images/s':>10}{'vs 1 worker':>13}{'vs plain':>10}")
    print(f"{'plain':<14}{plain_s:>9.1f}{n / plain_s:>10.1f}{'':>13}{'1.00x':>10}")
    one = runs.get(1, {}).get("wall_s")
    for workers, r in runs.items():
        speedup = f"{one / r['wall_s']:.2f}x" if one else "-"
        print(
            f"{f'ray, {workers} worker(s)':<14}{r['wall_s']:>9.1f}{n / r['wall_s']:>10.1f}"
            f"{speedup:>13}{plain_s / r['wall_s']:>9.2f}x"
        )
    if one is not None:
        overhead = (one / plain_s - 1) * 100
        result["overhead_1_worker_pct"] = overhead
        mark = "ok" if overhead < OVERHEAD_TARGET_PCT else "MISSED"
        print(
            f"Ray overhead, 1 worker: {overhead:+.1f} % of the plain run (target < {OVERHEAD_TARGET_PCT:.0f} %: {mark})"
        )
    if one is not None and 2 in runs:
        speedup = one / runs[2]["wall_s"]
        result["speedup_2_workers"] = speedup
        mark = "ok" if speedup >= SPEEDUP_TARGET else "MISSED"
        print(f"speed-up, 2 workers over 1: {speedup:.2f}x (target >= {SPEEDUP_TARGET}x: {mark})")
    if not on_gpu and not args.no_ceiling:
        ceiling = machine_ceiling(args.threads)
        result["machine_two_process_ceiling"] = ceiling
        print(
            f"this machine's ceiling for 2 workers now: {ceiling:.2f}x (two {args.threads}-thread torch "
            "processes at once vs one alone; 2.00x on two idle cores)"
        )
    print(f"per-example records identical in every run: {'yes' if identical else 'NO'}")
    if args.json:
        print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
