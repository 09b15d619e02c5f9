"""models: tags, license, size, kind, lineage; datasets: status and validation report; methods: stages

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
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("tags", sa.Text(), nullable=False, server_default="[]"))
        batch.add_column(sa.Column("license", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("size_bytes", sa.BigInteger(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="BASE"))
        batch.add_column(sa.Column("lineage", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("source", sa.Text(), nullable=False, server_default=""))
        batch.add_column(sa.Column("base_model_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_index("ix_models_base_model_id", ["base_model_id"])
    with op.batch_alter_table("datasets") as batch:
        # Datasets stored before validation reports existed had passed the strict upload check.
        batch.add_column(sa.Column("status", sa.String(16), nullable=False, server_default="READY"))
        batch.add_column(sa.Column("validation", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("prompt_input_column", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("prompt_output_column", sa.String(255), nullable=False, server_default=""))
        batch.add_column(sa.Column("parent_dataset_id", sa.String(64), nullable=True))
    with op.batch_alter_table("methods") as batch:
        batch.add_column(sa.Column("stages", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("methods") as batch:
        batch.drop_column("deleted_at")
        batch.drop_column("stages")
    with op.batch_alter_table("datasets") as batch:
        for name in ("parent_dataset_id", "prompt_output_column", "prompt_input_column", "validation", "status"):
            batch.drop_column(name)
    with op.batch_alter_table("models") as batch:
        batch.drop_index("ix_models_base_model_id")
        for name in ("updated_at", "base_model_id", "source", "lineage", "kind", "size_bytes", "license", "tags"):
            batch.drop_column(name)
