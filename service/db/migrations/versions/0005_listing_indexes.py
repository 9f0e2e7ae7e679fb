"""experiments: indexes in the listing's order, so that a page of a long queue is read in key order

`GET /v1/experiments?state=queued&limit=50` ordered every queued row (created_at desc, id desc) in a
temporary B-tree: with 100,000 queued jobs, seconds for 50 rows. Each listing filter an API caller
uses by default (a state; the viewer's team, with or without a state) now has an index that ends in
(created_at, id). ix_experiments_team_created replaces ix_experiments_team_id (its first column).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 11:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.create_index("ix_experiments_state_created", ["state", "created_at", "id"], unique=False)
        batch_op.create_index("ix_experiments_team_created", ["team_id", "created_at", "id"], unique=False)
        batch_op.create_index(
            "ix_experiments_team_state_created", ["team_id", "state", "created_at", "id"], unique=False
        )
        batch_op.drop_index(batch_op.f("ix_experiments_team_id"))


def downgrade() -> None:
    with op.batch_alter_table("experiments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_experiments_team_id"), ["team_id"], unique=False)
        batch_op.drop_index("ix_experiments_team_state_created")
        batch_op.drop_index("ix_experiments_team_created")
        batch_op.drop_index("ix_experiments_state_created")
