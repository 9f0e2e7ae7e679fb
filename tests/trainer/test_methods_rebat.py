"""ReBAT and RAAT#: every step against a transcription of the official scripts (loss value, gradients,
weights, BatchNorm statistics and the weight average), modes, and the regulariser's start."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.trainer.helpers import digits_spec, trained_digits_model
from trainer.loop import TrainingRun, stack_views

EPS, STEP, STEPS = 0.1, 0.025, 3
WARMUP = 1  # the scripts' --warmup-epochs: averaging and the regulariser start at epoch 1 of 3
LR, FACTOR, STAGES = 0.05, 1.5, (1, 2)  # --lr-max, --lr-factor, --stage1/--stage2
DECAY = 0.9  # --decay-rate (0.999 in the scripts; larger moves on a short run)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- the official scripts
#
# Transcriptions of PKU-ML/ReBAT train_cifar_wa.py and FlaAI/RAAT RAAT#_Code_(Sec_5.3)/train_cifar.py
# (one training iteration each, the default flags of their README/train.sh: no CutMix, no stronger
# attack, no --use-reg-schedule, --l1/--l2 0, restarts 1), on the CPU, with `normalize` the identity
# (digits have one channel) and the attack's random start drawn by the same RNG calls as ours
# (`delta.uniform_(-eps, eps)` there: the same distribution).


def _official_attack_pgd(model, X, y, epsilon, alpha, attack_iters):
    """utils.attack_pgd (l_inf, restarts=1, rand_init=True, early_stop=False), model as the caller left it."""
    delta = epsilon * (torch.rand(X.shape) * 2 - 1)  # delta.uniform_(-epsilon, epsilon)
    delta = torch.max(torch.min(delta, 1 - X), 0 - X)  # clamp(delta, lower_limit - X, upper_limit - X)
    delta.requires_grad = True
    for _ in range(attack_iters):
        output = model(X + delta)
        loss = F.cross_entropy(output, y)
        loss.backward()
        grad = delta.grad.detach()
        d = torch.clamp(delta + alpha * torch.sign(grad), min=-epsilon, max=epsilon)
        d = torch.max(torch.min(d, 1 - X), 0 - X)
        delta.data = d
        delta.grad.zero_()
    all_loss = F.cross_entropy(model(X + delta), y, reduction="none")  # the restarts' selection forward
    max_delta = torch.zeros_like(X)
    max_loss = torch.zeros(y.shape[0])
    max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
    return max_delta


def _official_moving_average(net1, net2, decay_rate):
    """utils.moving_average(update_bn=True)."""
    for param1, param2 in zip(net1.parameters(), net2.parameters()):
        param1.data *= decay_rate
        param1.data += param2.data * (1 - decay_rate)
    for module1, module2 in zip(net1.modules(), net2.modules()):
        if isinstance(module1, nn.modules.batchnorm._BatchNorm):
            module1.running_mean *= decay_rate
            module1.running_mean += module2.running_mean * (1 - decay_rate)
            module1.running_var *= decay_rate
            module1.running_var += module2.running_var * (1 - decay_rate)
            module1.num_batches_tracked = module2.num_batches_tracked


def _official_js(logit1, logit2, T=1.0):
    prob1 = F.softmax(logit1 / T, dim=1)
    prob2 = F.softmax(logit2 / T, dim=1)
    mean_prob = 0.5 * (prob1 + prob2)
    logsoftmax = torch.log(mean_prob.clamp(min=1e-8))
    jsd = F.kl_div(logsoftmax, prob1, reduction="batchmean")
    jsd += F.kl_div(logsoftmax, prob2, reduction="batchmean")
    return jsd * 0.5


class OfficialScript:
    """The state of one official run: model, model_wa (a deepcopy of the training-mode model), SGD."""

    def __init__(self, model: nn.Module, beta: float):
        model.train()
        self.model = model
        self.model_wa = copy.deepcopy(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
        self.args_beta = beta
        self.grads: list[torch.Tensor] = []

    @staticmethod
    def lr_schedule(t):  # --lr-schedule piecewise
        if t < STAGES[0]:
            return LR
        if t < STAGES[1]:
            return LR / FACTOR
        return LR / FACTOR**2

    def begin(self, epoch, i, n):
        self.model.train()
        self.decay_rate = DECAY if epoch >= WARMUP else 0.0
        self.beta = self.args_beta if epoch >= WARMUP else 0.0
        self.opt.param_groups[0].update(lr=self.lr_schedule(epoch + (i + 1) / n))

    def finish(self, robust_loss, X):
        self.opt.zero_grad()
        robust_loss.backward()
        self.grads = [p.grad.detach().clone() for p in self.model.parameters()]
        self.opt.step()
        self.model(X)  # output = model(normalize(X)), for the training accuracy
        _official_moving_average(self.model_wa, self.model, self.decay_rate)
        return robust_loss.detach()

    def end_epoch(self, epoch):
        if epoch >= WARMUP:
            self.model_wa.eval()  # val(model_wa, prefix='wa_') switches it and nothing switches it back

    def rebat_step(self, X, y, epoch, i, n):
        """train_cifar_wa.py, one iteration."""
        self.begin(epoch, i, n)
        model, model_wa = self.model, self.model_wa
        delta = _official_attack_pgd(model, X, y, EPS, STEP, STEPS).detach()
        robust_output = model(torch.clamp(X + delta[: X.size(0)], min=0, max=1))
        robust_loss = F.cross_entropy(robust_output, y)
        if self.beta > 0:
            with torch.no_grad():
                robust_output_wa = model_wa(torch.clamp(X + delta[: X.size(0)], min=0, max=1))
            reg_loss = F.kl_div(
                F.log_softmax(robust_output, dim=1), F.softmax(robust_output_wa, dim=1), reduction="batchmean"
            )
            if reg_loss < 1e10:
                robust_loss += reg_loss * self.beta
        return self.finish(robust_loss, X)

    def raat_sharp_step(self, X, X_aug, y, epoch, i, n, *, eta, mix):
        """RAAT#'s train_cifar.py, one iteration (numpy index lists written as boolean masks: same sets,
        `_lambda = np.random.beta(0.75, 0.75)` given as `mix` = max(lambda, 1 - lambda))."""
        self.begin(epoch, i, n)
        model, model_wa = self.model, self.model_wa
        delta = _official_attack_pgd(model, X, y, EPS, STEP, STEPS).detach()
        delta_aug = _official_attack_pgd(model, X_aug, y, EPS, STEP, STEPS).detach()
        with torch.no_grad():
            pred_benign = model_wa(torch.clamp(X, 0, 1)).argmax(1)
            pred_adv = model_wa(torch.clamp(X + delta, 0, 1)).argmax(1)
            pred_reduced = model_wa(torch.clamp(X + eta * delta, 0, 1)).argmax(1)  # the script: 0.1
        mis = pred_benign != y
        bnd = (pred_benign == y) & (pred_adv != y) & (pred_reduced != y)
        non = ~mis & ~bnd
        adv, reduced = torch.clamp(X + delta, 0, 1), torch.clamp(X + eta * delta, 0, 1)
        data_ce = torch.cat((adv[non], reduced[bnd], adv[mis]))
        labels_ce = torch.cat((y[non], y[bnd], y[mis]))
        robust_loss = F.cross_entropy(model(data_ce), labels_ce)
        with torch.no_grad():
            pred_benign_aug = model_wa(torch.clamp(X_aug, 0, 1)).argmax(1)
        ict = ~(mis | (pred_benign_aug != y))
        if ict.any():
            adv_aug = torch.clamp(X_aug + delta_aug, 0, 1)
            ict_output_1 = model(mix * adv[ict] + (1 - mix) * adv_aug[ict])
            output_benign = model(torch.clamp(X, 0, 1))
            output_benign_aug = model(torch.clamp(X_aug, 0, 1))
            ict_output_2 = mix * output_benign[ict] + (1 - mix) * output_benign_aug[ict]
            loss_con = 1.0 * _official_js(ict_output_1, ict_output_2, 0.5)
            if loss_con < 1e10:
                robust_loss += loss_con * self.beta
        model(torch.clamp(X + delta, 0, 1))  # robust_output (the BoAT KL on it is commented out)
        counts = (int(non.sum()), int(bnd.sum()), int(mis.sum()), int(ict.sum()))
        return self.finish(robust_loss, X), counts


# --------------------------------------------------------------------------- ours against theirs


def _spec(method: dict, **dataset):
    return digits_spec(
        method,
        dataset={"train_limit": 64, **dataset},
        threat_model={"eps": EPS, "step_size": STEP, "steps": STEPS},
        optimization={
            "lr": LR,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "batch_size": 32,
            "epochs": 3,
            "schedule": {
                "kind": "piecewise",
                "milestones": list(STAGES),
                "gamma": 1 / FACTOR,
                "per_step": True,
            },
            "weight_averaging": {"decay": DECAY, "start_epoch": WARMUP, "buffers": "average"},
        },
    )


def _assert_same_state(ours: nn.Module, theirs: nn.Module, what: str):
    """Weights and BatchNorm running averages. Not `num_batches_tracked`: `moving_average` assigns the
    model's counter tensor itself to the WA model, so every training-mode forward of model_wa also
    counts in the model's; BatchNorm reads the counter only without a momentum (here 0.1)."""
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{what} {name}")
        else:
            assert name.endswith("num_batches_tracked"), name


