"""Options that follow the official codes: input normalisation inside the model, reflection padding,
checkpoint selection on the test set or at a fixed epoch, and the training precision in every record."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from api_schemas import RuntimeSpec, parse_spec
from tests.trainer.helpers import digits_spec
from trainer import attacks
from trainer.checkpoint import load_model
from trainer.data import ArrayDataset, DeviceLoader
from trainer.data.augment import random_crop
from trainer.loop import Runtime, TrainingRun
from trainer.models import create_model
from trainer.models.normalize import Normalized

# CAT's Codes/utils.py and robust_overfitting's utils.py
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5070751592371323, 0.48654887331495095, 0.4409178433670343)
CIFAR100_STD = (0.2673342858792401, 0.2564384629170883, 0.27615047132568404)


def _normalised_model(stats: str = "cifar10") -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("tiny_cnn", num_classes=10, in_channels=3, normalize=stats).eval()


# ----------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    ("stats", "mean", "std"),
    [("cifar10", CIFAR10_MEAN, CIFAR10_STD), ("cifar100", CIFAR100_MEAN, CIFAR100_STD)],
)
def test_normalised_model_equals_manual_normalisation(stats, mean, std):
    model = _normalised_model(stats)
    assert isinstance(model, Normalized)
    x = torch.rand(4, 3, 8, 8)
    manual = model.net((x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1))
    torch.testing.assert_close(model(x), manual, rtol=0, atol=0)
    assert not torch.allclose(model(x), model.net(x))


def test_attacks_work_in_pixel_space_on_a_normalised_model():
    model = _normalised_model()
    x, y = torch.rand(8, 3, 8, 8), torch.arange(8)
    eps = 8 / 255
    torch.manual_seed(1)
    x_adv = attacks.pgd(model, x, y, eps=eps, step_size=2 / 255, steps=5, random_start="uniform")
    assert x_adv.min() >= 0 and x_adv.max() <= 1 and (x_adv - x).abs().max() <= eps + 1e-7

    class ManuallyNormalised(torch.nn.Module):  # model(normalize(X + delta)), as the official codes
        def forward(self, z):
            mu, sigma = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
            return model.net((z - mu) / sigma)

    torch.manual_seed(1)
    reference = attacks.pgd(
        ManuallyNormalised(), x, y, eps=eps, step_size=2 / 255, steps=5, random_start="uniform"
    )
    torch.testing.assert_close(x_adv, reference, rtol=0, atol=0)


def test_normalisation_survives_a_checkpoint_and_the_spec_refuses_it_for_grey_images(tmp_path):
    spec = parse_spec(
        {
            "name": "norm",
            "method": {"name": "natural"},
            "model": {"robust": {"name": "tiny_cnn", "normalize": "cifar10"}},
            "dataset": {"name": "synthetic", "synthetic_size": 32},
            "optimization": {"batch_size": 16, "epochs": 1, "schedule": {"kind": "constant"}},
            "runtime": {"device": "cpu", "progress": False},
        }
    )
    assert spec.model.robust.kwargs() == {"normalize": "cifar10"}
    run = TrainingRun(spec, out_dir=tmp_path)
    assert isinstance(run.robust, Normalized)
    state = run.robust.state_dict()
    assert all(key.startswith("net.") for key in state)  # statistics come from the spec, not the file
    path = run.save(tmp_path / "last.pt")
    loaded = load_model(path)
    x = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(loaded(x), run.robust.eval()(x))
    with pytest.raises(Exception, match="normalize"):
        digits_spec({"name": "natural"}, model={"robust": {"name": "tiny_cnn", "normalize": "cifar10"}})
    with pytest.raises(ValueError, match="only classifiers"):
        create_model("cat_mask_resnet18", normalize="cifar10")


# ----------------------------------------------------------------------------- reflection padding


def _offsets(generator_seed: int, b: int, padding: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(generator_seed)
    return (
        torch.randint(0, 2 * padding + 1, (b,), generator=g),
        torch.randint(0, 2 * padding + 1, (b,), generator=g),
    )


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_reflection_crop_equals_np_pad_reflect_then_crop(dtype):
    x = (torch.rand(5, 3, 12, 12) * 255).to(dtype)
    out = random_crop(x, 4, torch.Generator().manual_seed(3), mode="reflect")
    off_y, off_x = _offsets(3, 5, 4)
    # utils.pad of CAT / robust_overfitting: np.pad(x, [(0, 0), (4, 4), (4, 4), (0, 0)], mode='reflect') on NHWC
    padded = np.pad(x.permute(0, 2, 3, 1).numpy(), [(0, 0), (4, 4), (4, 4), (0, 0)], mode="reflect")
    padded = torch.from_numpy(padded).permute(0, 3, 1, 2)
    for i in range(5):
        crop = padded[i, :, off_y[i] : off_y[i] + 12, off_x[i] : off_x[i] + 12]
        torch.testing.assert_close(out[i], crop, rtol=0, atol=0)
    zeros = random_crop(x, 4, torch.Generator().manual_seed(3))
    zero_padded = F.pad(x, (4, 4, 4, 4))
    for i in range(5):
        crop = zero_padded[i, :, off_y[i] : off_y[i] + 12, off_x[i] : off_x[i] + 12]
        torch.testing.assert_close(zeros[i], crop, rtol=0, atol=0)


def test_loader_pads_by_reflection_when_asked():
    white = ArrayDataset(
        images=torch.full((64, 3, 8, 8), 255, dtype=torch.uint8),
        labels=torch.zeros(64, dtype=torch.long),
        num_classes=10,
        name="white",
    )
    kw = {"batch_size": 64, "device": "cpu", "shuffle": False, "augment": True, "crop_padding": 2}
    ((x_reflect, _),) = list(DeviceLoader(white, padding_mode="reflect", **kw))
    ((x_zeros, _),) = list(DeviceLoader(white, **kw))
    assert (x_reflect == 1).all()  # mirrored pixels, never the zero fill
    assert (x_zeros == 0).any()
    spec = digits_spec({"name": "natural"}, dataset={"augment": True, "padding_mode": "reflect"})
    assert TrainingRun(spec).loader.padding_mode == "reflect"


# ----------------------------------------------------------------------------- checkpoint selection


def _fit(tmp_path, selection: dict, *, val_size: int = 0, precision: str = "fp32"):
    spec = digits_spec(
        {"name": "natural"},
        dataset={"train_limit": 128, "test_limit": 64, "val_size": val_size},
        selection={"attack": {"steps": 2, "step_size": 0.05}, **selection},
        runtime={"device": "cpu", "progress": False, "precision": precision},
    )
    run = TrainingRun(spec, out_dir=tmp_path)
    return run, run.fit()


def test_selection_on_the_test_set_is_marked_in_every_record(tmp_path):
    run, summary = _fit(tmp_path, {"metric": "clean_plus_pgd", "split": "test"})
    assert run.selection_data is run.data.test and run.data.val is None
    assert len(run.data.train) == 128  # nothing held out
    assert summary.selection_split == "test" and summary.best is not None
    assert summary.best.selection_split == "test" and summary.final.selection_split is None
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(line["val_split"] == "test" for line in lines)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["selection_split"] == "test" and written["best"]["selection_split"] == "test"


def test_selection_on_held_out_images_is_marked_heldout(tmp_path):
    run, summary = _fit(tmp_path, {"metric": "pgd_acc"}, val_size=32)
    assert run.selection_data is run.data.val
    assert summary.selection_split == "heldout" and summary.best.selection_split == "heldout"


def test_a_fixed_epoch_is_reported_as_the_selected_checkpoint(tmp_path):
    _, summary = _fit(tmp_path, {"epoch": 1})
    assert summary.best_epoch == 1 and summary.best is not None and summary.best.epoch == 1
    assert summary.selection_split is None and summary.best_metric is None
    assert summary.epochs == 2


# ----------------------------------------------------------------------------- precision


def test_precision_is_recorded_in_the_summary_reports_and_checkpoint(tmp_path):
    run, summary = _fit(tmp_path, {})
    assert summary.precision == "fp32" and summary.final.training_precision == "fp32"
    assert json.loads((tmp_path / "summary.json").read_text())["precision"] == "fp32"
    assert run.checkpoint_payload()["precision"] == "fp32"


def test_bf16_is_recorded_when_asked_for_even_on_a_cpu(tmp_path):
    run, summary = _fit(tmp_path, {}, precision="bf16")
    assert run.rt.bf16 and summary.precision == "bf16" and summary.final.training_precision == "bf16"


@pytest.mark.parametrize(
    ("asked", "resolved"), [("auto", "fp32"), ("tf32", "fp32"), ("fp32", "fp32"), ("bf16", "bf16")]
)
def test_precision_resolves_on_a_cpu(asked, resolved):
    spec = digits_spec({"name": "natural"}, runtime={"device": "cpu", "precision": asked})
    rt = Runtime.resolve(spec)
    assert (rt.precision, rt.bf16) == (resolved, resolved == "bf16")


def test_old_bf16_field_still_loads():
    assert RuntimeSpec.model_validate({"bf16": True}).precision == "bf16"
    assert RuntimeSpec.model_validate({"bf16": False}).precision == "tf32"
    assert RuntimeSpec.model_validate({"bf16": None}).precision == "auto"
    with pytest.raises(ValueError, match="contradicts"):
        RuntimeSpec.model_validate({"bf16": True, "precision": "fp32"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 flags only matter on a GPU")
def test_fp32_turns_tf32_off_on_a_gpu():
    spec = digits_spec({"name": "natural"}, runtime={"device": "cuda", "precision": "fp32"})
    assert Runtime.resolve(spec).precision == "fp32"
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    spec = digits_spec({"name": "natural"}, runtime={"device": "cuda", "precision": "tf32"})
    assert Runtime.resolve(spec).precision == "tf32"
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    spec = digits_spec({"name": "natural"}, runtime={"device": "cuda"})
    rt = Runtime.resolve(spec)
    assert rt.precision == "bf16" and rt.bf16
