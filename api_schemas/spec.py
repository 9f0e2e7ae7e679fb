"""ExperimentSpec: the one description of an experiment that runs locally, on Ray and through the API.

Every part refuses unknown fields (a typo must not silently fall back to a default) and impossible
values, and every error carries the dotted path of the field that caused it. "Impossible" includes
what would only fail once the job runs: every integer has an upper bound (seeds fit numpy's 32 bits,
counts fit a 64-bit database column and the machines that run them), every float is finite, and
every list and string that can grow has a length limit, so a spec that validates can be queued,
stored and started.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)

from api_schemas.yaml_safe import YAMLLimitError, load_yaml

SPEC_VERSION = 1

# Upper bounds of the spec's numbers: what a run can use, not what a type can hold.
INT64_MAX = 2**63 - 1  # the widest integer column of every database the service runs on
SEED_MAX = 2**32 - 1  # numpy.random.seed takes 0..2**32-1
MAX_EPOCHS = 10_000
MAX_EXAMPLES = 10_000_000  # images in one split; ImageNet's training set is 1.28 M
MAX_BATCH = 65_536  # images in one batch, training or evaluation
MAX_STEPS = 10_000  # iterations of one attack
MAX_CPU_THREADS = 1024
MAX_WORKERS = 1024  # Ray workers of one run, concurrent sweep trials
MAX_PATH = 4096  # characters of a path (Linux PATH_MAX)
MAX_LIST = 64  # milestones, attacks, teacher checkpoints
MAX_SWEEP_PARAMETERS = 32
MAX_SWEEP_VALUES = 256  # grid/choice values of one parameter
MAX_SWEEP_STRING = 256  # characters of one string value in a sweep

Norm = Literal["linf", "l2"]
AttackLoss = Literal["ce", "kl", "cw"]
RandomStart = Literal["none", "uniform", "normal"]
L2Variant = Literal["default", "advertorch"]
Regularizer = Literal["none", "alp", "trades"]
DatasetName = Literal["cifar10", "cifar100", "tiny_imagenet", "mnist", "digits", "synthetic"]
# Kept in step with trainer.models' registry (a test checks it); duplicated here because the
# control plane validates specs without importing torch.
ModelName = Literal[
    "resnet18",
    "resnet18_bottleneck",
    "resnet18_bottleneck_stem2",
    "preact_resnet18",
    "wide_resnet",
    "wrn28_10",
    "wrn28_10_stem2",
    "wrn34_10",
    "wrn34_20",
    "lbgat_teacher_resnet18",
    "inception_resnet_v2",
    "cat_mnist_cnn",
    "tiny_cnn",
]
AutoAttackName = Literal["apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t"]
# The mask networks g_phi of Calibrated Adversarial Training (trainer.models, kind 'mask'); they map
# (x, delta) to a soft mask, so they are not classifiers and cannot be a robust or teacher model.
MaskModelName = Literal["cat_mask_mnist_cnn", "cat_mask_resnet18"]


class _Strict(BaseModel):
    # allow_inf_nan: YAML's .inf/.nan and JSON's Infinity/NaN parse as floats; no field means them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- threat model


class ThreatModel(_Strict):
    """The training attack: the inner maximisation of adversarial training.

    `loss`, `random_start` and `model_mode` default to the method's own choice (LBGAT/TRADES: KL
    from x + 0.001*N(0,1), robust model in eval mode; Madry PGD-AT: CE from a uniform start, eval
    mode; CAT: train mode), so a spec only names them to deviate, e.g. the CE-attack variant of
    LBGAT (the paper's Eq. 1) or Rice et al.'s AT, whose code attacks in training mode.
    """

    norm: Norm = "linf"
    eps: float = Field(0.031, gt=0)
    step_size: float = Field(0.007, gt=0)
    steps: int = Field(10, ge=1, le=1000)
    loss: AttackLoss | None = None
    random_start: RandomStart | None = None
    kappa: float = Field(0.0, ge=0, description="CW margin confidence; only used with loss='cw'")
    l2_variant: L2Variant = Field(
        "default",
        description="l_2 only: 'advertorch' runs PGD as advertorch's PGDAttack (a uniform point of the [0, 1] "
        "box pulled into the ball as the start; each step clipped to the box, then projected onto the "
        "ball), the attack of the RAAT/Cons-AT code; 'default' projects onto the ball first",
    )
    model_mode: Literal["train", "eval"] | None = Field(
        None,
        description="the robust model's mode during the training attack (train: BatchNorm on batch "
        "statistics, running averages moved by the attack, as Rice et al.'s and CAT's code); "
        "None: the method's own",
    )
    start_radius: float | None = Field(
        None,
        gt=0,
        le=1,
        description="half-width of the l_inf uniform random start; None: eps (CAT's MNIST code: 0.1)",
    )
    clip: bool = Field(
        True, description="keep x' in the [0, 1] image box (CAT's MNIST training attack does not)"
    )

    @model_validator(mode="after")
    def _eps_in_box(self) -> ThreatModel:
        if self.norm == "linf" and self.eps > 1.0:
            raise ValueError("eps: an l_inf radius above 1 covers the whole [0,1] box; use e.g. 0.031")
        if self.start_radius is not None and (self.norm != "linf" or self.random_start == "normal"):
            raise ValueError("start_radius: sizes the l_inf uniform random start only")
        return self

    @model_validator(mode="after")
    def _l2_sizes_explicit(self) -> ThreatModel:
        # The defaults are l_inf sizes (8/255-ish); an l_2 ball of radius 0.031 is a no-op threat.
        if self.norm == "l2":
            for name in ("eps", "step_size"):
                if name not in self.model_fields_set:
                    raise ValueError(
                        f"{name}: the default is an l_inf size; give the l_2 {name} explicitly "
                        "(RAAT: eps 128/255 = 0.502, step_size 32/255 = 0.125)"
                    )
        return self


# --------------------------------------------------------------------------- methods


class NaturalMethod(_Strict):
    """Plain cross-entropy on clean inputs; no attack."""

    name: Literal["natural"] = "natural"


class PGDATMethod(_Strict):
    """Madry et al.: cross-entropy on PGD-CE adversarial examples (vanilla AT)."""

    name: Literal["pgd_at"] = "pgd_at"


class TradesMethod(_Strict):
    """TRADES: CE(f(x), y) + alpha * KL(f(x) || f(x_adv)); the official code's `--beta` is alpha."""

    name: Literal["trades"] = "trades"
    alpha: float = Field(6.0, ge=0)


class ALPMethod(_Strict):
    """Adversarial Logit Pairing: mixed clean/adversarial CE + alpha * MSE(f(x_adv), f(x))."""

    name: Literal["alp"] = "alp"
    alpha: float = Field(1.0, ge=0)


class _GuidedMethod(_Strict):
    alpha: float = Field(0.0, ge=0, description="weight of the regularizer (official code: --beta)")
    regularizer: Regularizer = "none"
    robust_ce: bool = Field(False, description="ablation (Table 6): add CE(M_robust(x_adv), y)")

    @model_validator(mode="after")
    def _alpha_needs_regularizer(self) -> _GuidedMethod:
        if self.regularizer == "none" and self.alpha != 0:
            raise ValueError(
                "alpha: weights the ALP/TRADES regularizer, set regularizer to 'alp' or 'trades'"
            )
        return self


class BGATMethod(_GuidedMethod):
    """Boundary Guided AT: M_robust(x_adv) is pulled to the logits of fixed pre-trained teacher(s).

    With several checkpoints, the teacher is their ensemble (mean of logits), as in the paper's
    WideResNet + InceptionResNetV2 ensemble. Our checkpoints name their own architecture, so members
    may differ; a plain state dict is rebuilt as `teacher_models[i]` (same order), else `model.teacher`.
    """

    name: Literal["bgat"] = "bgat"
    teacher_checkpoints: list[Annotated[str, Field(min_length=1, max_length=MAX_PATH)]] = Field(
        min_length=1, max_length=MAX_LIST
    )
    teacher_models: list[ModelRef] | None = Field(
        None,
        max_length=MAX_LIST,
        description="the architecture of each plain-state-dict checkpoint, in the order of teacher_checkpoints "
        "(None: model.teacher for every one)",
    )

    @model_validator(mode="after")
    def _one_model_per_checkpoint(self) -> BGATMethod:
        if self.teacher_models is not None and len(self.teacher_models) != len(self.teacher_checkpoints):
            raise ValueError(
                f"teacher_models: one architecture per teacher checkpoint ({len(self.teacher_checkpoints)}), "
                f"got {len(self.teacher_models)}"
            )
        return self


class LBGATMethod(_GuidedMethod):
    """Learnable BGAT (Algorithm 1): teacher and robust model trained together by one optimizer."""

    name: Literal["lbgat"] = "lbgat"
    beta: float = Field(
        1.0, ge=0, description="weight of CE on the teacher (paper's beta, 1 in all experiments)"
    )


class CATMethod(_Strict):
    """Calibrated Adversarial Training (Huang et al.): f_theta on calibrated examples x + M * delta.

    delta comes from PGD-CE ('cent') or CW_inf ('cw') from a uniform start; the soft mask
    M = g_phi(x, delta) in (0, 1) is learned by the mask network `mask_model` with its own optimizer
    (the optimization settings and schedule of f_theta, at `mask_lr`). f_theta minimises Eq. 13,
    CE(f(x), y) * (1 - p_y(x)) + beta * KL, then g_phi minimises Eq. 14, KL + beta1 * CE(f(x_cali), y).
    """

    name: Literal["cat"] = "cat"
    variant: Literal["cent", "cw"] = "cent"
    beta: float = Field(
        5.0, ge=0, description="weight of the KL term on calibrated examples (Eq. 13); 1 on MNIST"
    )
    beta1: float = Field(
        0.05, ge=0, description="weight of CE(f(x_cali), y) in g_phi's objective (Eq. 14): 0.05, 0.1, 0.3"
    )
    kappa: float | None = Field(
        None,
        ge=0,
        description="CW_inf confidence of CAT-cw's attack; None: 50 (CIFAR; the paper's MNIST runs use 150)",
    )
    mask_model: MaskModelName = Field(
        "cat_mask_resnet18",
        description="g_phi: 'cat_mask_resnet18' (CIFAR, Table 6), 'cat_mask_mnist_cnn' (Table 5)",
    )
    mask_lr: float | None = Field(
        None, gt=0, le=10, description="g_phi's initial learning rate (same schedule); None: optimization.lr"
    )

    @model_validator(mode="after")
    def _kappa_only_for_cw(self) -> CATMethod:
        if self.variant == "cent" and self.kappa is not None:
            raise ValueError("kappa: only CAT-cw's CW_inf attack has a confidence; CAT-cent attacks with CE")
        return self


class FATMethod(_Strict):
    """Friendly Adversarial Training (Zhang et al., ICML 2020): early-stopped PGD, tau steps past the boundary.

    'trades' is FAT for TRADES (KL attack from x + 0.001*N(0,1), TRADES loss: the FAT baseline of
    CAT's tables); 'ce' is FAT (CE attack from a uniform start, CE on the friendly examples).
    tau grows by one at each of `tau_milestones` (0-based epochs, like lr milestones), the
    official dynamic tau: FAT-TRADES 0,1,2,3 from epochs 30, 50, 70; FAT 0,1,2 from 50 and 90.
    """

    name: Literal["fat"] = "fat"
    variant: Literal["trades", "ce"] = "trades"
    alpha: float | None = Field(
        None, ge=0, description="TRADES weight (the official code's --beta); None: 6 for 'trades'"
    )
    tau: int = Field(0, ge=0, le=1000, description="steps allowed past the first misclassified iterate")
    tau_milestones: list[Annotated[int, Field(le=MAX_EPOCHS)]] | None = Field(
        None,
        max_length=MAX_LIST,
        description="epochs at which tau grows by one; None: the official dynamic tau of the variant",
    )
    omega: float | None = Field(
        None, ge=0, description="std of the noise added to each attack step; None: 0 ('trades'), 0.001 ('ce')"
    )

    @field_validator("tau_milestones")
    @classmethod
    def _tau_milestones_increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if any(m < 1 for m in value):
                raise ValueError("tau milestones must be epochs >= 1")
            if any(b <= a for a, b in pairwise(value)):
                raise ValueError("tau milestones must be strictly increasing")
        return value

    @model_validator(mode="after")
    def _alpha_only_for_trades(self) -> FATMethod:
        if self.variant == "ce" and self.alpha is not None:
            raise ValueError("alpha: weights the TRADES KL term; the 'ce' variant trains with CE only")
        return self


class MARTMethod(_Strict):
    """MART (Wang et al., ICLR 2020): BCE(f(x_adv), y) + alpha * KL(f(x) || f(x_adv)) * (1 - p_y(x)).

    Attack: PGD on CE from x + 0.001*N(0,1), the model in eval mode (official code).
    """

    name: Literal["mart"] = "mart"
    alpha: float = Field(6.0, ge=0, description="weight of the weighted KL (official code: --beta, 6)")


class ConsATMethod(_Strict):
    """Cons-AT (Tack et al., AAAI 2022): CE on the PGD examples of two augmentations of each image
    + lam * Jensen-Shannon divergence between their predictions (RAAT paper, Table 4)."""

    name: Literal["cons_at"] = "cons_at"
    lam: float = Field(1.0, ge=0, description="weight of the consistency term (1 in the RAAT paper)")
    temperature: float = Field(0.5, gt=0, description="softmax temperature of the JS term (official: 0.5)")


class RAATMethod(_Strict):
    """RAAT (Robust Alignment AT, App. C / Table 4): CE on the full adversarial example, or on the
    reduced one x + eta*delta for boundary samples, + lam * DICAR on correctly classified images."""

    name: Literal["raat"] = "raat"
    lam: float = Field(1.0, ge=0, description="weight of the DICAR term (paper's lambda, 1)")
    eta: float = Field(0.1, gt=0, lt=1, description="boundary range: the reduced perturbation is eta*delta")
    gamma: float = Field(0.75, gt=0, description="interpolation weight ~ Beta(gamma, gamma)")
    temperature: float = Field(0.5, gt=0, description="softmax temperature of the JS term (official: 0.5)")
    dicar_target: Literal["logits", "probabilities"] = Field(
        "logits",
        description="interpolate the clean logits (official code) or the clean probabilities (Eq. 15)",
    )


class RAATPPMethod(RAATMethod):
    """RAAT++ (Table 4): RAAT with MART's boosted CE and MART's weighted KL (weight alpha) added."""

    name: Literal["raat_pp"] = "raat_pp"  # type: ignore[assignment]
    alpha: float = Field(6.0, ge=0, description="weight of MART's weighted KL (official code: --beta, 6)")


AveragedMode = Literal["train_until_start", "eval"]
_AVERAGED_MODE_DOC = (
    "mode of the averaged model in the step: 'train_until_start' (official scripts: their deepcopy of "
    "the training-mode model stays in training mode, batch statistics, until its first evaluation at "
    "the end of the epoch in which averaging starts) or 'eval'"
)


class ReBATMethod(_Strict):
    """ReBAT (Wang et al., NeurIPS 2023; PKU-ML/ReBAT `train_cifar_wa.py`): PGD-AT (CE on x', the
    attack in training mode) + beta * KL(f_avg(x') || f(x')) towards the weight-averaged model, from
    the epoch at which weight averaging starts (`optimization.weight_averaging.start_epoch`, the
    official `--warmup-epochs` 105); before it, plain PGD-AT."""

    name: Literal["rebat"] = "rebat"
    beta: float = Field(
        1.0, ge=0, description="weight of the KL to the averaged model (official --beta: 1; 2 for WRN-34-10)"
    )
    averaged_mode: AveragedMode = Field("train_until_start", description=_AVERAGED_MODE_DOC)


class RAATSharpMethod(_Strict):
    """RAAT# (RAAT paper, Sec. 5.3 and Table 3; FlaAI/RAAT `RAAT#_Code_(Sec_5.3)/train_cifar.py`): RAAT
    on ReBAT's code. CE on the first augmentation's x' (x + eta*delta for boundary samples, which
    the weight-averaged model decides) + beta * DICAR over both augmentations, the DICAR weight
    following ReBAT's regulariser schedule (0 before weight averaging starts). ReBAT's own KL term
    is commented out in the released code (`boat_beta`, 0, restores it)."""

    name: Literal["raat_sharp"] = "raat_sharp"
    beta: float = Field(
        1.0, ge=0, description="weight of DICAR once weight averaging starts (official --beta, 1; 0 before)"
    )
    eta: float = Field(0.1, gt=0, lt=1, description="boundary range: the reduced perturbation is eta*delta")
    gamma: float = Field(0.75, gt=0, description="interpolation weight ~ Beta(gamma, gamma)")
    temperature: float = Field(0.5, gt=0, description="softmax temperature of the JS term (official: 0.5)")
    boat_beta: float = Field(
        0.0,
        ge=0,
        description="weight of ReBAT's KL(f_avg(x') || f(x')) from the same epoch (commented out in the "
        "released RAAT# code: 0)",
    )
    averaged_mode: AveragedMode = Field("train_until_start", description=_AVERAGED_MODE_DOC)


MethodSpec = Annotated[
    NaturalMethod
    | PGDATMethod
    | TradesMethod
    | ALPMethod
    | BGATMethod
    | LBGATMethod
    | CATMethod
    | FATMethod
    | MARTMethod
    | ConsATMethod
    | RAATMethod
    | RAATPPMethod
    | ReBATMethod
    | RAATSharpMethod,
    Field(discriminator="name"),
]
TEACHER_METHODS = ("lbgat", "bgat")
# Methods that train on two random augmentations of every image (the loader's two_views).
TWO_VIEW_METHODS = ("cons_at", "raat", "raat_pp", "raat_sharp")
# Methods whose step reads the weight-averaged model (optimization.weight_averaging is required).
AVERAGED_METHODS = ("rebat", "raat_sharp")


# --------------------------------------------------------------------------- models, data


class ModelRef(_Strict):
    """A model by registry name plus the few architecture options the registry accepts."""

    name: ModelName
    depth: int | None = Field(None, ge=10, le=1000)
    widen_factor: int | None = Field(None, ge=1, le=64)
    drop_rate: float | None = Field(None, ge=0, lt=1)
    width: int | None = Field(None, ge=1, le=4096)
    normalize: Literal["none", "cifar10", "cifar100"] = Field(
        "none",
        description="standardise inputs by the dataset's per-channel mean/std inside the model, as CAT's "
        "and Rice et al.'s code do; attacks still work on [0, 1] images",
    )

    @model_validator(mode="after")
    def _options_fit_model(self) -> ModelRef:
        wrn_only = {"depth": self.depth, "widen_factor": self.widen_factor, "drop_rate": self.drop_rate}
        if self.name != "wide_resnet":
            for key, value in wrn_only.items():
                if value is not None:
                    raise ValueError(f"{key}: only the 'wide_resnet' model takes {key}")
        if self.depth is not None and (self.depth - 4) % 6 != 0:
            raise ValueError("depth: a WideResNet needs depth = 6n + 4 (e.g. 28 or 34)")
        if self.width is not None and self.name != "tiny_cnn":
            raise ValueError("width: only the 'tiny_cnn' model takes width")
        return self

    def kwargs(self) -> dict[str, Any]:
        """Architecture options to pass to trainer.models.create_model (unset ones left out)."""
        exclude = {"name"} if self.normalize != "none" else {"name", "normalize"}
        return self.model_dump(exclude=exclude, exclude_none=True)


class ModelSpec(_Strict):
    robust: ModelRef
    teacher: ModelRef | None = Field(
        None,
        description="LBGAT's M_natural (trained jointly); for BGAT, the architecture of plain state dicts",
    )


class DatasetSpec(_Strict):
    name: DatasetName
    root: str = Field(
        "data", max_length=MAX_PATH, description="folder holding the dataset in its official layout"
    )
    download: bool = Field(
        False, description="download where torchvision imports and the internet is reachable"
    )
    resize_to: int | None = Field(None, ge=8, le=1024, description="Tiny-ImageNet: LBGAT resizes to 32")
    augment: bool = Field(
        True, description="random crop (crop_padding, padding_mode) + horizontal flip on training batches"
    )
    crop_padding: int = Field(4, ge=0, le=64)
    padding_mode: Literal["zeros", "reflect"] = Field(
        "zeros",
        description="how random crops pad: zeros (torchvision RandomCrop, TRADES/LBGAT) or "
        "reflect (np.pad mode='reflect', Rice et al.'s and CAT's code)",
    )
    flip: bool = True
    val_size: int = Field(
        0,
        ge=0,
        le=MAX_EXAMPLES,
        description="images held out of the training set for best-checkpoint selection",
    )
    train_limit: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="use only the first n training images"
    )
    test_limit: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="use only the first n test images"
    )
    synthetic_size: int = Field(
        1024, ge=16, le=1_000_000, description="images generated in memory (3x32x32 float32: 12 KiB each)"
    )

    @model_validator(mode="after")
    def _resize_only_tiny(self) -> DatasetSpec:
        if self.resize_to is not None and self.name != "tiny_imagenet":
            raise ValueError("resize_to: only Tiny-ImageNet is resized (CIFAR and MNIST keep their size)")
        return self