def _run_against_official(run: TrainingRun, script: OfficialScript, official_step) -> list:
    """Train our run for its epochs; after each step, the script does the same step; compare."""
    original = run.train_step
    results = []

    def step(x, y):
        epoch, i = run.epoch, len(results) - sum(r[0] < run.epoch for r in results)
        n = len(run.loader)
        seed = 1000 * epoch + i
        torch.manual_seed(seed)
        ours, counts = original(x, y)
        ours_grads = [p.grad.detach().clone() for p in run.robust.parameters()]
        torch.manual_seed(seed)
        theirs, extra = official_step(x, y, epoch, i, n)
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6), (
            f"loss, epoch {epoch} step {i}"
        )
        for (name, _), a, b in zip(run.robust.named_parameters(), ours_grads, script.grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
        _assert_same_state(run.robust, script.model, "model")
        _assert_same_state(run.averaged, script.model_wa, "averaged model")
        results.append((epoch, ours.item(), extra))
        return ours, counts

    run.train_step = step
    for epoch in range(run.spec.optimization.epochs):
        run.train_epoch()
        script.end_epoch(epoch)
    return results


def test_rebat_steps_equal_the_official_script(tmp_path):
    run = TrainingRun(_spec({"name": "rebat", "beta": 2.0}), out_dir=tmp_path)
    run.robust.load_state_dict(trained_digits_model(steps=40).state_dict())
    run.averaged.load_state_dict(run.robust.state_dict())
    script = OfficialScript(copy.deepcopy(run.robust), beta=2.0)

    def official(x, y, epoch, i, n):
        return script.rebat_step(x, y, epoch, i, n), None

    results = _run_against_official(run, script, official)
    assert [epoch for epoch, *_ in results] == [0, 0, 1, 1, 2, 2]


def test_raat_sharp_steps_equal_the_official_script(tmp_path):
    eta = 0.5  # a wide boundary range: all three kinds of samples occur in a few steps
    spec = _spec({"name": "raat_sharp", "eta": eta}, augment=True, crop_padding=1, flip=False)
    run = TrainingRun(spec, out_dir=tmp_path)
    run.robust.load_state_dict(trained_digits_model(steps=60).state_dict())  # accurate: DICAR has rows
    run.averaged.load_state_dict(run.robust.state_dict())
    run.method.mix_weight = lambda: 0.7
    script = OfficialScript(copy.deepcopy(run.robust), beta=1.0)

    def official(x, y, epoch, i, n):
        half = x.shape[0] // 2
        assert torch.equal(y[:half], y[half:])
        return script.raat_sharp_step(x[:half], x[half:], y[:half], epoch, i, n, eta=eta, mix=0.7)

    results = _run_against_official(run, script, official)
    kinds = torch.tensor([extra for *_, extra in results]).sum(0)
    assert (kinds > 0).all(), f"non-boundary, boundary, misclassified, DICAR rows: {kinds.tolist()}"


# --------------------------------------------------------------------------- modes and the schedule


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, log: list, tag: str):
        super().__init__()
        self.inner, self.log, self.tag = inner, log, tag

    def forward(self, x):
        self.log.append((self.tag, self.training, torch.is_grad_enabled(), x.shape[0]))
        return self.inner(x)


