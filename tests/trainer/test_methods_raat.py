"""MART, Cons-AT, RAAT, RAAT++: training steps, the official codes' step, modes, the boundary partition
and the two augmentations."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from api_schemas import RAATMethod, RAATPPMethod, ThreatModel
from tests.trainer.helpers import digits_spec, trained_digits_model
from trainer.loop import TrainingRun, stack_views
from trainer.methods import build_method
from trainer.methods.raat import BoundaryBatch, boundary_partition

AUGMENT = {"augment": True, "crop_padding": 1, "flip": False}
METHOD_SPECS = {
    "mart": {"name": "mart"},
    "cons_at": {"name": "cons_at"},
    "raat": {"name": "raat"},
    "raat_pp": {"name": "raat_pp"},
    "raat_probabilities": {"name": "raat", "dicar_target": "probabilities", "eta": 0.3},
}
TWO_VIEWS = {"cons_at", "raat", "raat_pp", "raat_probabilities"}


def _spec(key: str, **sections):
    method = METHOD_SPECS[key]
    dataset = {"train_limit": 128, **(AUGMENT if key in TWO_VIEWS else {})}
    return digits_spec(method, dataset={**dataset, **sections.pop("dataset", {})}, **sections)


@pytest.mark.parametrize("key", list(METHOD_SPECS))
def test_method_trains_a_few_steps(key, tmp_path):
    run = TrainingRun(_spec(key), out_dir=tmp_path)
    before = copy.deepcopy(run.robust.state_dict())
    losses = []
    for epoch in range(2):
        run.loader.set_epoch(epoch)
        for batch in run.loader:
            x, y = stack_views(batch)
            loss, counts = run.train_step(x, y)
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) < sum(losses[:4]), f"loss did not go down: {losses}"
    for name, value in run.robust.state_dict().items():
        if name.endswith("weight"):
            assert not torch.equal(before[name], value), name
    assert run.teacher is None and len(run.optimizer.param_groups) == 1
    assert "adv" in counts


# --------------------------------------------------------------------------- the official codes' steps


def _pgd_ce(model, x, y, *, eps, step, steps, start):
    """PGD-CE as the official codes run it, with the start drawn from the same RNG calls as ours."""
    if start == "normal":  # MART: x + 0.001 * randn
        x_adv = x.detach() + 0.001 * torch.randn(x.shape).detach()
    else:  # advertorch PGDAttack(rand_init=True): uniform in the eps box, clipped to [0, 1]
        x_adv = (x + eps * (torch.rand(x.shape) * 2 - 1)).clamp(0.0, 1.0)
    for _ in range(steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv), y)
        grad = torch.autograd.grad(loss, [x_adv])[0]
        x_adv = x_adv.detach() + step * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    return x_adv.detach()


def _official_mart_step(model, optimizer, x, y, *, eps, step, steps, beta):
    """YisenWang/MART mart.py (mart_loss) + train(), CPU instead of .cuda()."""
    from tests.trainer.test_losses_raat import _official_mart

    model.eval()
    x_adv = _pgd_ce(model, x, y, eps=eps, step=step, steps=steps, start="normal")
    model.train()
    optimizer.zero_grad()
    logits = model(x)
    logits_adv = model(x_adv)
    loss = _official_mart(logits, logits_adv, y, beta)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _official_cons_at_step(model, optimizer, images_pair, labels2, *, eps, step, steps, lam, T):
    """alinlab/consistency-adversarial adv_train_consistency.py (attack inside EvalBN)."""
    from tests.trainer.test_losses_raat import _official_js

    model.eval()
    images_adv = _pgd_ce(model, images_pair, labels2, eps=eps, step=step, steps=steps, start="uniform")
    model.train()
    outputs_adv = model(images_adv)
    loss_ce = F.cross_entropy(outputs_adv, labels2)
    outputs_adv1, outputs_adv2 = outputs_adv.chunk(2)
    loss = loss_ce + lam * _official_js(outputs_adv1, outputs_adv2, T)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()


def _official_raat_step(model, optimizer, images_pair, labels2, *, eps, step, steps, eta, lam, T, mix):
    """FlaAI/RAAT adv_train_bd.py, with numpy index lists written as boolean masks (same sets)."""
    from tests.trainer.test_losses_raat import _official_js

    model.eval()
    images_adv = _pgd_ce(model, images_pair, labels2, eps=eps, step=step, steps=steps, start="uniform")
    model.eval()
    pred_benign = model(images_pair).argmax(1)
    pred_adv = model(images_adv).argmax(1)
    reduced = images_pair + eta * (images_adv - images_pair)
    pred_reduced = model(reduced).argmax(1)
    model.train()
    mis = pred_benign != labels2
    bnd = (pred_benign == labels2) & (pred_adv != labels2) & (pred_reduced != labels2)
    non = ~mis & ~bnd
    data_ce = torch.cat((images_adv[non], reduced[bnd], images_adv[mis]))
    labels_ce = torch.cat((labels2[non], labels2[bnd], labels2[mis]))
    loss = F.cross_entropy(model(data_ce), labels_ce)
    half = len(labels2) // 2
    ict = ~(mis[:half] | mis[half:])
    if ict.any():
        adv1, adv2 = images_adv.chunk(2)
        out1 = model(mix * adv1[ict] + (1 - mix) * adv2[ict])
        benign1, benign2 = model(images_pair).chunk(2)
        out2 = mix * benign1[ict] + (1 - mix) * benign2[ict]
        loss = loss + lam * _official_js(out1, out2, T)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach(), (int(non.sum()), int(bnd.sum()), int(mis.sum()), int(ict.sum()))


@pytest.mark.parametrize("key", ["mart", "cons_at", "raat"])
def test_step_equals_official_code(key, tmp_path):
    eta = 0.5  # a wide boundary range, so that all three kinds of samples occur in a few steps
    method = dict(METHOD_SPECS[key])
    if key == "raat":
        method["eta"] = eta
    spec = digits_spec(
        method,
        dataset={"train_limit": 96, **(AUGMENT if key in TWO_VIEWS else {})},
        optimization={"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": 32, "epochs": 1},
    )
    run = TrainingRun(spec, out_dir=tmp_path)
    run.robust.load_state_dict(trained_digits_model(steps=60).state_dict())  # accurate: DICAR has rows
    run.method.mix_weight = lambda: 0.7
    ref_model = copy.deepcopy(run.robust)
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    kinds = torch.zeros(4, dtype=torch.long)
    run.loader.set_epoch(0)
    for i, batch in enumerate(run.loader):
        x, y = stack_views(batch)
        torch.manual_seed(100 + i)
        ours, _ = run.train_step(x, y)
        torch.manual_seed(100 + i)
        common = {"eps": 0.1, "step": 0.025, "steps": 3}
        if key == "mart":
            ref = _official_mart_step(ref_model, ref_opt, x, y, beta=6.0, **common)
        elif key == "cons_at":
            ref = _official_cons_at_step(ref_model, ref_opt, x, y, lam=1.0, T=0.5, **common)
        else:
            ref, counts = _official_raat_step(
                ref_model, ref_opt, x, y, eta=eta, lam=1.0, T=0.5, mix=0.7, **common
            )
            kinds += torch.tensor(counts)
        assert ours.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    for (name, ours_p), ref_p in zip(run.robust.state_dict().items(), ref_model.state_dict().values()):
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-4, atol=1e-5, msg=name)
    if key == "raat":
        assert (kinds > 0).all(), f"non-boundary, boundary, misclassified, DICAR rows: {kinds.tolist()}"


# --------------------------------------------------------------------------- modes


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, log: list):
        super().__init__()
        self.inner, self.log = inner, log

    def forward(self, x):
        self.log.append((self.training, torch.is_grad_enabled(), x.requires_grad, x.shape[0]))
        return self.inner(x)


@pytest.mark.parametrize("key", ["mart", "cons_at", "raat", "raat_pp"])
def test_attack_and_indicators_in_eval_mode_loss_in_training_mode(key, tmp_path):
    run = TrainingRun(_spec(key, threat_model={"eps": 0.1, "step_size": 0.025, "steps": 3}), out_dir=tmp_path)
    log: list = []
    run.robust_fn = run.attack_fn = run.robust = _Recorder(run.robust, log)
    x, y = stack_views(next(iter(run.loader)))
    run.train_step(x, y)
    n = len(y)
    attack = [entry for entry in log if entry[2]]
    assert len(attack) == 3 and all(not training for training, *_ in attack)
    rest = log[len(attack) :]
    if key.startswith("raat"):
        # the indicators: one forward of x, x' and x'' stacked, eval mode, no graph
        assert rest[0] == (False, False, False, 3 * n)
        rest = rest[1:]
    assert rest and all(training and grad for training, grad, _, _ in rest)
    if key in ("cons_at", "raat", "raat_pp"):
        assert n == 2 * run.loader.batch_size  # both views of every image


# --------------------------------------------------------------------------- the boundary partition


class _Threshold(nn.Module):
    """Class 0 iff the (single) pixel is above 0.5: a model whose every prediction is known."""

    def forward(self, x):
        z = 20 * x.flatten(1)[:, :1] - 10
        return torch.cat([z, -z], dim=1)


def test_boundary_partition_on_a_constructed_batch():
    # eps 0.3: the attack moves every pixel down by 0.3 (to 0 at most); eta 0.1: x'' = x - 0.03.
    # Two images, their views stacked: image 0 = (0.9, 0.52), image 1 = (0.7, 0.3).
    x = torch.tensor([0.9, 0.7, 0.52, 0.3]).view(4, 1, 1, 1)
    y = torch.zeros(4, dtype=torch.long)
    method = build_method(RAATMethod(eta=0.1), ThreatModel(eps=0.3, step_size=0.1, steps=6))
    batch = method.generate(_Threshold(), x, y)
    torch.testing.assert_close(batch.x_adv.flatten(), torch.tensor([0.6, 0.4, 0.22, 0.0]))
    torch.testing.assert_close(batch.x_reduced.flatten(), torch.tensor([0.87, 0.67, 0.49, 0.27]))
    p = batch.partition
    # 0.9: x' = 0.6 still class 0 -> non-boundary; 0.7: x' wrong but x'' right -> non-boundary;
    # 0.52: x' and x'' wrong -> boundary; 0.3: wrong already -> misclassified
    assert p.non_boundary.tolist() == [True, True, False, False]
    assert p.boundary.tolist() == [False, False, True, False]
    assert p.misclassified.tolist() == [False, False, False, True]
    assert (p.non_boundary.int() + p.boundary.int() + p.misclassified.int()).eq(1).all()
    # boundary samples train on x'', the others on x'
    torch.testing.assert_close(batch.training_inputs().flatten(), torch.tensor([0.6, 0.4, 0.49, 0.0]))

    # DICAR only for image 0 (image 1's second view is misclassified), mixing weight in [0.5, 1]
    log: list = []
    model = _Recorder(_Threshold(), log)
    method.mix_weight = lambda: 0.8
    out = method.compute_loss(model, None, x, batch, y)
    assert [entry[3] for entry in log] == [4, 1, 4]  # f(training inputs), f(mix), f(x): official order
    assert out.parts["dicar_rows"].item() == 1 and out.parts["boundary"].item() == 1


def test_partition_function_and_mix_weight_range():
    y = torch.tensor([0, 1, 2, 3])
    p = boundary_partition(
        y, torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 2, 0])
    )
    assert p.non_boundary.tolist() == [False, True, True, False]
    assert p.boundary.tolist() == [True, False, False, False]
    assert p.misclassified.tolist() == [False, False, False, True]
    method = build_method(RAATPPMethod(gamma=0.75), ThreatModel())
    torch.manual_seed(0)
    weights = [method.mix_weight() for _ in range(200)]
    assert all(0.5 <= w <= 1.0 for w in weights) and len(set(weights)) > 100


def test_raat_pp_forwards_full_adversarial_examples_for_the_kl():
    x = torch.tensor([0.9, 0.7, 0.52, 0.3]).view(4, 1, 1, 1)
    y = torch.zeros(4, dtype=torch.long)
    method = build_method(RAATPPMethod(eta=0.1), ThreatModel(eps=0.3, step_size=0.1, steps=6))
    batch = method.generate(_Threshold(), x, y)
    assert isinstance(batch, BoundaryBatch)
    seen: list = []
    model = _Recorder(_Threshold(), seen)
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].flatten().tolist()))
    method.mix_weight = lambda: 0.8
    method.compute_loss(model, None, x, batch, y)
    inputs = [entry for entry in seen if isinstance(entry, list)]
    # mart_loss_bd order: f(x'), f(x), f(training inputs), then DICAR's f(mix)
    assert inputs[0] == pytest.approx([0.6, 0.4, 0.22, 0.0])
    assert inputs[1] == pytest.approx([0.9, 0.7, 0.52, 0.3])
    assert inputs[2] == pytest.approx([0.6, 0.4, 0.49, 0.0])
    assert inputs[3] == pytest.approx([0.8 * 0.6 + 0.2 * 0.22])


# --------------------------------------------------------------------------- two augmentations


def _shifts(image: torch.Tensor, padding: int) -> torch.Tensor:
    """Every zero-padded crop of `image` at offsets in [0, 2*padding] (what the loader may draw)."""
    h, w = image.shape[-2:]
    padded = F.pad(image, (padding, padding, padding, padding))
    crops = [
        padded[..., dy : dy + h, dx : dx + w]
        for dy in range(2 * padding + 1)
        for dx in range(2 * padding + 1)
    ]
    return torch.stack(crops)


@pytest.mark.parametrize("key", ["cons_at", "raat"])
def test_two_different_augmentations_of_the_same_images(key, tmp_path):
    run = TrainingRun(_spec(key), out_dir=tmp_path)
    seen = {}
    original = run.method.compute_loss

    def compute_loss(robust, teacher, x, x_adv, y):
        seen["x"], seen["y"] = x, y
        return original(robust, teacher, x, x_adv, y)

    run.method.compute_loss = compute_loss
    run.loader.set_epoch(0)
    idx = run.loader.indices()[: run.loader.batch_size]
    x, y = stack_views(next(iter(run.loader)))
    run.train_step(x, y)
    half = run.loader.batch_size
    x, y = seen["x"], seen["y"]
    assert x.shape[0] == 2 * half and torch.equal(y[:half], y[half:])
    differ = (x[:half] != x[half:]).flatten(1).any(1)
    assert differ.float().mean() > 0.5, "the two views should be independent augmentations"
    originals = run.loader.dataset.images[idx].float() / 255
    for i in range(half):
        crops = _shifts(originals[i], padding=1)
        for view in (x[i], x[half + i]):
            assert (crops - view).abs().flatten(1).amax(1).min() < 1e-6, f"image {i}: not a crop of it"


def test_no_dicar_rows_means_no_extra_forward_and_plain_ce():
    x = torch.tensor([0.3, 0.9, 0.8, 0.2]).view(
        4, 1, 1, 1
    )  # images (0.3, 0.8) and (0.9, 0.2): one view wrong
    y = torch.zeros(4, dtype=torch.long)
    method = build_method(RAATMethod(eta=0.1), ThreatModel(eps=0.3, step_size=0.1, steps=6))
    batch = method.generate(_Threshold(), x, y)

    def no_draw():
        raise AssertionError("the mixing weight must not be drawn without DICAR rows")

    method.mix_weight = no_draw
    log: list = []
    out = method.compute_loss(_Recorder(_Threshold(), log), None, x, batch, y)
    assert [entry[3] for entry in log] == [4]
    expected = F.cross_entropy(_Threshold()(batch.training_inputs()), y)
    assert out.loss.item() == pytest.approx(expected.item())
    assert out.parts["dicar_rows"].item() == 0


def test_raat_resume_equals_uninterrupted_run(tmp_path):
    """Two views, the partition and the Beta draws all come back identically after a resume."""
    spec = _spec(
        "raat_pp",
        dataset={"train_limit": 64},
        optimization={"lr": 0.05, "batch_size": 32, "epochs": 2, "schedule": {"kind": "constant"}},
    )
    full = TrainingRun(spec, out_dir=tmp_path / "full")
    full.fit(evaluate_at_end=False)
    short = spec.model_copy(update={"optimization": spec.optimization.model_copy(update={"epochs": 1})})
    TrainingRun(short, out_dir=tmp_path / "part").fit(evaluate_at_end=False)
    torch.manual_seed(4321)
    resumed = TrainingRun(spec, out_dir=tmp_path / "part")
    resumed.fit(resume="auto", evaluate_at_end=False)
    for key, value in full.robust.state_dict().items():
        torch.testing.assert_close(resumed.robust.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
