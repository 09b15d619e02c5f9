"""projects, API keys and roles; a project_id on models, datasets and methods (NULL: built in, shared)

Rows made before projects existed go to the "default" project, except built-ins, which every project sees.
Model names become unique per project instead of across the whole catalog.

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
    op.create_table(
        "projects",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("superuser", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "key_roles",
        sa.Column("key_id", sa.String(32), sa.ForeignKey("api_keys.id"), primary_key=True),
        sa.Column("project_id", sa.String(64), sa.ForeignKey("projects.id"), primary_key=True),
        sa.Column("role", sa.Integer(), nullable=False),
    )
    for table in ("models", "datasets", "methods"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("project_id", sa.String(64), nullable=True))
            batch.create_index(f"ix_{table}_project_id", ["project_id"])
    op.execute("INSERT INTO projects (id, name, created_at) VALUES ('default', 'default', CURRENT_TIMESTAMP)")
    op.execute("UPDATE models SET project_id = 'default' WHERE NOT builtin")
    op.execute("UPDATE methods SET project_id = 'default' WHERE NOT builtin")
    op.execute("UPDATE datasets SET project_id = 'default'")
    if op.get_bind().dialect.name == "sqlite":
        # SQLite's unique constraint has no name; the convention names it so batch mode can drop it.
        with op.batch_alter_table("models", naming_convention={"uq": "uq_%(table_name)s_%(column_0_name)s"}) as batch:
            batch.drop_constraint("uq_models_name", type_="unique")
    else:
        op.drop_constraint("models_name_key", "models", type_="unique")
    op.create_index("ux_models_project_name", "models", ["project_id", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_models_project_name", "models")
    for table in ("models", "datasets", "methods"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_project_id")
            batch.drop_column("project_id")
    op.drop_table("key_roles")
    op.drop_table("api_keys")
    op.drop_table("projects")
