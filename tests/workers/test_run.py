"""`python -m workers.run`: input errors are reported as such (exit 2, one line) before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys

from api_schemas.presets import get_preset
from workers.run import _dataset_not_found


def test_a_dataset_root_that_does_not_exist_is_an_input_error_before_ray_starts(tmp_path):
    spec = get_preset("digits", ["dataset.name=cifar10", "dataset.root=no-such-folder"])
    path = tmp_path / "spec.json"
    path.write_text(spec.model_dump_json())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LBGAT_", "RAY_ADDRESS"))}
    result = subprocess.run(
        [sys.executable, "-m", "workers.run", "--spec", str(path)],
        cwd=tmp_path,
        env={**env, "LBGAT_ARTIFACT_STORE": f"file://{tmp_path / 'store'}", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: dataset.root 'no-such-folder' does not exist"), last
    assert not (tmp_path / ".lbgat").exists()  # no local Ray was started for it


def test_a_dataset_missing_on_a_worker_is_found_in_ray_trains_wrapped_failure():
    class DatasetNotFoundError(FileNotFoundError):
        pass

    try:
        try:
            raise DatasetNotFoundError("CIFAR-10 not found under /data: expected cifar-10-batches-py/")
        except DatasetNotFoundError as inner:
            raise RuntimeError("Training failed") from inner
    except RuntimeError as wrapped:
        assert _dataset_not_found(wrapped) == "CIFAR-10 not found under /data: expected cifar-10-batches-py/"
    text = RuntimeError(
        "Worker 0 failed:\nTraceback ...\ntrainer.data.arrays.DatasetNotFoundError: MNIST not found under x\n"
    )
    assert _dataset_not_found(text) == "MNIST not found under x"
    assert _dataset_not_found(RuntimeError("CUDA out of memory")) is None
