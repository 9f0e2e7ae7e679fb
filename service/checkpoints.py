"""Uploaded checkpoints: checked without torch, stored once by content, owned by the uploader's team.

The file goes to `checkpoints/<sha256>.pt` in the artifact store (written once, whichever team sends
it first); each team that uploads it gets its own row, so a team reaches only the checkpoints it
uploaded itself. What the inspection read (service.checkpoint_inspect) is kept on the row: the
evaluation request is checked against it (classes, channels, norm) without opening the file again.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from api_schemas.evaluations import CheckpointOut
from api_schemas.protocols import NUM_CLASSES
from service.checkpoint_inspect import CheckpointInfo
from service.db.models import Checkpoint, User, utcnow
from service.evaluations import IN_CHANNELS, Invalid

PREFIX = "checkpoints/"


def checkpoint_key(sha256: str) -> str:
    return f"{PREFIX}{sha256}.pt"


@dataclass(frozen=True)
class Described:
    """What a checked upload is: the row's descriptive columns."""

    format: str
    model: str
    model_ref: dict | None
    method: str | None
    num_classes: int
    in_channels: int | None
    dataset: str
    norm: str | None
    eps: float | None
    has_averaged: bool


def describe(info: CheckpointInfo, *, model: str | None, dataset: str | None) -> Described:
    """Check an inspected upload against what the request names (`model`, `dataset`: required for a
    plain state dict, which does not say what it is) and the dataset's classes and channels."""
    if info.format == "checkpoint":
        if dataset is not None and dataset != info.dataset:
            raise Invalid(
                ("query", "dataset"),
                f"the checkpoint was trained on {info.dataset}; drop dataset or name that",
            )
        if model is not None and model != info.model:
            raise Invalid(("query", "model"), f"the checkpoint is a {info.model}; drop model or name that")
        model, dataset = info.model, info.dataset
    else:
        if model is None:
            raise Invalid(
                ("query", "model"), "a plain state dict does not say its architecture: name it (?model=...)"
            )
        if dataset is None:
            raise Invalid(
                ("query", "dataset"), "a plain state dict does not say its dataset: name it (?dataset=...)"
            )
    assert model is not None and dataset is not None
    classes = NUM_CLASSES.get(dataset)
    outputs = info.num_classes if info.num_classes is not None else info.output_dim
    if outputs is None:
        raise Invalid(("body",), "no classifier layer found (no 2-D weight): not a classifier's state dict")
    if classes is not None and outputs != classes:
        layer = f" ({info.classifier})" if info.classifier else ""
        raise Invalid(
            ("body",), f"the classifier{layer} has {outputs} outputs; {dataset} has {classes} classes"
        )
    channels = IN_CHANNELS.get(dataset)
    if info.in_channels is not None and channels is not None and info.in_channels != channels:
        raise Invalid(
            ("body",), f"the model takes {info.in_channels}-channel images; {dataset} has {channels} channels"
        )
    return Described(
        format=info.format,
        model=model,
        model_ref=info.model_ref if info.format == "checkpoint" else {"name": model},
        method=info.method,
        num_classes=outputs,
        in_channels=info.in_channels,
        dataset=dataset,
        norm=info.norm,
        eps=info.eps,
        has_averaged=info.has_averaged,
    )


def find(session: Session, *, team_id: int, sha256: str) -> Checkpoint | None:
    return session.scalar(
        select(Checkpoint).where(Checkpoint.team_id == team_id, Checkpoint.sha256 == sha256)
    )


def record(
    session: Session, *, owner: User, sha256: str, size: int, described: Described, name: str | None
) -> tuple[Checkpoint, bool]:
    """The team's row for the file (created=False when the team had uploaded it already)."""
    existing = find(session, team_id=owner.team_id, sha256=sha256)
    if existing is not None:
        return existing, False
    row = Checkpoint(
        sha256=sha256,
        team_id=owner.team_id,
        owner_id=owner.id,
        size=size,
        key=checkpoint_key(sha256),
        format=described.format,
        model=described.model,
        model_ref=described.model_ref,
        method=described.method,
        num_classes=described.num_classes,
        in_channels=described.in_channels,
        dataset=described.dataset,
        norm=described.norm,
        eps=described.eps,
        has_averaged=described.has_averaged,
        name=name,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, True


def to_out(row: Checkpoint, *, stored: bool) -> CheckpointOut:
    return CheckpointOut(
        sha256=row.sha256,
        size=row.size,
        model=row.model,
        num_classes=row.num_classes,
        dataset=row.dataset,
        norm=row.norm,
        eps=row.eps,
        name=row.name,
        created_at=row.created_at,
        created=stored,
    )


def list_checkpoints(session: Session, *, viewer: User, limit: int) -> list[Checkpoint]:
    query = select(Checkpoint)
    if not viewer.is_admin:
        query = query.where(Checkpoint.team_id == viewer.team_id)
    return list(
        session.scalars(query.order_by(Checkpoint.created_at.desc(), Checkpoint.id.desc()).limit(limit))
    )
