"""LBGAT_GPU_RESOURCE: the Ray resource the workers ask for as their GPUs ("GPU", or a custom resource
standing for one on a CPU-only cluster, as in tests/e2e/test_multinode.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from api_schemas.presets import get_preset
from workers.evaluation import _actor_options
from workers.settings import GPU_RESOURCE_ENV, StoreSettings, gpu_resource
from workers.training import scaling_config


def spec(*overrides: str):
    return get_preset("digits", ["resources.use_gpu=true", "resources.num_workers=2", *overrides])


def test_real_gpus_by_default(monkeypatch):
    monkeypatch.delenv(GPU_RESOURCE_ENV, raising=False)
    config = scaling_config(spec("resources.gpus_per_worker=0.5"))
    assert config.use_gpu and config.num_workers == 2
    assert config.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}


def test_a_custom_resource_stands_for_a_gpu(monkeypatch, tmp_path):
    monkeypatch.setenv(GPU_RESOURCE_ENV, "fake_gpu")
    config = scaling_config(spec())
    assert not config.use_gpu  # held, not used: the workers train on CPUs
    assert config.resources_per_worker == {"CPU": 1.0, "fake_gpu": 1.0}
    options = _actor_options(
        SimpleNamespace(cpus_per_worker=1, gpus_per_worker=1),
        StoreSettings(artifact_store=f"file://{tmp_path}"),
        use_gpu=True,
    )
    assert options["num_gpus"] == 0 and options["resources"] == {"fake_gpu": 1}


def test_cpu_runs_ask_for_no_gpu_resource(monkeypatch):
    monkeypatch.setenv(GPU_RESOURCE_ENV, "fake_gpu")
    config = scaling_config(spec("resources.use_gpu=false"))
    assert config.resources_per_worker == {"CPU": 1.0}


def test_cpu_cannot_stand_for_a_gpu(monkeypatch):
    monkeypatch.setenv(GPU_RESOURCE_ENV, "CPU")
    with pytest.raises(ValueError, match="cannot stand for a GPU"):
        gpu_resource()
