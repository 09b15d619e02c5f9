"""One-shot schema migration of one service's tables, for a migration Job that runs before the services roll.

Usage: python migrate.py catalog|jobs [--rebuild-metric-blocks]. It reads the service's own settings class (so
the same TUNEFORGE_CATALOG_DATABASE_URL / TUNEFORGE_JOBS_DATABASE_URL as the service) and runs the same Alembic
upgrade the service runs at start (tuneforge_common.db.migrate), which is then a no-op.

--rebuild-metric-blocks (jobs) then makes every job's chart rollups again from its points: needed after a jobs
service older than revision 0009 stored points in a migrated database (docs/operations.md).
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


async def run(service: str, rebuild_metric_blocks: bool = False) -> None:
    module_name, settings_class, url_field, version_table = SERVICES[service]
    module = importlib.import_module(module_name)
    url = getattr(getattr(module, settings_class)(), url_field)
    engine = make_engine(url)
    try:
        await migrate(engine, module.MIGRATIONS, version_table)
        print(f"{service}: schema at head", flush=True)
        if rebuild_metric_blocks:
            from tuneforge_jobs.service import rebuild_all_metric_blocks

            def progress(done: int, total: int) -> None:
                if done % 100 == 0 and done < total:
                    print(f"{service}: metric rollups rebuilt for {done}/{total} jobs", flush=True)

            total = await rebuild_all_metric_blocks(engine, progress)
            print(f"{service}: metric rollups rebuilt for {total} jobs", flush=True)
    finally:
        await engine.dispose()


def main(argv: list[str]) -> int:
    rebuild = "--rebuild-metric-blocks" in argv[2:]
    if len(argv) not in (2, 3) or argv[1] not in SERVICES or len(argv) == 3 and not (rebuild and argv[1] == "jobs"):
        print(f"usage: migrate.py {'|'.join(SERVICES)} | migrate.py jobs --rebuild-metric-blocks", file=sys.stderr)
        return 2
    asyncio.run(run(argv[1], rebuild))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