@pytest.mark.parametrize(
    ("epoch", "averaged_mode", "expected"),
    [(0, "train_until_start", "train"), (1, "train_until_start", "train"), (2, "train_until_start", "eval")]
    + [(e, "eval", "eval") for e in (0, 1, 2)],
)
def test_attack_in_training_mode_and_the_averaged_models_mode(epoch, averaged_mode, expected, tmp_path):
    run = TrainingRun(_spec({"name": "rebat", "averaged_mode": averaged_mode}), out_dir=tmp_path)
    log: list = []
    run.robust_fn = run.attack_fn = run.robust = _Recorder(run.robust, log, "model")
    run.averaged = _Recorder(run.averaged, log, "averaged")
    run.epoch = epoch
    run.method.set_epoch(epoch)
    x, y = stack_views(next(iter(run.loader)))
    run.train_step(x, y)
    model = [entry for entry in log if entry[0] == "model"]
    # STEPS attack forwards + attack_pgd's closing one, the loss forward, the post-update forward of x
    assert [training for _, training, *_ in model] == [True] * (STEPS + 3)
    averaged = [entry for entry in log if entry[0] == "averaged"]
    if epoch < WARMUP:
        assert averaged == []  # no regulariser yet: the averaged model is not even forwarded
    else:
        assert averaged == [("averaged", expected == "train", False, len(y))]
    assert not run.averaged.training  # back in eval mode for validation and evaluation


