"""A checkpoint is untrusted input: it loads with weights_only=True through one function, or not at all.

Crafted files (a pickle that runs code, a foreign type, a file too large on disk or unpacked, not
torch's zip format) are refused with a CheckpointError through every entry point that reads one;
format-1 checkpoints (numpy RNG arrays) are refused with the upgrade command, which re-saves them.
"""

from __future__ import annotations

import argparse
import ast
import collections
import decimal
import os
import pickle
import random
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from api_schemas import EvaluationSpec, ThreatModel
from tests.trainer.helpers import digits_spec, tiny_model
from trainer import checkpoint as ckpt
from trainer.checkpoint import CheckpointError, read_checkpoint

REPO = Path(__file__).resolve().parents[2]
REFUSED = "not a checkpoint this project can load safely"
SPEC = {"name": "natural"}


class RunsCode:
    """Unpickling this calls `call(*args)`: what a crafted checkpoint does with weights_only=False."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _writes(marker: Path) -> RunsCode:
    return RunsCode(exec, f"open({str(marker)!r}, 'w').write('ran')")


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    """A real checkpoint of a natural tiny_cnn on digits (one step trained)."""
    from trainer.loop import TrainingRun

    run = TrainingRun(
        digits_spec(SPEC, dataset={"train_limit": 64}), out_dir=tmp_path_factory.mktemp("genuine")
    )
    run.train_step(*next(iter(run.loader)))
    return run.save(run.out_dir / "checkpoints" / "last.pt")


def _crafted(genuine: Path, path: Path, marker: Path) -> Path:
    """The genuine checkpoint with one more value whose unpickling writes `marker`."""
    payload = read_checkpoint(genuine)
    payload["provenance"]["note"] = _writes(marker)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def test_the_crafted_pickle_runs_code_when_unpickled(tmp_path):
    # The gadget is live: plain pickle (what weights_only=False amounts to) creates the marker.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_writes(marker)))
    assert marker.read_text() == "ran"


# ------------------------------------------------------------------------- every loader entry point


def _eval_cli(path: Path, tmp: Path) -> None:
    """`lbgat eval` prints the refusal as one `error:` line and exits 2 (no traceback); the line is
    raised again here so that every entry point is checked the same way."""
    import contextlib
    import io

    from trainer.cli import eval_command

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = eval_command(
            argparse.Namespace(
                checkpoint=str(path),
                which="robust",
                weights="model",
                suite=None,
                n_examples=None,
                device="cpu",
                out=None,
                json=True,
                label=None,
            )
        )
    lines = stderr.getvalue().strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: "), (code, lines)
    assert "Traceback" not in stderr.getvalue()
    raise CheckpointError(lines[-1].removeprefix("error: "))


def _resume(path: Path, tmp: Path) -> None:
    from trainer.loop import TrainingRun

    TrainingRun(digits_spec(SPEC, dataset={"train_limit": 64}), out_dir=tmp / "run").fit(
        resume=path, evaluate_at_end=False
    )


def _resume_auto(path: Path, tmp: Path) -> None:
    from trainer.loop import TrainingRun

    run = TrainingRun(digits_spec(SPEC, dataset={"train_limit": 64}), out_dir=path.parent.parent)
    run.fit(resume="auto", evaluate_at_end=False)


def _teacher(path: Path, tmp: Path) -> None:
    from trainer.loop import TrainingRun

    spec = digits_spec({"name": "bgat", "teacher_checkpoints": [str(path)]}, dataset={"train_limit": 64})
    TrainingRun(spec, out_dir=tmp / "bgat")


def _transfer(path: Path, tmp: Path) -> None:
    from trainer.data import load_digits
    from trainer.evaluation import evaluate

    suite = EvaluationSpec(attacks=[{"kind": "transfer", "source_checkpoint": str(path)}], n_examples=16)
    evaluate(tiny_model(), load_digits(train=False), suite, ThreatModel(eps=0.1, step_size=0.025, steps=2))


def _averaged_weights(path: Path, tmp: Path) -> None:
    ckpt.load_model(path, weights="ema")


def _ray_train_state(path: Path, tmp: Path) -> None:
    pytest.importorskip("ray")
    import ray.train

    from workers import train_worker

    assert path.name == train_worker.STATE_FILE
    checkpoint = ray.train.Checkpoint.from_directory(str(path.parent))
    original = train_worker.ray.train.get_checkpoint
    train_worker.ray.train.get_checkpoint = lambda: checkpoint
    try:
        train_worker._resume(SimpleNamespace(rt=SimpleNamespace(device=torch.device("cpu"))))
    finally:
        train_worker.ray.train.get_checkpoint = original


def _upgrade(path: Path, tmp: Path) -> None:
    try:
        ckpt.upgrade_checkpoint(path, tmp / "upgraded.pt")
    finally:
        assert not (tmp / "upgraded.pt").exists()


ENTRY_POINTS = {
    "read_checkpoint": (lambda path, tmp: read_checkpoint(path), "c.pt"),
    "load_model": (lambda path, tmp: ckpt.load_model(path), "c.pt"),
    "lbgat_eval": (_eval_cli, "c.pt"),
    "resume": (_resume, "c.pt"),
    "resume_auto": (_resume_auto, "run/checkpoints/last.pt"),
    "teacher": (_teacher, "c.pt"),
    "transfer_source": (_transfer, "c.pt"),
    "averaged_weights": (_averaged_weights, "c.pt"),
    "ray_train_state": (_ray_train_state, "ray/checkpoint_000001/state.pt"),
    "upgrade": (_upgrade, "c.pt"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_code_in_a_checkpoint_never_runs_through_any_loader(entry, genuine, tmp_path):
    load, name = ENTRY_POINTS[entry]
    marker = tmp_path / "ran"
    path = _crafted(genuine, tmp_path / name, marker)
    with pytest.raises(CheckpointError, match=REFUSED) as refused:
        load(path, tmp_path)
    assert str(path) in str(refused.value) and "builtins.exec" in str(refused.value)
    assert not marker.exists()


def test_the_tiny_imagenet_cache_is_read_weights_only(genuine, tmp_path):
    from trainer.data.tiny_imagenet import _read_cache

    marker = tmp_path / "ran"
    cache = _crafted(genuine, tmp_path / ".cache_val_32.pt", marker)
    assert _read_cache(cache, "fingerprint", 1) is None  # ignored as unreadable, re-decoded
    assert not marker.exists()


@pytest.mark.parametrize(
    "gadget",
    [
        lambda marker: _writes(marker),
        lambda marker: RunsCode(os.system, f"touch {marker}"),
        lambda marker: RunsCode(subprocess.call, ["touch", str(marker)]),
    ],
    ids=["exec", "os.system", "subprocess.call"],
)
def test_a_bare_gadget_is_refused(gadget, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "bare.pt"
    torch.save({"format_version": ckpt.FORMAT_VERSION, "robust": gadget(marker)}, path)
    with pytest.raises(CheckpointError, match=REFUSED):
        read_checkpoint(path)
    assert not marker.exists()


def test_forcing_torch_off_weights_only_changes_nothing(genuine, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    with pytest.raises(CheckpointError, match=REFUSED):
        read_checkpoint(_crafted(genuine, tmp_path / "c.pt", marker))
    assert not marker.exists()


def test_a_foreign_type_is_refused_by_name(genuine, tmp_path):
    payload = read_checkpoint(genuine)
    payload["history"] = decimal.Decimal("0.5")
    torch.save(payload, tmp_path / "decimal.pt")
    with pytest.raises(CheckpointError, match=rf"{REFUSED} \(its pickle calls decimal\.Decimal;"):
        read_checkpoint(tmp_path / "decimal.pt")


def test_not_zip_format_or_not_a_dict_is_refused(tmp_path):
    legacy = tmp_path / "legacy_format.pt"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    for path in (legacy, garbage):
        with pytest.raises(CheckpointError, match=rf"{path.name} is {REFUSED}: not torch's zip format"):
            read_checkpoint(path)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint"):
        read_checkpoint(tmp_path / "tensor.pt")


# ------------------------------------------------------------------------------------------ size


def _no_torch_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on a file that is too large")

    monkeypatch.setattr(torch, "load", refuse)


def test_an_oversized_checkpoint_is_refused_before_it_is_read(genuine, tmp_path, monkeypatch):
    limit = genuine.stat().st_size - 1
    monkeypatch.setenv("LBGAT_MAX_CHECKPOINT_BYTES", str(limit))
    _no_torch_load(monkeypatch)
    with pytest.raises(
        CheckpointError, match=rf"more than the {limit} accepted \(LBGAT_MAX_CHECKPOINT_BYTES\)"
    ):
        read_checkpoint(genuine)
    with pytest.raises(CheckpointError, match="LBGAT_MAX_CHECKPOINT_BYTES"):
        _resume(genuine, tmp_path)
    monkeypatch.undo()  # torch.load back; a limit the file meets exactly
    monkeypatch.setenv("LBGAT_MAX_CHECKPOINT_BYTES", str(genuine.stat().st_size))
    assert read_checkpoint(genuine)["format_version"] == ckpt.FORMAT_VERSION


def test_a_checkpoint_that_unpacks_beyond_the_limit_is_refused(tmp_path, monkeypatch):
    # A deflated entry: a few KB on disk, 8 MB unpacked (torch's reader would inflate it).
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", bytes(8 * 2**20))
    assert bomb.stat().st_size < 2**20
    monkeypatch.setenv("LBGAT_MAX_CHECKPOINT_BYTES", str(2**20))
    _no_torch_load(monkeypatch)
    with pytest.raises(CheckpointError, match=r"unpacks to \d+ bytes, more than the 1048576 accepted"):
        read_checkpoint(bomb)


def test_the_size_setting_defaults_to_2_gib_and_is_validated(monkeypatch):
    monkeypatch.delenv("LBGAT_MAX_CHECKPOINT_BYTES", raising=False)
    assert ckpt.CheckpointSettings(_env_file=None).max_checkpoint_bytes == 2 * 1024**3
    monkeypatch.setenv("LBGAT_MAX_CHECKPOINT_BYTES", "0")
    with pytest.raises(ValueError):
        ckpt.CheckpointSettings(_env_file=None)


# ------------------------------------------------------------------------- the format itself


def test_rng_streams_round_trip_exactly(tmp_path):
    torch.manual_seed(3)
    np.random.seed(4)
    random.seed(5)
    np.random.standard_normal()  # numpy now caches a gaussian: has_gauss / cached_gaussian matter
    path = ckpt.save_checkpoint(tmp_path / "rng.pt", {"rng": ckpt.rng_state()})

    def draws():
        return torch.rand(8), np.random.standard_normal(8), np.random.randint(0, 2**31, 8), random.random()

    expected = draws()
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(read_checkpoint(path)["rng"])
    got = draws()
    assert torch.equal(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[2], expected[2])
    assert got[3] == expected[3]


@pytest.mark.parametrize(
    "value, kind",
    [
        (torch.__version__, "TorchVersion"),
        (np.float64(0.5), "float64"),
        (collections.Counter(), "Counter"),
        (print, "builtin_function_or_method"),
    ],
)
def test_save_refuses_what_would_not_load(value, kind, tmp_path):
    with pytest.raises(CheckpointError, match=rf"checkpoint\.provenance\.torch: a \S*{kind}"):
        ckpt.save_checkpoint(tmp_path / "c.pt", {"provenance": {"torch": value}})
    assert list(tmp_path.iterdir()) == []


METHOD_PARAMS = {
    "cat": {"mask_model": "cat_mask_mnist_cnn"},  # its default mask network is for 3-channel images
}


def test_every_method_checkpoint_loads_weights_only_and_resumes(genuine, tmp_path):
    """Every registered method's payload (optimizers, auxiliary networks, averaged weights) is plain."""
    from trainer.loop import TrainingRun
    from trainer.methods import list_methods

    params = {**METHOD_PARAMS, "bgat": {"teacher_checkpoints": [str(genuine)]}}
    for name in list_methods():
        spec = digits_spec(
            {"name": name, **params.get(name, {})},
            dataset={"train_limit": 64, "augment": True},
            optimization={
                "lr": 0.05,
                "batch_size": 32,
                "epochs": 1,
                "schedule": {"kind": "constant"},
                "weight_averaging": {"decay": 0.9},
            },
        )  # a new method that refuses this spec: add its smallest parameters to METHOD_PARAMS
        summary = TrainingRun(spec, out_dir=tmp_path / name).fit(evaluate_at_end=False)
        payload = read_checkpoint(summary.last_checkpoint)
        assert payload["format_version"] == ckpt.FORMAT_VERSION, name
        TrainingRun(spec, out_dir=tmp_path / f"{name}-again").load_payload(payload)


