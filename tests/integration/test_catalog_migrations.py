"""Catalog migrations over rows made before them, on both engines: nothing a user stored is lost or renamed."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from tuneforge_catalog.main import MIGRATIONS
from tuneforge_common.db import make_engine, migrate

VERSION_TABLE = "alembic_version_catalog"
METHOD_COLUMNS = (
    "id, display_name, description, training_type, lifecycle, parameters, entrypoint, builtin, created_at, "
    "stages, project_id"
)


async def test_methods_keep_their_names_per_project_across_the_0005_upgrade_and_back(database_url):
    engine = make_engine(database_url)
    await migrate(engine, MIGRATIONS, VERSION_TABLE, revision="0004")
    async with engine.begin() as conn:
        for method_id, builtin, project in (("sft-lora", True, None), ("house-sft", False, "default")):
            await conn.execute(
                text(
                    f"INSERT INTO methods ({METHOD_COLUMNS}) VALUES (:id, :id, '', 'chat', 'customized', '[]', "
                    "'train.py', :builtin, CURRENT_TIMESTAMP, '{}', :project)"
                ),
                {"id": method_id, "builtin": builtin, "project": project},
            )
    await migrate(engine, MIGRATIONS, VERSION_TABLE)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT id, name, project_id FROM methods ORDER BY name"))).all()
    assert [tuple(r) for r in rows] == [("default/house-sft", "house-sft", "default"), ("sft-lora", "sft-lora", None)]

    def downgrade(sync_conn):
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        cfg.attributes["connection"] = sync_conn
        cfg.attributes["version_table"] = VERSION_TABLE
        command.downgrade(cfg, "0004")

    async with engine.begin() as conn:
        await conn.run_sync(downgrade)
    async with engine.connect() as conn:
        ids = (await conn.execute(text("SELECT id FROM methods ORDER BY id"))).scalars().all()
    await engine.dispose()
    assert ids == ["house-sft", "sft-lora"]