# --------------------------------------------------------------------------- optimisation


class ScheduleSpec(_Strict):
    """Learning-rate schedule; epochs are 0-based, so milestone 75 means 'from the 76th epoch on'."""

    kind: Literal["piecewise", "cosine", "constant"] = "piecewise"
    milestones: list[Annotated[int, Field(le=MAX_EPOCHS)]] = Field(
        default_factory=lambda: [75, 90], max_length=MAX_LIST
    )
    gamma: float = Field(0.1, gt=0, le=1)
    first_epoch_lr: float | None = Field(
        None, gt=0, description="official LBGAT code: lr 0.02 during the first epoch, then the schedule"
    )
    per_step: bool = Field(
        False,
        description="piecewise: take each step's factor at t = epoch + (step + 1) / steps, as Rice et al.'s "
        "and ReBAT's lr_schedule(epoch + (i + 1) / len(loader)) (the last step before a milestone is "
        "already decayed); false: once per epoch",
    )

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(m < 1 for m in value):
            raise ValueError("milestones must be epochs >= 1")
        if any(b <= a for a, b in pairwise(value)):
            raise ValueError("milestones must be strictly increasing")
        return value


class WeightAveragingSpec(_Strict):
    """Exponential moving average of the robust model's weights (WA/EMA, as in ReBAT and RAAT#).

    After every optimizer step: w_avg <- decay * w_avg + (1 - decay) * w. Before `start_epoch` the
    average is a plain copy of the model (decay 0), as ReBAT's warm-up. BatchNorm running statistics
    are averaged the same way (`buffers: average`, ReBAT's `moving_average(update_bn=True)`) or copied
    from the model (`copy`); integer buffers (num_batches_tracked) are always copied.
    """

    decay: float = Field(0.999, gt=0, lt=1, description="EMA decay per optimizer step")
    start_epoch: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="0-based epoch from which the average starts"
    )
    buffers: Literal["average", "copy"] = "average"


