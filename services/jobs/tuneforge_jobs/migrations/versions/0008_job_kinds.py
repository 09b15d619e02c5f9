"""jobs: a kind (train, merge, evaluate, serve) and what the lifecycle steps after training keep

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Every job stored before was a training.
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="train"))
        batch.add_column(sa.Column("adapter_uri", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("operation", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("result_model_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("request_count", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("error_count", sa.BigInteger(), nullable=False, server_default="0"))
        batch.create_index("ix_jobs_kind_model_state", ["kind", "model_id", "state"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_kind_model_state")
        for column in ("error_count", "request_count", "result_model_id", "operation", "adapter_uri", "kind"):
            batch.drop_column(column)
