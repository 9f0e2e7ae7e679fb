"""evaluation jobs: experiments.kind, uploaded checkpoints, evaluation results

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-10 10:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from service.db.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="training", nullable=False)
        )
        batch_op.create_index("ix_experiments_team_kind", ["team_id", "kind", "state"], unique=False)

    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("key", sa.String(length=512), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("model_ref", sa.JSON(), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("num_classes", sa.Integer(), nullable=True),
        sa.Column("in_channels", sa.Integer(), nullable=True),
        sa.Column("dataset", sa.String(length=32), nullable=True),
        sa.Column("norm", sa.String(length=8), nullable=True),
        sa.Column("eps", sa.Float(), nullable=True),
        sa.Column("has_averaged", sa.Boolean(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_checkpoints_owner_id_users")),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name=op.f("fk_checkpoints_team_id_teams")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
        sa.UniqueConstraint("team_id", "sha256", name="uq_checkpoints_team_sha256"),
    )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_checkpoints_sha256"), ["sha256"], unique=False)

    op.create_table(
        "eval_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=False),
        sa.Column("team_id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("source_experiment", sa.String(length=64), nullable=True),
        sa.Column("weights", sa.String(length=16), nullable=False),
        sa.Column("checkpoint_sha256", sa.String(length=64), nullable=True),
        sa.Column("protocol_id", sa.String(length=64), nullable=False),
        sa.Column("protocol_version", sa.String(length=32), nullable=False),
        sa.Column("dataset", sa.String(length=32), nullable=False),
        sa.Column("norm", sa.String(length=8), nullable=False),
        sa.Column("eps", sa.Float(), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=True),
        sa.Column("method", sa.String(length=32), nullable=True),
        sa.Column("n_examples", sa.Integer(), nullable=False),
        sa.Column("n_total", sa.Integer(), nullable=True),
        sa.Column("partial", sa.Boolean(), nullable=False),
        sa.Column("test_selected", sa.Boolean(), nullable=False),
        sa.Column("precision", sa.String(length=8), nullable=True),
        sa.Column("clean_accuracy", sa.Float(), nullable=False),
        sa.Column("robust_accuracy", sa.Float(), nullable=False),
        sa.Column("autoattack_accuracy", sa.Float(), nullable=True),
        sa.Column("nrr", sa.Float(), nullable=True),
        sa.Column("attacks", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("transfer_source", sa.String(length=256), nullable=True),
        sa.Column("finished_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["experiments.id"],
            name=op.f("fk_eval_results_job_id_experiments"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(["owner_id"], ["users.id"], name=op.f("fk_eval_results_owner_id_users")),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], name=op.f("fk_eval_results_team_id_teams")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_eval_results")),
        sa.UniqueConstraint("job_id", "weights", name="uq_eval_results_job_weights"),
    )
    with op.batch_alter_table("eval_results", schema=None) as batch_op:
        batch_op.create_index(
            "ix_eval_results_board", ["protocol_id", "protocol_version", "team_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_eval_results_job_id"), ["job_id"], unique=False)
        batch_op.create_index(
            "ix_eval_results_team_checkpoint", ["team_id", "checkpoint_sha256"], unique=False
        )
        batch_op.create_index("ix_eval_results_team_source", ["team_id", "source_experiment"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("eval_results", schema=None) as batch_op:
        batch_op.drop_index("ix_eval_results_team_source")
        batch_op.drop_index("ix_eval_results_team_checkpoint")
        batch_op.drop_index(batch_op.f("ix_eval_results_job_id"))
        batch_op.drop_index("ix_eval_results_board")

    op.drop_table("eval_results")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_checkpoints_sha256"))

    op.drop_table("checkpoints")
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.drop_index("ix_experiments_team_kind")
        batch_op.drop_column("kind")