# ----------------------------------------------------------------------------- format 1 and upgrade


def _format_1(genuine: Path, path: Path) -> tuple[Path, tuple]:
    """A checkpoint as this project wrote it before the safe format: numpy's RNG state as its
    ndarray tuple, provenance.torch a TorchVersion, format_version 1."""
    payload = read_checkpoint(genuine)
    np.random.seed(7)
    np.random.standard_normal()
    numpy_state = np.random.get_state()
    payload["rng"]["numpy"] = numpy_state
    payload["provenance"]["torch"] = torch.__version__
    payload["format_version"] = 1
    torch.save(payload, path)
    return path, numpy_state


def test_a_format_1_checkpoint_is_refused_with_the_upgrade_command(genuine, tmp_path):
    old, _ = _format_1(genuine, tmp_path / "old.pt")
    with pytest.raises(CheckpointError) as refused:
        ckpt.load_model(old)
    message = str(refused.value)
    assert "predates the safe checkpoint format" in message
    assert f"python -m trainer.checkpoint upgrade {old} NEW.pt" in message


def test_upgrade_re_saves_format_1_with_the_same_state(genuine, tmp_path):
    from trainer.loop import TrainingRun

    old, numpy_state = _format_1(genuine, tmp_path / "old.pt")
    new = tmp_path / "new.pt"
    assert ckpt.main(["upgrade", str(old), str(new)]) == 0
    payload = read_checkpoint(new)
    assert payload["format_version"] == ckpt.FORMAT_VERSION
    assert type(payload["provenance"]["torch"]) is str
    original = read_checkpoint(genuine)
    for key, value in original["robust"].items():
        assert torch.equal(payload["robust"][key], value), key
    assert ckpt.main(["upgrade", str(old), str(new)]) == 1  # never overwrites

    TrainingRun(digits_spec(SPEC, dataset={"train_limit": 64}), out_dir=tmp_path / "run").load_payload(
        payload
    )
    after_upgrade = np.random.standard_normal(4)
    np.random.set_state(numpy_state)
    np.testing.assert_array_equal(after_upgrade, np.random.standard_normal(4))


def test_upgrade_runs_as_a_module(genuine, tmp_path):
    old, _ = _format_1(genuine, tmp_path / "old.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "trainer.checkpoint", "upgrade", str(old), str(tmp_path / "new.pt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "upgraded" in proc.stdout
    assert read_checkpoint(tmp_path / "new.pt")["format_version"] == ckpt.FORMAT_VERSION


# ---------------------------------------------------------------------------- one torch.load only


def _python_files() -> list[Path]:
    roots = ["api_schemas", "benchmarks", "scripts", "service", "tests", "trainer", "workers"]
    return [p for root in roots if (REPO / root).is_dir() for p in (REPO / root).rglob("*.py")]


def test_torch_load_is_called_only_by_the_safe_loader():
    calls = []
    for path in _python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                assert "load" not in {a.name for a in node.names}, f"{path}: imports torch's load"
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            target = ast.unparse(node.func)
            if target in ("torch.load", "torch.serialization.load"):
                keywords = {k.arg: k.value for k in node.keywords}
                weights_only = keywords.get("weights_only")
                calls.append((path.relative_to(REPO).as_posix(), weights_only and ast.unparse(weights_only)))
    assert calls and all(call == ("trainer/checkpoint.py", "True") for call in calls), calls
