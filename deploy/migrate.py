"""One-shot schema migration of one service's tables, for a migration Job that runs before the services roll.

Usage: python migrate.py catalog|jobs. It reads the service's own settings class (so the same
TUNEFORGE_CATALOG_DATABASE_URL / TUNEFORGE_JOBS_DATABASE_URL as the service) and runs the same Alembic
upgrade the service runs at start (tuneforge_common.db.migrate), which is then a no-op.
"""

from __future__ import annotations

import asyncio
import importlib
import sys

from tuneforge_common.db import make_engine, migrate

# service -> (module with Settings and MIGRATIONS, settings class, database URL field, Alembic version table)
SERVICES = {
    "catalog": ("tuneforge_catalog.main", "CatalogSettings", "catalog_database_url", "alembic_version_catalog"),
    "jobs": ("tuneforge_jobs.main", "JobsSettings", "jobs_database_url", "alembic_version_jobs"),
}


async def run(service: str) -> None:
    module_name, settings_class, url_field, version_table = SERVICES[service]
    module = importlib.import_module(module_name)
    url = getattr(getattr(module, settings_class)(), url_field)
    engine = make_engine(url)
    try:
        await migrate(engine, module.MIGRATIONS, version_table)
    finally:
        await engine.dispose()
    print(f"{service}: schema at head", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in SERVICES:
        print(f"usage: migrate.py {'|'.join(SERVICES)}", file=sys.stderr)
        return 2
    asyncio.run(run(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
