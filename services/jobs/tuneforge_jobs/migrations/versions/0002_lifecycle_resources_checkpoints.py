"""jobs: submitter, labels, resource request, versions, progress, pause, copy lineage; checkpoints

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("submitted_by", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("labels", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("resources", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("method_version", sa.String(64), nullable=False, server_default=""))
        batch.add_column(sa.Column("catalog_version", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("epoch", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("tokens_seen", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("run_seconds", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("attempt_started_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("copied_from_job_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("resumed_from_step", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.create_table(
        "checkpoints",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("step", sa.BigInteger(), primary_key=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("metrics", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("checkpoints")
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "pause_requested",
            "resumed_from_step",
            "copied_from_job_id",
            "attempt_started_at",
            "run_seconds",
            "tokens_seen",
            "epoch",
            "catalog_version",
            "method_version",
            "resources",
            "labels",
            "submitted_by",
        ):
            batch.drop_column(column)
