"""jobs.project_id (jobs stored before projects go to "default"); agent credentials and agents.credential_id

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("project_id", sa.String(64), nullable=True))
        batch.create_index("ix_jobs_project_id", ["project_id"])
    op.execute("UPDATE jobs SET project_id = 'default'")
    with op.batch_alter_table("agents") as batch:
        batch.add_column(sa.Column("credential_id", sa.String(32), nullable=True))
    op.create_table(
        "agent_credentials",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("agent_credentials")
    with op.batch_alter_table("agents") as batch:
        batch.drop_column("credential_id")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_project_id")
        batch.drop_column("project_id")
