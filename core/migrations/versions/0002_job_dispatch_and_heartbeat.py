"""jobs.dispatch, jobs.heartbeat_at and jobs.queue: for the sweeper that re-sends lost messages and requeues
the jobs of dead workers, each sweeper its own queue's (jobs older than this column were sent to `nad`, the
default queue)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatch", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("queue", sa.String(255), nullable=False, server_default="nad"))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
        batch.drop_column("heartbeat_at")
        batch.drop_column("dispatch")