class OptimizationSpec(_Strict):
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(2e-4, ge=0, lt=1)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH, description="global batch (all workers together)")
    epochs: int = Field(100, ge=1, le=MAX_EPOCHS)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    weight_averaging: WeightAveragingSpec | None = Field(
        None, description="keep an EMA of the robust model's weights (None: off)"
    )

    @model_validator(mode="after")
    def _milestones_within_training(self) -> OptimizationSpec:
        if self.schedule.kind == "piecewise" and any(m >= self.epochs for m in self.schedule.milestones):
            raise ValueError(
                f"schedule.milestones: every milestone must be below epochs={self.epochs} "
                f"(got {self.schedule.milestones})"
            )
        return self


# --------------------------------------------------------------------------- evaluation


class _Attack(_Strict):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128, description="label in reports"
    )


class FGSMAttackSpec(_Attack):
    """One step of size eps from x: the sign step (l_inf) or the normalised-gradient step (l_2)."""

    kind: Literal["fgsm"] = "fgsm"
    eps: float | None = Field(None, gt=0, description="default: the threat model's eps")
    norm: Norm | None = Field(None, description="default: the threat model's norm")

    def label(self) -> str:
        return self.name or "fgsm"


class PGDAttackSpec(_Attack):
    """PGD-k. The LBGAT/TRADES protocol: eps 0.031, step 0.003, 20 steps, uniform random start."""

    kind: Literal["pgd"] = "pgd"
    eps: float | None = Field(None, gt=0, description="default: the threat model's eps")
    norm: Norm | None = Field(None, description="default: the threat model's norm")
    step_size: float | None = Field(0.003, gt=0, description="None: the threat model's step_size")
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    loss: AttackLoss = "ce"
    kappa: float = Field(0.0, ge=0)
    random_start: RandomStart = "uniform"
    l2_variant: L2Variant | None = Field(None, description="l_2 PGD's variant; None: the threat model's")

    def label(self) -> str:
        prefix = {"ce": "pgd", "cw": "cw", "kl": "pgd_kl"}[self.loss]
        return self.name or f"{prefix}{self.steps}"


