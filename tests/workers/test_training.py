"""Ray Train on a real local Ray with real S3 (SeaweedFS): distributed LBGAT, worker loss, entrypoint errors."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from api_schemas import TrainSummary
from api_schemas.presets import get_preset
from trainer.loop import TrainingRun
from workers import run as entry
from workers.storage import open_store
from workers.train_worker import training_protocol

pytestmark = pytest.mark.usefixtures("ray_cluster")

FAST = [
    "optimization.schedule.milestones=[4]",
    "runtime.progress=false",
    "evaluation.attacks=[{kind: pgd, steps: 10, step_size: 0.02}]",
    "evaluation.on_best=false",
    "checkpoint.every_n_epochs=1",
    "checkpoint.keep_last=2",
]


def _spec_file(tmp_path, overrides):
    spec = get_preset("digits", overrides)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return spec, path


def test_two_workers_write_s3_and_match_single_process(s3_env, tmp_path):
    overrides = [*FAST, "optimization.epochs=6", "resources.num_workers=2"]
    spec, path = _spec_file(tmp_path, overrides)
    assert entry.main(["--spec", str(path), "--experiment-id", "dist2"]) == 0

    store = open_store(s3_env)
    prefix = "experiments/dist2/main/"
    keys = {o.key for o in store.list(prefix)}
    assert {
        prefix + "spec.json",
        prefix + "metrics.jsonl",
        prefix + "summary.json",
        prefix + "checkpoints/last.pt",
    } <= keys
    assert any(k.startswith(prefix + "ray/checkpoint_") for k in keys), sorted(keys)
    lines = [json.loads(l) for l in store.get_bytes(prefix + "metrics.jsonl").decode().splitlines()]
    assert [l["epoch"] for l in lines] == [1, 2, 3, 4, 5, 6]
    summary = TrainSummary.model_validate(store.get_json(prefix + "summary.json"))
    assert summary.epochs == 6 and summary.provenance["world_size"] == 2
    # a (checkpoint, protocol) result: the stored file's sha256 and the suite's custom version
    last_sha = hashlib.sha256(store.get_bytes(prefix + "checkpoints/last.pt")).hexdigest()
    assert summary.last_checkpoint_sha256 == last_sha and summary.protocol_id == "custom"
    assert summary.protocol_version == training_protocol(spec)[1] and len(summary.protocol_version) == 12

    # the same spec in one process: two workers with batch 32 each reproduce batch 64 closely
    single = TrainingRun(spec, out_dir=tmp_path / "single").fit()
    assert abs(summary.final.clean_accuracy - single.final.clean_accuracy) < 0.06
    dist_pgd, single_pgd = summary.final.attack("pgd10").accuracy, single.final.attack("pgd10").accuracy
    assert abs(dist_pgd - single_pgd) < 0.1, (dist_pgd, single_pgd)
    assert summary.final.clean_accuracy > 0.8

    # `lbgat eval` takes the checkpoint URL summary.json gives and fetches it from the store
    from service.client.cli import main as lbgat

    suite = tmp_path / "suite.yaml"
    suite.write_text("evaluation: {attacks: [{kind: fgsm}]}\n")
    out = tmp_path / "report.json"
    argv = ["eval", summary.last_checkpoint, "--suite", str(suite), "--n-examples", "100", "--out", str(out)]
    assert lbgat([*argv, "--device", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["checkpoint"] == summary.last_checkpoint and report["epoch"] == 6
    assert report["n_examples"] == 100 and report["attacks"][0]["name"] == "fgsm"
    assert lbgat(["eval", "s3://elsewhere/x.pt"]) == 2


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _train_worker_pids() -> list[int]:
    """PIDs of this session's Ray Train workers: ray.init() started the cluster as our descendants."""
    pids = []
    for pid in sorted(_descendants(os.getpid())):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"RayTrainWorker" in f.read():
                    pids.append(pid)
        except OSError:
            continue
    return pids


