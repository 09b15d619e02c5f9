from alembic import context

from tuneforge_common.db import run_alembic_env
from tuneforge_jobs.store import metadata

run_alembic_env(context, metadata)