class AutoAttackSpec(_Attack):
    """AutoAttack (pyautoattack) on the first `n_examples` test images."""

    kind: Literal["autoattack"] = "autoattack"
    version: Literal["standard", "plus", "rand", "custom"] = "standard"
    attacks: list[AutoAttackName] | None = Field(None, max_length=len(get_args(AutoAttackName)))
    eps: float | None = Field(None, gt=0)
    norm: Norm | None = None
    n_examples: int | None = Field(None, ge=1, le=MAX_EXAMPLES)

    @model_validator(mode="after")
    def _custom_needs_list(self) -> AutoAttackSpec:
        if self.version == "custom" and not self.attacks:
            raise ValueError("attacks: version 'custom' needs a list of attacks, e.g. ['apgd-ce', 'square']")
        if self.version != "custom" and self.attacks:
            raise ValueError("attacks: only version 'custom' takes a list of attacks")
        return self

    def label(self) -> str:
        return self.name or ("autoattack" if self.version == "standard" else f"autoattack_{self.version}")


class TransferAttackSpec(_Attack):
    """Black-box transfer: PGD computed on a source checkpoint, applied to the evaluated model."""

    kind: Literal["transfer"] = "transfer"
    source_checkpoint: str = Field(min_length=1, max_length=MAX_PATH)
    eps: float | None = Field(None, gt=0)
    norm: Norm | None = None
    step_size: float | None = Field(0.003, gt=0, description="None: the threat model's step_size")
    steps: int = Field(20, ge=1, le=MAX_STEPS)
    loss: AttackLoss = "ce"
    random_start: RandomStart = "uniform"
    l2_variant: L2Variant | None = Field(None, description="l_2 PGD's variant; None: the threat model's")

    def label(self) -> str:
        return self.name or "transfer"