def test_killed_worker_resumes_from_last_checkpoint(s3_env, tmp_path):
    overrides = [
        *FAST,
        "optimization.epochs=8",
        "optimization.schedule.milestones=[6]",
        "resources.num_workers=2",
        "resources.max_failures=2",
    ]
    _, path = _spec_file(tmp_path, overrides)
    store = open_store(s3_env)
    metrics_key = "experiments/kill/main/metrics.jsonl"
    result: dict[str, int] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault("code", entry.main(["--spec", str(path), "--experiment-id", "kill"]))
    )
    thread.start()
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and killed is None:
        # after epoch 3's metrics line, the checkpoints of epochs 1-2 are surely registered with Ray
        if store.exists(metrics_key) and len(store.get_bytes(metrics_key).splitlines()) >= 3:
            pids = _train_worker_pids()
            if pids:
                lines_at_kill = len(store.get_bytes(metrics_key).splitlines())
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed is not None, "the run never reached epoch 3"
    thread.join(timeout=400)
    assert not thread.is_alive() and result["code"] == 0
    events = [
        json.loads(l) for l in store.get_bytes("experiments/kill/main/events.jsonl").decode().splitlines()
    ]
    resumed = [e for e in events if e["event"] == "resumed"]
    # restarted from a checkpoint Ray had registered (not from scratch); Ray's controller collects
    # reports asynchronously, so the newest epochs before the kill may not be among them yet
    assert resumed and 1 <= resumed[0]["epoch"] <= lines_at_kill, events
    lines = [json.loads(l) for l in store.get_bytes(metrics_key).decode().splitlines()]
    assert [l["epoch"] for l in lines] == list(range(1, 9))
    summary = TrainSummary.model_validate(store.get_json("experiments/kill/main/summary.json"))
    assert summary.epochs == 8 and summary.final.clean_accuracy > 0.8


def test_store_down_at_start_fails_fast_with_clear_message(dead_s3_settings, tmp_path):
    _, path = _spec_file(tmp_path, [*FAST, "optimization.epochs=6"])
    env = {**os.environ, **dead_s3_settings.as_env()}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "workers.run", "--spec", str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert proc.returncode == entry.EXIT_STORE, proc.stderr
    assert dead_s3_settings.s3_endpoint in proc.stderr
    assert dead_s3_settings.s3_secret_key.get_secret_value() not in proc.stderr + proc.stdout
    assert elapsed < 60


def test_bad_spec_and_unknown_job_are_input_errors(s3_env, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "method: {name: lbgat, alpha: -1}\nmodel: {robust: {name: tiny_cnn}}\ndataset: {name: digits}\n"
    )
    assert entry.main(["--spec", str(bad)]) == entry.EXIT_BAD_INPUT
    assert "method.alpha" in capsys.readouterr().err
    assert entry.main(["--job-id", "nope"]) == entry.EXIT_BAD_INPUT
    assert "experiments/nope/spec.json" in capsys.readouterr().err


def test_relative_paths_are_resolved_against_the_job_directory(tmp_path):
    """Ray Train starts workers in their own directory: the spec they get names files absolutely."""
    from workers.training import absolute_paths

    spec = get_preset(
        "digits",
        [
            "dataset.root=data",
            "evaluation.attacks=[{kind: transfer, name: local, source_checkpoint: runs/src/last.pt}, "
            "{kind: transfer, name: remote, source_checkpoint: s3://bucket/x.pt}]",
        ],
    )
    fixed = absolute_paths(spec, base=tmp_path)
    assert fixed.dataset.root == str(tmp_path / "data")
    assert fixed.evaluation.attacks[0].source_checkpoint == str(tmp_path / "runs/src/last.pt")
    assert fixed.evaluation.attacks[1].source_checkpoint == "s3://bucket/x.pt"
    assert absolute_paths(fixed, base=tmp_path / "elsewhere") == fixed  # absolute paths stay
