"""Evaluation protocols: named, versioned evaluation suites, so that two robust accuracies compare.

A protocol fixes everything a published number depends on: the threat model, the attacks with every
parameter, the split and how many of its examples, the seed, and how the examples are cut into
shards. Every result carries the protocol's id and version; the leaderboard ranks rows of one
protocol at a time. A protocol never changes once shipped: a change is a new version, and a new
version that only appends attacks lets an evaluation of the older one be strengthened (the new
attacks run on the examples still robust, as AutoAttack does) instead of recomputed.

Users may also give an explicit suite (`EvaluationSuite`); its results carry the id `custom` and a
version that is a hash of the suite, so rows of different custom suites never rank together.

Sources of the shipped protocols:
- robustbench-linf / -l2: RobustBench (Croce et al., 2021): AutoAttack standard on the full test
  set, eps 8/255 (l_inf) or 0.5 (l_2); robustbench/eval.py.
- lbgat: the LBGAT paper, Sec. 4 and Table 3 (dvlab-research/LBGAT): FGSM, PGD-20 (CE) and CW-20
  at eps 0.031 with step 0.003 from a uniform start, AutoAttack standard.
- cat: the CAT paper, Sec. 5 (Codes/attack_test.py): FGSM, PGD-20 and PGD-100 without random start
  (step 0.003), CW_inf (30 steps, kappa 50), Square with 5000 queries, eps 8/255.
- raat: the RAAT paper, App. D.1: PGD-10, PGD-100 (step 2/255, uniform start), C&W (PGD-30 on the CW
  margin), AutoAttack standard, eps 8/255.
- digits: the CPU demo's suite on scikit-learn's digits (eps 0.1).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api_schemas.spec import (
    MAX_BATCH,
    MAX_EXAMPLES,
    MAX_LIST,
    SEED_MAX,
    AttackSpec,
    AutoAttackSpec,
    DatasetName,
    EvaluationSpec,
    PGDAttackSpec,
    SquareAttackSpec,
    ThreatModel,
    TransferAttackSpec,
)

#: Protocol ids: lower-case words joined by '-' (they appear in URLs, file names and tables).
PROTOCOL_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,63}$"
CUSTOM_ID = "custom"
#: Every example of a split is in exactly one shard: ids are 0..ceil(n/shard_size)-1.
MAX_SHARD_SIZE = 100_000
#: the test-set sizes a protocol's "whole test set" means (digits: the bundled demo's 25 % split)
TEST_SET_SIZES: dict[str, int] = {
    "cifar10": 10_000,
    "cifar100": 10_000,
    "tiny_imagenet": 10_000,
    "mnist": 10_000,
    "digits": 450,
}
#: classes per dataset, for checking that a checkpoint fits the data it is evaluated on
NUM_CLASSES: dict[str, int] = {
    "cifar10": 10,
    "cifar100": 100,
    "tiny_imagenet": 200,
    "mnist": 10,
    "digits": 10,
    "synthetic": 10,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EvaluationSuite(_Strict):
    """What an evaluation runs: attacks (in order), threat model, split, examples, seed, shards.

    Attacks with `eps`/`norm`/`step_size` unset take the suite's threat model's. Records keep the
    attacks' order: the first attack that breaks an example is what its record names.
    """

    threat_model: ThreatModel
    attacks: list[AttackSpec] = Field(min_length=1, max_length=MAX_LIST)
    split: Literal["test"] = Field("test", description="the split evaluated (the papers': the test set)")
    n_examples: int | None = Field(
        None, ge=1, le=MAX_EXAMPLES, description="the first n examples of the split; None: all of it"
    )
    seed: int = Field(0, ge=0, le=SEED_MAX, description="seeds random starts, shard by shard")
    batch_size: int = Field(500, ge=1, le=MAX_BATCH)
    shard_size: int = Field(
        500,
        ge=1,
        le=MAX_SHARD_SIZE,
        description="examples per shard: fixed, whatever the number of workers, so that sharding "
        "never changes a number; a shard is the unit of resumption",
    )

    @model_validator(mode="after")
    def _unique_labels(self) -> EvaluationSuite:
        labels = [attack.label() for attack in self.attacks]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(f"attacks: labels must be unique, set `name` to tell apart {duplicates}")
        for i, attack in enumerate(self.attacks):
            if isinstance(attack, AutoAttackSpec | SquareAttackSpec) and attack.n_examples is not None:
                raise ValueError(
                    f"attacks[{i}].n_examples: an evaluation suite attacks every example it evaluates; "
                    "set the suite's n_examples instead"
                )
            if isinstance(attack, PGDAttackSpec | TransferAttackSpec):
                norm = attack.norm or self.threat_model.norm
                if (
                    norm == "l2"
                    and attack.step_size is not None
                    and "step_size" not in attack.model_fields_set
                ):
                    raise ValueError(
                        f"attacks[{i}].step_size: the default 0.003 is an l_inf step; give an l_2 step"
                    )
        return self

    def resolved_attacks(self) -> list[AttackSpec]:
        """The attacks with eps and norm (and PGD's step size, where unset) taken from the threat
        model, so that each attack's record says exactly what ran."""
        threat = self.threat_model
        out: list[AttackSpec] = []
        for attack in self.attacks:
            update: dict[str, Any] = {}
            if getattr(attack, "eps", None) is None:
                update["eps"] = threat.eps
            if getattr(attack, "norm", None) is None:
                update["norm"] = threat.norm
            if isinstance(attack, PGDAttackSpec | TransferAttackSpec):
                if attack.step_size is None:
                    update["step_size"] = threat.step_size
                if attack.l2_variant is None:
                    update["l2_variant"] = threat.l2_variant
            out.append(attack.model_copy(update=update) if update else attack)
        return out

    def attack_dicts(self) -> list[dict[str, Any]]:
        """The resolved attacks as plain data: what identifies them across evaluations."""
        return [a.model_dump(mode="json") for a in self.resolved_attacks()]

    def digest(self) -> str:
        """A stable hash of what the numbers depend on (not batch size, which changes no result)."""
        data = self.model_dump(mode="json", exclude={"batch_size"})
        data["attacks"] = self.attack_dicts()
        return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def n_shards(self, n_examples: int) -> int:
        return max(1, math.ceil(n_examples / self.shard_size))

    def as_training_evaluation(self) -> EvaluationSpec:
        """The suite as a training spec's `evaluation` section (training's final evaluation runs
        the same code on the same attacks)."""
        return EvaluationSpec(
            attacks=self.resolved_attacks(), n_examples=self.n_examples, batch_size=self.batch_size
        )


class Protocol(_Strict):
    """A named, versioned EvaluationSuite, with where its settings come from."""

    id: str = Field(pattern=PROTOCOL_ID_PATTERN)
    version: int = Field(ge=1, le=10_000)
    title: str
    source: str = Field(description="the paper / code whose evaluation this reproduces")
    datasets: list[DatasetName] = Field(description="datasets it is defined for")
    suite: EvaluationSuite
    notes: str = ""

    @property
    def key(self) -> str:
        return f"{self.id}@{self.version}"

    @property
    def norm(self) -> str:
        return self.suite.threat_model.norm

    @property
    def eps(self) -> float:
        return self.suite.threat_model.eps

    def full_size(self, dataset: str) -> int | None:
        """How many examples the protocol's full set has on `dataset` (None: not known here)."""
        total = TEST_SET_SIZES.get(dataset)
        if total is None:
            return None
        return min(total, self.suite.n_examples) if self.suite.n_examples else total


def custom_protocol_version(suite: EvaluationSuite) -> str:
    """The version of an explicit suite's results: the first 12 hex digits of its digest."""
    return suite.digest()[:12]


# ------------------------------------------------------------------------------------------ registry

_LINF_8 = {"norm": "linf", "eps": 8 / 255, "step_size": 2 / 255, "steps": 10}


def _p(**data: Any) -> Protocol:
    return Protocol.model_validate(data)


def _builtin() -> list[Protocol]:
    return [
        _p(
            id="robustbench-linf",
            version=1,
            title="RobustBench l_inf: AutoAttack standard at eps 8/255 on the full test set",
            source="Croce et al., RobustBench (2021); robustbench/eval.py benchmark(): AutoAttack "
            "version 'standard', 10,000 CIFAR test images",
            datasets=["cifar10", "cifar100"],
            suite={
                "threat_model": _LINF_8,
                "attacks": [{"kind": "autoattack", "version": "standard"}],
                "batch_size": 500,
                "shard_size": 500,
            },
        ),
        _p(
            id="robustbench-l2",
            version=1,
            title="RobustBench l_2: AutoAttack standard at eps 0.5 on the full test set",
            source="Croce et al., RobustBench (2021); robustbench/eval.py benchmark() with "
            "ThreatModel.L2 (eps 0.5)",
            datasets=["cifar10"],
            suite={
                "threat_model": {"norm": "l2", "eps": 0.5, "step_size": 0.125, "steps": 10},
                "attacks": [{"kind": "autoattack", "version": "standard"}],
                "batch_size": 500,
                "shard_size": 500,
            },
        ),
        _p(
            id="lbgat",
            version=1,
            title="LBGAT paper: FGSM, PGD-20, CW-20 (step 0.003) and AutoAttack at eps 0.031",
            source="Cui et al., LBGAT (ICCV 2021), Sec. 4 and Table 3; dvlab-research/LBGAT "
            "(pgd_attack_cifar10.py-style white-box evaluation, sh/eval_autoattack.sh)",
            datasets=["cifar10", "cifar100", "tiny_imagenet"],
            suite={
                "threat_model": {"norm": "linf", "eps": 0.031, "step_size": 0.003, "steps": 20},
                "attacks": [
                    {"kind": "fgsm"},
                    {"kind": "pgd", "steps": 20, "step_size": 0.003, "loss": "ce"},
                    {"kind": "pgd", "steps": 20, "step_size": 0.003, "loss": "cw"},
                    {"kind": "autoattack", "version": "standard"},
                ],
                "batch_size": 500,
                "shard_size": 500,
            },
        ),
        _p(
            id="cat",
            version=1,
            title="CAT paper: FGSM, PGD-20/100 (no random start), CW_inf (kappa 50), Square 5000",
            source="Huang et al., Calibrated Adversarial Training (2021), Sec. 5, Tables 2 and 4; "
            "TienjinHuang/Calibrated-adversarial-training Codes/attack_test.py",
            datasets=["cifar10", "cifar100"],
            suite={
                "threat_model": {"norm": "linf", "eps": 8 / 255, "step_size": 0.003, "steps": 20},
                "attacks": [
                    {"kind": "fgsm"},
                    {"kind": "pgd", "steps": 20, "step_size": 0.003, "random_start": "none"},
                    {"kind": "pgd", "steps": 100, "step_size": 0.003, "random_start": "none"},
                    {"kind": "pgd", "loss": "cw", "kappa": 50, "steps": 30, "step_size": 0.003},
                    {"kind": "square", "n_queries": 5000},
                ],
                "batch_size": 500,
                "shard_size": 500,
            },
        ),
        _p(
            id="raat",
            version=1,
            title="RAAT paper: PGD-10, PGD-100, C&W and AutoAttack at eps 8/255",
            source="Wang et al., Robust Alignment (2026), App. D.1; FlaAI/RAAT",
            datasets=["cifar10", "cifar100", "tiny_imagenet"],
            suite={
                "threat_model": _LINF_8,
                "attacks": [
                    {"kind": "pgd", "steps": 10, "step_size": 2 / 255},
                    {"kind": "pgd", "steps": 100, "step_size": 2 / 255},
                    {"kind": "pgd", "steps": 30, "step_size": 2 / 255, "loss": "cw"},
                    {"kind": "autoattack", "version": "standard"},
                ],
                "batch_size": 500,
                "shard_size": 500,
            },
        ),
        _p(
            id="digits",
            version=1,
            title="CPU demo: FGSM, PGD-20, CW-20 and AutoAttack (APGD-CE, APGD-T) at eps 0.1 on digits",
            source="this project's digits preset (scikit-learn's 8x8 digits, 25 % test split)",
            datasets=["digits"],
            suite={
                "threat_model": {"norm": "linf", "eps": 0.1, "step_size": 0.01, "steps": 20},
                "attacks": [
                    {"kind": "fgsm"},
                    {"kind": "pgd", "steps": 20, "step_size": 0.01, "loss": "ce"},
                    {"kind": "pgd", "steps": 20, "step_size": 0.01, "loss": "cw"},
                    {"kind": "autoattack", "version": "custom", "attacks": ["apgd-ce", "apgd-t"]},
                ],
                "batch_size": 500,
                "shard_size": 250,
            },
        ),
    ]


PROTOCOLS: dict[tuple[str, int], Protocol] = {(p.id, p.version): p for p in _builtin()}

#: the leaderboard's protocol when only a dataset is named
DEFAULT_PROTOCOL: dict[str, str] = {
    "cifar10": "robustbench-linf",
    "cifar100": "robustbench-linf",
    "tiny_imagenet": "lbgat",
    "digits": "digits",
}


class UnknownProtocol(ValueError):
    pass


def parse_protocol_ref(ref: str) -> tuple[str, int | None]:
    """'lbgat' -> ('lbgat', None: the latest); 'lbgat@1' -> ('lbgat', 1)."""
    name, _, version = ref.partition("@")
    if not version:
        return name, None
    if not version.isdigit() or len(version) > 5:
        raise UnknownProtocol(f"protocol {ref!r}: the version after '@' is a number, e.g. 'lbgat@1'")
    return name, int(version)


def get_protocol(ref: str) -> Protocol:
    """The protocol `ref` names ('id' for the latest version, or 'id@version')."""
    name, version = parse_protocol_ref(ref)
    versions = sorted(v for (pid, v) in PROTOCOLS if pid == name)
    if not versions:
        known = ", ".join(sorted({pid for pid, _ in PROTOCOLS}))
        raise UnknownProtocol(f"unknown protocol {name!r}; known: {known}")
    if version is None:
        version = versions[-1]
    if (name, version) not in PROTOCOLS:
        raise UnknownProtocol(f"protocol {name!r} has no version {version}; it has {versions}")
    return PROTOCOLS[(name, version)]


def list_protocols() -> list[Protocol]:
    return sorted(PROTOCOLS.values(), key=lambda p: (p.id, p.version))


def extends(older: EvaluationSuite, newer: EvaluationSuite) -> bool:
    """Whether `newer` is `older` with attacks appended: same threat model, split, examples, seed
    and shards, and `older`'s attacks as a prefix of `newer`'s (every parameter equal). Then an
    evaluation under `older` can be strengthened into one under `newer`."""
    a, b = older.model_dump(mode="json"), newer.model_dump(mode="json")
    for key in ("threat_model", "split", "n_examples", "seed", "shard_size"):
        if a[key] != b[key]:
            return False
    old_attacks, new_attacks = older.attack_dicts(), newer.attack_dicts()
    return len(new_attacks) > len(old_attacks) and new_attacks[: len(old_attacks)] == old_attacks
