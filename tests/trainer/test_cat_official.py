"""CAT and Rice et al.'s AT against transcriptions of their official training steps.

Each `_official_*` function below is a TRANSCRIPTION: a short re-statement of the official code's
step (TienjinHuang/Calibrated-adversarial-training `Codes/Train_CIFAR10.py`, `Codes/resnet.py`,
`Codes/Train_MNIST.py`; locuslab/robust_overfitting `train_cifar.py`), kept here as the reference our
implementation must match. Only what cannot run here is adapted, and each adaptation is marked:
no `.cuda()`, and the random start is drawn from torch's global generator the way ours draws it
(`torch.rand(...) * 2 - 1`, scaled) instead of `delta.uniform_(-eps, eps)` / `torch.rand_like`,
so that both sides start from the same point. Everything runs in float64 on the CPU so that the
sign of every attack gradient is the same on both sides.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from api_schemas import parse_spec
from api_schemas.presets import get_preset
from trainer.loop import TrainingRun
from trainer.methods import build_method
from trainer.models import create_model

# Codes/utils.py (and robust_overfitting's utils.py)
cifar10_mean = (0.4914, 0.4822, 0.4465)
cifar10_std = (0.2471, 0.2435, 0.2616)
EPS, ALPHA, ITERS = 8 / 255, 2 / 255, 3


def _official_normalize(x: torch.Tensor) -> torch.Tensor:
    mu = torch.tensor(cifar10_mean).view(3, 1, 1)  # float32, as the code's (then promoted)
    std = torch.tensor(cifar10_std).view(3, 1, 1)
    return (x - mu) / std


def _official_cwloss(output, target, confidence=50, num_classes=10):
    """TRANSCRIPTION of Train_CIFAR10.py `cwloss` (the FAT repository's)."""
    target_onehot = torch.zeros((*target.size(), num_classes), dtype=output.dtype)
    target_onehot.scatter_(1, target.unsqueeze(1), 1.0)
    real = (target_onehot * output).sum(1)
    other = ((1.0 - target_onehot) * output - target_onehot * 10000.0).max(1)[0]
    return torch.sum(-torch.clamp(real - other + confidence, min=0.0))


def _official_attack_pgd(model, X, y, epsilon, alpha, attack_iters, loss_fn):
    """TRANSCRIPTION of `attack_pgd` / `attack_pgd_cw` (Train_CIFAR10.py; train_cifar.py has the same
    attack_pgd), restarts=1, norm='l_inf', early_stop=False; the model is in whatever mode the loop
    left it: training mode."""
    max_loss = torch.zeros(y.shape[0], dtype=X.dtype)
    max_delta = torch.zeros_like(X)
    delta = (torch.rand(X.shape, dtype=X.dtype) * 2 - 1) * epsilon  # adapted: delta.uniform_(-eps, eps)
    delta = torch.max(torch.min(delta, 1 - X), 0 - X)  # clamp(delta, lower_limit - X, upper_limit - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        output = model(_official_normalize(X + delta))
        loss = loss_fn(output, y)
        loss.backward()
        grad = delta.grad.detach()
        d = torch.clamp(delta + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
        d = torch.max(torch.min(d, 1 - X), 0 - X)
        delta.data = d
        delta.grad.zero_()
    all_loss = F.cross_entropy(model(_official_normalize(X + delta)), y, reduction="none")
    max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
    return max_delta


def _official_cat_step(model, img_mask, opt, opt1, X, y, *, attackloss, beta1, beta2):
    """TRANSCRIPTION of one batch of Train_CIFAR10.py's training loop (model.train(), img_mask.train())."""
    kl = nn.KLDivLoss(reduction="sum")
    batch_size = X.shape[0]
    loss_fn = _official_cwloss if attackloss == "cw" else F.cross_entropy
    delta = _official_attack_pgd(model, X, y, EPS, ALPHA, ITERS, loss_fn).detach()

    mask_input = X + delta
    mask = img_mask(mask_input)
    delta_new = delta[: X.size(0)] * mask
    robust_output = model(_official_normalize(torch.clamp(X + delta_new, min=0, max=1)))
    output_nat = model(_official_normalize(X))
    output_nat_prop = F.softmax(output_nat, dim=1)
    true_props = torch.gather(output_nat_prop, 1, (y.unsqueeze(1)).long()).squeeze()
    loss_rob1 = (1.0 / batch_size) * kl(F.log_softmax(robust_output, dim=1), F.softmax(output_nat, dim=1))
    robust_loss = beta2 * loss_rob1 + (1.0 / batch_size) * torch.sum(
        nn.CrossEntropyLoss(reduction="none")(output_nat, y) * (1.0000001 - true_props)
    )
    opt.zero_grad()
    robust_loss.backward()
    opt.step()

    mask = img_mask(mask_input)
    delta_new = delta[: X.size(0)] * mask
    out_adv = model(_official_normalize(torch.clamp(X + delta, min=0, max=1)))
    out_mask_adv = model(_official_normalize(torch.clamp(X + delta_new, min=0, max=1)))
    temp_loss = (1.0 / batch_size) * kl(F.log_softmax(out_mask_adv, dim=1), F.softmax(out_adv, dim=1))
    loss_mask = temp_loss + beta1 * nn.CrossEntropyLoss()(out_mask_adv, y)
    opt1.zero_grad()
    loss_mask.backward()
    opt1.step()

    model(_official_normalize(X))  # output = model(normalize(X)): the training-accuracy log


def _official_rice_at_step(model, opt, X, y):
    """TRANSCRIPTION of one batch of robust_overfitting train_cifar.py (attack 'pgd', no mixup)."""
    delta = _official_attack_pgd(model, X, y, EPS, ALPHA, ITERS, F.cross_entropy).detach()
    robust_output = model(_official_normalize(torch.clamp(X + delta[: X.size(0)], min=0, max=1)))
    robust_loss = nn.CrossEntropyLoss()(robust_output, y)
    opt.zero_grad()
    robust_loss.backward()
    opt.step()
    model(_official_normalize(X))  # output = model(normalize(X)): the training-accuracy log


def _cifar_like_spec(method: dict, **threat) -> dict:
    return {
        "name": "fidelity",
        "method": method,
        "model": {"robust": {"name": "tiny_cnn", "normalize": "cifar10"}},
        "dataset": {"name": "synthetic", "synthetic_size": 16, "padding_mode": "reflect"},
        "threat_model": {"eps": EPS, "step_size": ALPHA, "steps": ITERS, **threat},
        "optimization": {
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "batch_size": 8,
            "epochs": 1,
            "schedule": {"kind": "constant"},
        },
        "evaluation": {"attacks": [{"kind": "fgsm"}], "n_examples": 8},
        "runtime": {"device": "cpu", "precision": "fp32", "progress": False},
    }


def _batch(n: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g, dtype=torch.float64), torch.arange(n) % 10


def _assert_same_state(ours: nn.Module, ref: nn.Module, *, buffers: bool = True) -> None:
    ref_state = ref.state_dict()
    names = dict(ours.named_parameters()) | (dict(ours.named_buffers()) if buffers else {})
    for name, value in names.items():
        torch.testing.assert_close(value, ref_state[name], rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("variant", ["cent", "cw"])
def test_cat_steps_equal_the_official_train_cifar10_step(tmp_path, variant):
    """Two steps of ours (train-mode attack, mask on x + delta, normalised inputs) equal the official
    ones: every weight of f and g_phi, and f's BatchNorm running averages (which every train-mode
    forward moves, attack steps included)."""
    torch.manual_seed(0)
    method = {"name": "cat", "variant": variant, "beta": 5.0, "beta1": 0.1, "mask_model": "cat_mask_resnet18"}
    run = TrainingRun(parse_spec(_cifar_like_spec(method)), out_dir=tmp_path)
    run.robust.double(), run.auxiliary.double()
    model, img_mask = copy.deepcopy(run.robust.net), copy.deepcopy(run.auxiliary)
    sgd = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}  # Train_CIFAR10.py's opt and opt1
    opt, opt1 = torch.optim.SGD(model.parameters(), **sgd), torch.optim.SGD(img_mask.parameters(), **sgd)
    model.train(), img_mask.train()
    for step in range(2):
        x, y = _batch(seed=step)
        torch.manual_seed(100 + step)
        run.train_step(x, y)
        torch.manual_seed(100 + step)
        _official_cat_step(model, img_mask, opt, opt1, x, y, attackloss=variant, beta1=0.1, beta2=5.0)
    _assert_same_state(run.robust.net, model)
    # g_phi: the same weights; its own running averages differ (the official code runs it twice)
    _assert_same_state(run.auxiliary, img_mask, buffers=False)


def test_cat_attacks_in_training_mode_and_moves_the_running_averages(tmp_path):
    torch.manual_seed(0)
    method = {"name": "cat", "mask_model": "cat_mask_resnet18"}
    run = TrainingRun(parse_spec(_cifar_like_spec(method)), out_dir=tmp_path)
    assert run.method.attack_model_mode() == "train"
    run.robust.double()
    reference = copy.deepcopy(run.robust.net).train()
    modes = []
    hook = run.robust.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    x, y = _batch()
    run.robust.train()  # what the loop sets from attack_model_mode()
    before = run.robust.net.features[1].running_mean.clone()
    torch.manual_seed(7)
    x_adv = run.method.generate(run.robust, x, y)
    hook.remove()
    assert modes == [True] * (ITERS + 1)  # every attack forward and attack_pgd's closing forward
    assert not torch.equal(before, run.robust.net.features[1].running_mean)
    torch.manual_seed(7)
    delta = _official_attack_pgd(reference, x, y, EPS, ALPHA, ITERS, F.cross_entropy)
    torch.testing.assert_close(x_adv, x + delta, rtol=0, atol=1e-12)
    _assert_same_state(run.robust.net, reference)  # running averages (and their counter) included


def test_other_methods_keep_their_eval_mode_attack_and_the_spec_can_switch():
    spec = parse_spec(_cifar_like_spec({"name": "pgd_at"}))
    assert build_method(spec.method, spec.threat_model).attack_model_mode() == "eval"
    spec = parse_spec(_cifar_like_spec({"name": "trades"}))
    assert build_method(spec.method, spec.threat_model).attack_model_mode() == "eval"
    spec = parse_spec(_cifar_like_spec({"name": "pgd_at"}, model_mode="train"))
    assert build_method(spec.method, spec.threat_model).attack_model_mode() == "train"
    spec = parse_spec(_cifar_like_spec({"name": "cat"}, model_mode="eval"))
    assert build_method(spec.method, spec.threat_model).attack_model_mode() == "eval"
    assert get_preset("cat-baseline-at-cifar10-preact18").threat_model.model_mode == "train"


def test_rice_at_baseline_step_equals_the_official_train_cifar_step(tmp_path):
    torch.manual_seed(0)
    run = TrainingRun(parse_spec(_cifar_like_spec({"name": "pgd_at"}, model_mode="train")), out_dir=tmp_path)
    run.robust.double()
    model = copy.deepcopy(run.robust.net).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for step in range(2):
        x, y = _batch(seed=step)
        torch.manual_seed(200 + step)
        run.train_step(x, y)
        torch.manual_seed(200 + step)
        _official_rice_at_step(model, opt, x, y)
    _assert_same_state(run.robust.net, model)


# ----------------------------------------------------------------------------- mask networks


class _OfficialResNetMeHead(nn.Module):
    """TRANSCRIPTION of ResNet_me.forward (Codes/resnet.py) after layer4: Interpolate() (F.interpolate
    to (32, 32), default mode: nearest), conv2, sigmoid; the trunk's layers are ours (same layout)."""

    def __init__(self, ours: nn.Module) -> None:
        super().__init__()
        self.trunk, self.conv2 = ours.trunk, ours.head

    def forward(self, x):
        out = self.trunk(x)
        out = F.interpolate(out, size=(32, 32))
        return torch.sigmoid(self.conv2(out))


def test_cifar_mask_network_reads_x_plus_delta_and_upsamples_nearest():
    torch.manual_seed(0)
    net = create_model("cat_mask_resnet18").eval()
    assert net.trunk[0].in_channels == 3  # x + delta, not the 6-channel [x, delta]
    x, delta = torch.rand(2, 3, 32, 32), (torch.rand(2, 3, 32, 32) * 2 - 1) * EPS
    with torch.no_grad():
        ours = net(x + delta)
        reference = _OfficialResNetMeHead(net)(x + delta)
        features = net.trunk(x + delta)
        bilinear = torch.sigmoid(net.head(F.interpolate(features, size=(32, 32), mode="bilinear")))
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    assert not torch.allclose(ours, bilinear)


def _official_mnist_img_mask() -> nn.Sequential:
    """TRANSCRIPTION of Train_MNIST.py's img_mask (Interpolate() is F.interpolate(x, size=(28, 28)))."""

    class Interpolate(nn.Module):
        def forward(self, x, shape=(28, 28)):
            return F.interpolate(x, size=shape)

    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1, stride=2),
        nn.LeakyReLU(0.2),
        nn.Conv2d(64, 128, 3, padding=1, stride=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(128, 128, 3, padding=1, stride=1),
        nn.LeakyReLU(0.2),
        Interpolate(),
        nn.Conv2d(128, 1, 3, padding=1),
        nn.Sigmoid(),
    )


def test_mnist_mask_network_is_the_official_layout():
    torch.manual_seed(0)
    ours = create_model("cat_mask_mnist_cnn")
    reference = _official_mnist_img_mask()
    mapping = {"trunk.0": "0", "trunk.2": "2", "trunk.4": "4", "head": "7"}
    state = {}
    for key, value in ours.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        state[f"{mapping[prefix]}.{leaf}"] = value
    reference.load_state_dict(state)  # strict: the same layers, shapes and strides
    assert [m.negative_slope for m in ours.trunk if isinstance(m, nn.LeakyReLU)] == [0.2] * 3
    assert [m.stride for m in ours.trunk if isinstance(m, nn.Conv2d)] == [(2, 2), (1, 1), (1, 1)]
    x = torch.rand(4, 1, 28, 28)
    x_adv = (x + (torch.rand_like(x) * 2 - 1) * 0.3).clamp(0, 1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x_adv), reference(x_adv), rtol=0, atol=0)


