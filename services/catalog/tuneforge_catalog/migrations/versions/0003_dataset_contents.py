"""dataset_contents: one row per stored content file, locked by uploads and deletes

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dataset_contents",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    # Content stored before this table existed.
    op.execute(
        "INSERT INTO dataset_contents (sha256, uri, size_bytes, created_at) "
        "SELECT sha256, MIN(uri), MIN(size_bytes), MIN(created_at) FROM datasets GROUP BY sha256"
    )


def downgrade() -> None:
    op.drop_table("dataset_contents")
