"""metric_points: an index on (job_id, recorded_at), to walk a job's steps newest first (its fine-tuning events)
without reading all its points

Revision ID: 0007
Revises: 0006
"""

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_metric_points_job_recorded_at", "metric_points", ["job_id", "recorded_at"])


def downgrade() -> None:
    op.drop_index("ix_metric_points_job_recorded_at", table_name="metric_points")