class SquareAttackSpec(_Attack):
    """Square Attack (Andriushchenko et al., 2020): score-based black-box random search, via pyautoattack.

    CAT's black-box evaluation (Table 4): 5000 queries at eps 8/255. p_init 0.8 and the fixed
    p schedule (`rescale_schedule: false`) are AutoAttack's settings for its Square component.
    """

    kind: Literal["square"] = "square"
    eps: float | None = Field(None, gt=0, description="default: the threat model's eps")
    norm: Norm | None = Field(None, description="default: the threat model's norm")
    n_queries: int = Field(5000, ge=1, le=1_000_000)
    p_init: float = Field(0.8, gt=0, le=1, description="initial fraction of pixels in a square")
    n_restarts: int = Field(1, ge=1, le=100)
    rescale_schedule: bool = Field(
        False, description="rescale the p schedule to n_queries (Square's default)"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX)
    n_examples: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="attack only the first n evaluated images"
    )

    def label(self) -> str:
        return self.name or f"square{self.n_queries}"


AttackSpec = Annotated[
    FGSMAttackSpec | PGDAttackSpec | AutoAttackSpec | TransferAttackSpec | SquareAttackSpec,
    Field(discriminator="kind"),
]


def lbgat_protocol() -> list[AttackSpec]:
    """White-box suite of the LBGAT paper, Sec. 4 and Table 3 (AutoAttack added by presets).

    The PGD step is the field default (0.003, an l_inf step), so that an l_2 spec that keeps this
    suite is refused until it names l_2 step sizes (see ExperimentSpec).
    """
    return [FGSMAttackSpec(), PGDAttackSpec(steps=20, loss="ce"), PGDAttackSpec(steps=20, loss="cw")]


class EvaluationSpec(_Strict):
    """Training's final evaluation: a protocol by name (api_schemas.protocols) or an inline suite.

    With `protocol`, the attacks (and n_examples, unless given) are the protocol's, pinned to its
    version when the spec is validated; evaluation jobs run the same suite with the same code.
    """

    protocol: str | None = Field(
        None,
        max_length=80,
        pattern=r"^[a-z0-9][a-z0-9-]{0,63}(@[0-9]{1,5})?$",
        description="a protocol id ('lbgat') or 'id@version'; replaces `attacks`",
    )
    attacks: list[AttackSpec] = Field(default_factory=lbgat_protocol, max_length=MAX_LIST)
    n_examples: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="evaluate on the first n test images"
    )
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    on_best: bool = Field(True, description="also evaluate the best checkpoint when one is selected")
    weights: Literal["model", "averaged"] | None = Field(
        None,
        description="which weights are evaluated: the model's or the EMA "
        "(None: averaged when optimization.weight_averaging is on)",
    )

    @model_validator(mode="after")
    def _unique_labels(self) -> EvaluationSpec:
        labels = [attack.label() for attack in self.attacks]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"attacks: labels must be unique, set `name` to tell apart {duplicates}")
        return self


class SelectionSpec(_Strict):
    """Which checkpoint is reported as the selected ("best") one, besides the last.

    By a metric on a held-out split of the training set (`split: heldout`, dataset.val_size images)
    or on the test set (`split: test`, the protocol of RAAT's, CAT's and Rice et al.'s code: it
    overstates the numbers, and every summary says so), or a fixed epoch's checkpoint (`epoch`, as
    LBGAT's AutoAttack script evaluates the epoch-92 files).
    """

    metric: Literal["pgd_acc", "clean_acc", "nrr", "clean_plus_pgd"] | None = Field(
        None, description="clean_plus_pgd: clean + PGD accuracy, CAT's criterion; pgd_acc: RAAT's"
    )
    split: Literal["heldout", "test"] = Field(
        "heldout",
        description="where the metric is measured: dataset.val_size held-out training images, or the "
        "test set (dataset.test_limit applies)",
    )
    epoch: int | None = Field(
        None,
        ge=1,
        le=MAX_EPOCHS,
        description="report the checkpoint after this many epochs as the selected one (no metric)",
    )
    attack: PGDAttackSpec = Field(
        default_factory=lambda: PGDAttackSpec(name="val_pgd10", step_size=None, steps=10),
        description="PGD-10 with the training attack's step from a random start by default",
    )
    every_n_epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    weights: Literal["model", "averaged"] | None = Field(
        None,
        description="which weights are validated: the model's or the EMA "
        "(None: averaged when optimization.weight_averaging is on)",
    )


class CheckpointSpec(_Strict):
    every_n_epochs: int = Field(1, ge=1, le=MAX_EPOCHS)
    keep_last: int | None = Field(
        2, ge=1, le=MAX_EPOCHS, description="periodic checkpoints kept; None keeps all"
    )


