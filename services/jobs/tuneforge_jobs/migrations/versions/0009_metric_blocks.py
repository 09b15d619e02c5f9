"""metric_blocks: rollups of metric_points by blocks of 16 steps (count, min, max, last point), so that a chart of
a job of a million points aggregates blocks instead of every point; filled from the points already stored

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

BLOCK_STEPS = 16  # series.BLOCK_STEPS when this revision was written

# The points that stand (a resumed attempt supersedes earlier attempts' points past its starting step), by block;
# the last value is the one of the latest attempt, then the latest stored, at the block's highest step.
BACKFILL = f"""
INSERT INTO metric_blocks (job_id, name, block, n, low, high, last_step, last_value)
SELECT g.job_id, g.name, g.block, g.n, g.low, g.high, g.last_step,
       (SELECT p.value FROM metric_points p
         WHERE p.job_id = g.job_id AND p.name = g.name AND p.step = g.last_step
         ORDER BY p.attempt DESC, p.id DESC LIMIT 1)
FROM (
    SELECT mp.job_id, mp.name, mp.step / {BLOCK_STEPS} AS block, count(*) AS n, min(mp.value) AS low,
           max(mp.value) AS high, max(mp.step) AS last_step
    FROM metric_points mp JOIN jobs j ON j.id = mp.job_id
    WHERE mp.step >= 0 AND (j.attempt <= 1 OR mp.attempt = j.attempt OR mp.step <= j.resumed_from_step)
    GROUP BY mp.job_id, mp.name, mp.step / {BLOCK_STEPS}
) g
"""


def upgrade() -> None:
    op.create_table(
        "metric_blocks",
        sa.Column("job_id", sa.String(64), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("block", sa.BigInteger(), primary_key=True),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("low", sa.Float(), nullable=False),
        sa.Column("high", sa.Float(), nullable=False),
        sa.Column("last_step", sa.BigInteger(), nullable=False),
        sa.Column("last_value", sa.Float(), nullable=False),
    )
    op.execute(BACKFILL)


def downgrade() -> None:
    op.drop_table("metric_blocks")