def test_raat_sharp_attacks_each_view_alone_and_forwards_the_first_view_after_the_update(tmp_path):
    spec = _spec({"name": "raat_sharp"}, augment=True, crop_padding=1, flip=False)
    run = TrainingRun(spec, out_dir=tmp_path)
    run.robust.load_state_dict(trained_digits_model(steps=60).state_dict())
    sizes: list = []
    run.robust.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    x, y = stack_views(next(iter(run.loader)))
    half = x.shape[0] // 2
    run.train_step(x, y)
    attack = STEPS + 1  # the attack's forwards and its closing one, per view
    assert sizes[: 2 * attack] == [half] * (2 * attack)
    assert sizes[2 * attack] == half  # CE on the first view's training inputs
    assert sizes[-2:] == [half, half]  # f(X + delta) (the script's robust_output), then f(X) after the update


def test_rebat_regulariser_starts_with_weight_averaging():
    from api_schemas import ReBATMethod, ThreatModel, parse_spec
    from trainer.methods import build_method

    spec = _spec({"name": "rebat", "beta": 3.0})
    method = build_method(ReBATMethod(beta=3.0), ThreatModel())
    method.setup(spec)
    logits, y = torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    averaged = nn.Identity()
    for epoch, beta in ((0, 0.0), (1, 3.0), (2, 3.0)):
        method.set_epoch(epoch)
        out = method.compute_loss(
            nn.Identity(), None, logits, logits + 1.0 * (epoch == 2), y, averaged=averaged
        )
        assert out.parts["beta"].item() == beta
    data = spec.model_dump()
    data["optimization"]["weight_averaging"] = None
    with pytest.raises(Exception, match="weight_averaging"):
        parse_spec(data)