class RuntimeSpec(_Strict):
    """Where and how fast; None means 'on when the device is a GPU'."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "bf16", "tf32", "fp32"] = Field(
        "auto",
        description="training precision. auto: bf16 autocast on GPUs, fp32 on CPUs; bf16: autocast; tf32: "
        "fp32 tensors, TF32 tensor-core matmuls/convolutions on GPUs; fp32: full fp32 (TF32 off), as every "
        "official code trained. Evaluation always runs without autocast.",
    )
    channels_last: bool | None = None
    compile: bool = False
    deterministic: bool = False
    progress: bool = True
    cpu_threads: int | None = Field(
        None,
        ge=1,
        le=MAX_CPU_THREADS,
        description="torch intra-op threads on CPU; small models run fastest on 1 (None: torch's default)",
    )

    @model_validator(mode="before")
    @classmethod
    def _bf16_alias(cls, data: Any) -> Any:
        # Specs written before `precision` said `bf16: true | false | null`; they still load.
        if isinstance(data, dict) and "bf16" in data:
            data = dict(data)
            old = data.pop("bf16")
            if old is not None and not isinstance(old, bool):
                raise ValueError(
                    "bf16: true, false or null (superseded by precision: bf16 | tf32 | fp32 | auto)"
                )
            new = {None: "auto", True: "bf16", False: "tf32"}[old]
            if data.get("precision", new) != new:
                raise ValueError(
                    f"precision: bf16={old} (the old field) contradicts precision={data['precision']!r}"
                )
            data["precision"] = new
        return data


class OutputSpec(_Strict):
    dir: str | None = Field(None, max_length=MAX_PATH, description="default: runs/<name>")


# --------------------------------------------------------------------------- cluster: resources, sweep


class ResourcesSpec(_Strict):
    """How one training run is spread over a Ray cluster (ignored by `lbgat train`).

    The global batch (optimization.batch_size) is split evenly: each of N workers trains on batch/N
    and DDP averages the gradients, so N workers take the same steps with the same learning rate as
    the single-GPU recipe (BatchNorm statistics are per worker unless sync_batchnorm is on).
    """

    num_workers: int = Field(1, ge=1, le=MAX_WORKERS)
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    gpus_per_worker: float = Field(1.0, gt=0, le=64)
    cpus_per_worker: float = Field(1.0, gt=0, le=MAX_CPU_THREADS)
    max_failures: int = Field(2, ge=0, le=100, description="worker-group restarts from the last checkpoint")
    sync_batchnorm: bool = Field(True, description="SyncBatchNorm across GPU workers (single-GPU statistics)")


def _sweep_value(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Check one grid/choice value by hand before the union validates it.

    A value replaces a spec field in every trial (`workers.sweep.trial_spec`), so it is what a field
    can hold: a number, string, boolean or null, or a list of them (lr milestones, say). Checked
    here rather than by the union alone so that the error is one sentence at the value's path instead
    of one per union member, and so that an integer past 64 bits is refused rather than quietly
    turned into a float.
    """
    if isinstance(value, list):
        if len(value) > MAX_LIST:
            raise ValueError(f"a list value holds at most {MAX_LIST} items (got {len(value)})")
        for i, item in enumerate(value):
            problem = (
                "a list value cannot hold lists" if isinstance(item, list) else _sweep_scalar_problem(item)
            )
            if problem:
                raise ValueError(f"item {i}: {problem}")
    else:
        problem = _sweep_scalar_problem(value)
        if problem:
            raise ValueError(problem)
    return handler(value)


def _sweep_scalar_problem(value: Any) -> str | None:
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return None if -INT64_MAX - 1 <= value <= INT64_MAX else "integers must fit in 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else "numbers must be finite"
    if isinstance(value, str):
        if len(value) > MAX_SWEEP_STRING:
            return f"strings hold at most {MAX_SWEEP_STRING} characters (got {len(value)})"
        return None
    kind = "a mapping" if isinstance(value, dict) else f"a {type(value).__name__}"
    return f"must be a number, string, boolean or null, or a list of them (got {kind})"


