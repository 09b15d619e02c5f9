"""method names unique per project: `name` is what callers use, `id` becomes an internal key

An added method's id was its name, so a second project could not add a method of the same name, and the
refusal told it that the name existed elsewhere. Now `id` is "<project>/<name>" for added methods (built-ins
keep their bare name) and (project_id, name) is unique.

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
    with op.batch_alter_table("methods") as batch:
        batch.add_column(sa.Column("name", sa.String(64), nullable=True))
        batch.alter_column("id", type_=sa.String(160), existing_nullable=False)
    op.execute("UPDATE methods SET name = id")
    op.execute("UPDATE methods SET id = project_id || '/' || name WHERE project_id IS NOT NULL")
    with op.batch_alter_table("methods") as batch:
        batch.alter_column("name", existing_type=sa.String(64), nullable=False)
    op.create_index("ux_methods_project_name", "methods", ["project_id", "name"], unique=True)


def downgrade() -> None:
    op.drop_index("ux_methods_project_name", "methods")
    op.execute("UPDATE methods SET id = name")
    with op.batch_alter_table("methods") as batch:
        batch.drop_column("name")
        batch.alter_column("id", type_=sa.String(64), existing_nullable=False)
