"""jobs: an optional validation dataset (its id and the URI the agent stages) evaluated on instead of a held-out share

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Jobs stored before it held out validation_ratio of their dataset (or evaluated on nothing): "" says so.
        batch.add_column(sa.Column("validation_dataset_id", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("validation_dataset_uri", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("validation_dataset_uri")
        batch.drop_column("validation_dataset_id")
