"""Small models and data shared by the trainer tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_model(num_classes: int = 10, in_channels: int = 1, seed: int = 0) -> nn.Module:
    from trainer.models import create_model

    torch.manual_seed(seed)
    return create_model("tiny_cnn", num_classes=num_classes, in_channels=in_channels)


def batch(
    n: int = 16, shape=(1, 8, 8), num_classes: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g), torch.randint(0, num_classes, (n,), generator=g)


def trained_digits_model(steps: int = 150, seed: int = 0) -> nn.Module:
    """tiny_cnn fitted briefly on the digits set: confident logits, so attacks have something to move."""
    import torch.nn.functional as F

    from trainer.data import load_digits

    data = load_digits(train=True)
    x, y = data.images.float() / 255, data.labels
    model = tiny_model(seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def digits_batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    from trainer.data import load_digits

    data = load_digits(train=False)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:n]
    return data.images[idx].float() / 255, data.labels[idx]


def digits_spec(method: dict, **sections) -> ExperimentSpec:  # noqa: F821
    """A small, fast spec on the digits set; `sections` replace top-level parts of it."""
    from api_schemas import parse_spec

    data = {
        "name": "test",
        "method": method,
        "model": {"robust": {"name": "tiny_cnn"}},
        "dataset": {"name": "digits", "augment": False},
        "threat_model": {"eps": 0.1, "step_size": 0.025, "steps": 3},
        "optimization": {"lr": 0.05, "batch_size": 32, "epochs": 2, "schedule": {"kind": "constant"}},
        "evaluation": {"attacks": [{"kind": "pgd", "steps": 3, "step_size": 0.03}], "n_examples": 64},
        "runtime": {"device": "cpu", "progress": False},
    }
    if method["name"] in ("lbgat", "bgat"):
        data["model"]["teacher"] = {"name": "tiny_cnn", "width": 8}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_spec(data)