# ----------------------------------------------------------------------------- MNIST attack


def _official_pgd_linf(model, X, y, epsilon, alpha, num_iter):
    """TRANSCRIPTION of Train_MNIST.py `pgd_linf(..., randomize=True)`; the start drawn as ours draws it
    (the code: delta = torch.rand_like(X) * 2 * 0.1 - 0.1)."""
    delta = ((torch.rand(X.shape, dtype=X.dtype) * 2 - 1) * 0.1).requires_grad_(True)
    for _ in range(num_iter):
        yp = model(X + delta)
        loss = nn.CrossEntropyLoss()(yp, y)
        loss.backward()
        delta.data = (delta + alpha * delta.grad.detach().sign()).clamp(-epsilon, epsilon)
        delta.grad.zero_()
    return delta.detach()


def test_mnist_preset_attack_starts_in_u_minus_0_1_and_never_clips():
    spec = get_preset("cat-cent-eps0.3-mnist")
    config = build_method(spec.method, spec.threat_model).attack_config()
    assert (config.start_radius, config.clip, config.steps) == (0.1, False, 20)
    assert config.step_size == pytest.approx(0.3 / 20)
    torch.manual_seed(0)
    model = create_model("cat_mnist_cnn", num_classes=10).double()
    x = torch.rand(8, 1, 28, 28, dtype=torch.float64)
    x[:, :, :4] = 0.0  # MNIST's black border: a clipping attack could not go below 0 there
    y = torch.arange(8)
    torch.manual_seed(3)
    start = config.__class__(**{**config.__dict__, "steps": 0}).run(model, x, y)
    assert (start - x).abs().max() <= 0.1 and (start - x).abs().max() > 0.09  # U(-0.1, 0.1), not eps
    torch.manual_seed(3)
    x_adv = config.run(model, x, y)
    torch.manual_seed(3)
    delta = _official_pgd_linf(model, x, y, 0.3, 0.3 / 20, 20)
    torch.testing.assert_close(x_adv, x + delta, rtol=0, atol=1e-12)
    assert x_adv.min() < 0  # no [0, 1] clamp
    assert spec.optimization.batch_size == 100 and spec.optimization.schedule.milestones == [31]