SweepScalar = (
    bool
    | Annotated[int, Field(ge=-INT64_MAX - 1, le=INT64_MAX)]
    | float
    | Annotated[str, Field(max_length=MAX_SWEEP_STRING)]
    | None
)
SweepValue = Annotated[
    SweepScalar | Annotated[list[SweepScalar], Field(max_length=MAX_LIST)], WrapValidator(_sweep_value)
]
# A spec field by dotted path, as `workers.sweep` applies it (sections are mappings, no list indices).
SweepPath = Annotated[str, Field(max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")]


class GridDomain(_Strict):
    kind: Literal["grid"] = "grid"
    values: list[SweepValue] = Field(min_length=1, max_length=MAX_SWEEP_VALUES)


class ChoiceDomain(_Strict):
    kind: Literal["choice"] = "choice"
    values: list[SweepValue] = Field(min_length=1, max_length=MAX_SWEEP_VALUES)


class UniformDomain(_Strict):
    kind: Literal["uniform", "loguniform"] = "uniform"
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> UniformDomain:
        if not self.low < self.high:
            raise ValueError(f"high: must be above low ({self.low})")
        if self.kind == "loguniform" and self.low <= 0:
            raise ValueError("low: a log-uniform range must be positive")
        return self


class IntDomain(_Strict):
    kind: Literal["randint"] = "randint"
    low: int = Field(ge=-INT64_MAX - 1, le=INT64_MAX)
    high: int = Field(ge=-INT64_MAX - 1, le=INT64_MAX, description="exclusive")

    @model_validator(mode="after")
    def _ordered(self) -> IntDomain:
        if not self.low < self.high:
            raise ValueError(f"high: must be above low ({self.low})")
        return self


SearchDomain = Annotated[GridDomain | ChoiceDomain | UniformDomain | IntDomain, Field(discriminator="kind")]


class SweepSpec(_Strict):
    """A Ray Tune search over spec fields, each trial a full (possibly distributed) training run.

    `parameters` maps dotted spec paths ("method.alpha", "optimization.lr", "model.robust.name") to a
    domain; every trial's spec is the base spec with those fields replaced, validated like any spec.
    """

    parameters: dict[SweepPath, SearchDomain] = Field(min_length=1, max_length=MAX_SWEEP_PARAMETERS)
    search: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(
        1, ge=1, le=10_000, description="random/optuna: trials; grid: repeats of the grid"
    )
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: Literal["val_pgd_acc", "val_clean_acc", "val_nrr", "test_clean_accuracy", "neg_loss"] = (
        "val_pgd_acc"
    )
    mode: Literal["max", "min"] = "max"
    grace_period: int = Field(
        1, ge=1, le=MAX_EPOCHS, description="ASHA: epochs before a trial can be stopped"
    )
    reduction_factor: float = Field(2.0, gt=1, le=100)
    max_concurrent_trials: int | None = Field(
        None, ge=1, le=MAX_WORKERS, description="None: as many as the cluster's GPUs/CPUs allow"
    )

    @model_validator(mode="after")
    def _grid_only_with_grid(self) -> SweepSpec:
        kinds = {d.kind for d in self.parameters.values()}
        if self.search == "grid" and kinds - {"grid"}:
            raise ValueError(
                "search: 'grid' needs every parameter as {kind: grid, values: [...]}; use 'random' to sample"
            )
        if self.search != "grid" and "grid" in kinds:
            raise ValueError(
                f"search: '{self.search}' samples; give choice/uniform/loguniform/randint domains"
            )
        return self


# --------------------------------------------------------------------------- experiment


class ExperimentSpec(_Strict):
    version: Literal[1] = SPEC_VERSION
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_.\-]+$", max_length=128)
    description: str = ""
    method: MethodSpec
    model: ModelSpec
    dataset: DatasetSpec
    threat_model: ThreatModel = Field(default_factory=ThreatModel)
    optimization: OptimizationSpec = Field(default_factory=OptimizationSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    selection: SelectionSpec = Field(default_factory=SelectionSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    sweep: SweepSpec | None = None
    seed: int = Field(0, ge=0, le=SEED_MAX, description="numpy takes 32-bit seeds: 0..2**32-1")
    output: OutputSpec = Field(default_factory=OutputSpec)

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentSpec:
        name = self.method.name
        if name == "lbgat" and self.model.teacher is None:
            raise ValueError(
                "model.teacher: lbgat trains a teacher (M_natural) jointly; name its architecture"
            )
        if name not in TEACHER_METHODS and self.model.teacher is not None:
            raise ValueError(f"model.teacher: method '{name}' uses no teacher; remove model.teacher")
        if self.sweep is not None:
            if self.sweep.metric.startswith("val_") and self.dataset.val_size == 0:
                raise ValueError(
                    f"sweep.metric: '{self.sweep.metric}' is measured on a held-out split; set dataset.val_size > 0"
                )
            for path in self.sweep.parameters:
                if path.split(".")[0] in {"sweep", "version", "name", "output"}:
                    raise ValueError(f"sweep.parameters: '{path}' cannot be swept")
        selection = self.selection
        if selection.metric is not None and selection.split == "heldout" and self.dataset.val_size == 0:
            raise ValueError(
                "selection.metric: best-checkpoint selection needs a held-out split (dataset.val_size > 0) "
                "or selection.split: test"
            )
        if selection.split == "test":
            if selection.metric is None:
                raise ValueError(
                    "selection.split: 'test' measures selection.metric on the test set; name a metric"
                )
            if self.dataset.val_size:
                raise ValueError(
                    "dataset.val_size: selection.split 'test' selects on the test set, so these held-out "
                    "images would go unused; set val_size to 0 (or select on them with split: heldout)"
                )
        if selection.epoch is not None:
            if selection.metric is not None:
                raise ValueError("selection.epoch: a fixed epoch and a selection.metric exclude each other")
            if selection.epoch > self.optimization.epochs:
                raise ValueError(
                    f"selection.epoch: {selection.epoch} is past the last epoch ({self.optimization.epochs})"
                )
        for role in ("robust", "teacher"):
            ref = getattr(self.model, role)
            if ref is not None and ref.normalize != "none" and self.dataset.name in ("mnist", "digits"):
                raise ValueError(
                    f"model.{role}.normalize: {ref.normalize}'s statistics are for 3-channel images; "
                    f"{self.dataset.name} has one channel"
                )
        if name in AVERAGED_METHODS and self.optimization.weight_averaging is None:
            raise ValueError(
                f"optimization.weight_averaging: method '{name}' regularises towards the averaged model; "
                "set it (the official code: {decay: 0.999, start_epoch: 105})"
            )
        if name in TWO_VIEW_METHODS and not self.dataset.augment:
            raise ValueError(
                f"dataset.augment: method '{name}' compares two random augmentations of each image; "
                "set augment to true"
            )
        if self.optimization.weight_averaging is None:
            for section in ("evaluation", "selection"):
                if getattr(self, section).weights == "averaged":
                    raise ValueError(
                        f"{section}.weights: 'averaged' needs optimization.weight_averaging (e.g. {{decay: 0.999}})"
                    )
        return self

    @model_validator(mode="after")
    def _protocol_resolved(self) -> ExperimentSpec:
        """`evaluation.protocol` names the attacks: pin it to a version and copy its attacks in (a
        stored spec then validates again with the same attacks, and says exactly what ran)."""
        evaluation = self.evaluation
        if evaluation.protocol is None:
            return self
        from api_schemas.protocols import UnknownProtocol, get_protocol

        try:
            protocol = get_protocol(evaluation.protocol)
        except UnknownProtocol as exc:
            raise ValueError(f"evaluation.protocol: {exc}") from None
        if self.dataset.name not in protocol.datasets:
            raise ValueError(
                f"evaluation.protocol: {protocol.key} is defined for {', '.join(protocol.datasets)}, "
                f"not {self.dataset.name}"
            )
        if protocol.norm != self.threat_model.norm:
            raise ValueError(
                f"evaluation.protocol: {protocol.key} attacks in {protocol.norm}; this run trains against "
                f"{self.threat_model.norm}"
            )
        attacks = protocol.suite.resolved_attacks()
        given = "attacks" in evaluation.model_fields_set
        if given and [a.model_dump() for a in evaluation.attacks] != [a.model_dump() for a in attacks]:
            raise ValueError(
                f"evaluation.attacks: protocol {protocol.key} names the attacks; remove `attacks` or `protocol`"
            )
        evaluation.protocol = protocol.key
        evaluation.attacks = attacks
        if evaluation.n_examples is None and protocol.suite.n_examples is not None:
            evaluation.n_examples = protocol.suite.n_examples
        return self

    @model_validator(mode="after")
    def _attack_sizes_fit_norm(self) -> ExperimentSpec:
        """l_2 attacks need l_2 step sizes: the PGD default step (0.003) is an l_inf step."""
        located = [(f"evaluation.attacks[{i}]", a) for i, a in enumerate(self.evaluation.attacks)]
        located.append(("selection.attack", self.selection.attack))
        for where, attack in located:
            if not isinstance(attack, PGDAttackSpec | TransferAttackSpec):
                continue
            norm = attack.norm or self.threat_model.norm
            if norm == "l2" and attack.step_size is not None and "step_size" not in attack.model_fields_set:
                raise ValueError(
                    f"{where}.step_size: the default 0.003 is an l_inf step; give an l_2 step "
                    "(e.g. eps/4) or null for the threat model's step_size"
                )
        return self

    @model_validator(mode="after")
    def _cat_attack_from_variant(self) -> ExperimentSpec:
        if self.method.name == "cat":
            if self.threat_model.loss is not None:
                raise ValueError(
                    "threat_model.loss: CAT's attack follows method.variant ('cent': CE, 'cw': CW_inf); leave it unset"
                )
            if self.threat_model.kappa != 0:
                raise ValueError("threat_model.kappa: CAT-cw's confidence is method.kappa")
        return self

    def evaluated_weights(self) -> Literal["model", "averaged"]:
        """Which weights the final evaluation uses (evaluation.weights, resolved)."""
        return _resolve_weights(self.evaluation.weights, self.optimization.weight_averaging)

    def selected_weights(self) -> Literal["model", "averaged"]:
        """Which weights best-checkpoint selection validates (selection.weights, resolved)."""
        return _resolve_weights(self.selection.weights, self.optimization.weight_averaging)

    def output_dir(self) -> Path:
        return Path(self.output.dir or f"runs/{self.name}")


def _resolve_weights(
    chosen: Literal["model", "averaged"] | None, averaging: WeightAveragingSpec | None
) -> Literal["model", "averaged"]:
    if chosen is not None:
        return chosen
    return "averaged" if averaging is not None else "model"


# --------------------------------------------------------------------------- loading


class SpecError(ValueError):
    """A spec that cannot run; `errors` holds {'loc': 'a.b', 'msg': ...} per problem.

    `too_large` marks a spec refused for its size rather than its content (the API answers 413).
    """

    def __init__(
        self, errors: list[dict[str, str]], source: str = "spec", *, too_large: bool = False
    ) -> None:
        self.errors = errors
        self.source = source
        self.too_large = too_large
        lines = [f"  {e['loc'] or '<root>'}: {e['msg']}" for e in errors]
        super().__init__(f"invalid {source}:\n" + "\n".join(lines))


def _union_tags(union: Any, field: str) -> frozenset[str]:
    """The discriminator values of an Annotated[A | B | ..., Field(discriminator=field)] union
    (every value of each member's Literal: UniformDomain answers to 'uniform' and 'loguniform')."""
    members = get_args(get_args(union)[0])
    return frozenset(tag for cls in members for tag in get_args(cls.model_fields[field].annotation))


# pydantic puts these union tags in error paths; read off the unions, so a new method, attack or
# search domain cannot be forgotten here.
_UNION_TAGS = (
    _union_tags(MethodSpec, "name") | _union_tags(AttackSpec, "kind") | _union_tags(SearchDomain, "kind")
)


def _format_loc(loc: tuple[Any, ...]) -> str:
    # pydantic puts the union tag (e.g. 'lbgat') in the path of discriminated unions; drop it so
    # the path reads like the YAML the user wrote.
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif item in _UNION_TAGS:
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def validation_errors(exc: ValidationError) -> list[dict[str, str]]:
    errors = []
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        # model-level validators name their own field first ("alpha: ..."): fold it into the path
        if ": " in msg and err["type"] == "value_error":
            field, _, rest = msg.partition(": ")
            if field.translate(str.maketrans("", "", "._[]")).isalnum():
                loc = f"{loc}.{field}" if loc else field
                msg = rest
        errors.append({"loc": loc, "msg": msg})
    return errors


def parse_spec(data: dict[str, Any], *, source: str = "spec") -> ExperimentSpec:
    """Validate a plain dict into an ExperimentSpec, raising SpecError with field paths."""
    if not isinstance(data, dict):
        raise SpecError(
            [{"loc": "", "msg": f"expected a mapping at the top level, got {type(data).__name__}"}], source
        )
    try:
        return ExperimentSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(validation_errors(exc), source) from None


def read_spec_file(path: str | Path) -> dict[str, Any]:
    """Read YAML or JSON (chosen by suffix; YAML also parses JSON) into a dict.

    YAML goes through the bounded loader (api_schemas.yaml_safe), like the API's uploads, so a spec
    file that the CLI accepts is one the service accepts too.
    """
    path = Path(path)
    if not path.is_file():
        raise SpecError([{"loc": "", "msg": f"no such spec file: {path}"}], str(path))
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else load_yaml(text)
    except YAMLLimitError as exc:
        raise SpecError([{"loc": exc.path, "msg": exc.problem}], str(path), too_large=exc.too_large) from None
    except (json.JSONDecodeError, RecursionError, yaml.YAMLError) as exc:
        raise SpecError(
            [{"loc": "", "msg": f"not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"}], str(path)
        ) from None
    return data if data is not None else {}


def load_spec(path: str | Path, overrides: list[str] | None = None) -> ExperimentSpec:
    data = read_spec_file(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_spec(data, source=str(path))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.path=value` overrides (value parsed as YAML) to a copy of a spec dict."""
    if not isinstance(data, dict):
        raise SpecError(
            [{"loc": "", "msg": f"expected a mapping at the top level, got {type(data).__name__}"}]
        )
    result = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SpecError(
                [{"loc": key, "msg": f"override '{item}' must look like key.path=value"}], "--set"
            )
        try:
            value = load_yaml(raw) if raw else None
        except YAMLLimitError as exc:
            loc = f"{key}.{exc.path}" if exc.path and not exc.path.startswith("[") else key + exc.path
            raise SpecError([{"loc": loc, "msg": exc.problem}], "--set", too_large=exc.too_large) from None
        except yaml.YAMLError as exc:
            raise SpecError([{"loc": key, "msg": f"not valid YAML: {exc}"}], "--set") from None
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise SpecError([{"loc": key, "msg": f"'{part}' is not a section"}], "--set")
            node = child
        node[parts[-1]] = value
    return result
