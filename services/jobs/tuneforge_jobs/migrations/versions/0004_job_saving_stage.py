"""jobs: an added method's saving stage, the file and environment the agent runs after the training

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        # Jobs stored before it had no saving stage run by the agent: "" says the same.
        batch.add_column(sa.Column("saving_entrypoint", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("saving_python_env", sa.Text(), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("saving_python_env")
        batch.drop_column("saving_entrypoint")
