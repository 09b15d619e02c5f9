from alembic import context

from tuneforge_catalog.store import metadata
from tuneforge_common.db import run_alembic_env

run_alembic_env(context, metadata)
