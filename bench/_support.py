"""Shared by the benchmarks (run as scripts, so this directory is on sys.path)."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from tuneforge_common.db import fresh_postgres_databases, make_engine, migrate
from tuneforge_jobs.main import MIGRATIONS
from tuneforge_jobs.service import CatalogInputs


@contextlib.asynccontextmanager
async def jobs_database(admin_url: str) -> AsyncIterator[tuple[str, AsyncEngine]]:
    """A fresh PostgreSQL database with the jobs tables, dropped afterwards: (its libpq URL, an engine on it)."""
    async with fresh_postgres_databases(admin_url, "tuneforge_bench") as (url,):
        engine = make_engine(url)
        try:
            await migrate(engine, MIGRATIONS, "alembic_version_jobs")
            yield url.replace("postgresql+asyncpg://", "postgresql://"), engine
        finally:
            await engine.dispose()


class FixedCatalog:
    """The jobs service's catalog port, answering every id."""

    async def resolve_inputs(
        self,
        model_id: str,
        dataset_id: str,
        method_id: str,
        parameters: dict[str, Any],
        base: dict[str, Any] | None = None,
    ) -> CatalogInputs:
        return CatalogInputs("/m", "/d", "x", {**(base or {}), **parameters})

    async def dataset_tokens(self, dataset_id: str, model_id: str, max_seq_length: int) -> tuple[int, int]:
        return 0, 0

    async def publish_model(self, name: str, description: str, uri: str, kind: str, lineage: dict[str, Any]) -> str:
        return "model-bench"


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-th percentile (q in 0..100) of the values; NaN for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


# -- results: every benchmark writes its figures in one shape, which bench/run_all.py (make bench) gathers ------


@dataclass(frozen=True)
class Figure:
    """One measured figure: a ratio against a baseline run side by side, or a latency/rate with its goal."""

    bench: str  # the script, e.g. "bench_scheduler"
    figure: str  # what was measured, e.g. "scheduling decision p95 (1,000 queued, 100 agents)"
    value: float
    unit: str  # "ms", "points/s", "x" (a ratio), ...
    baseline: str = ""  # what it was compared with side by side, and that baseline's value, e.g. "bulk INSERT 61,000/s"
    goal: str = ""  # e.g. ">= 50,000 points/s", "<= 500 ms", ">= 1.0x"
    met: bool | None = None  # None: no goal
    note: str = ""  # what limits it, or the settings


def write_figures(path: Path | None, figures: list[Figure]) -> None:
    """Write this run's figures as JSON (a list) for bench/run_all.py; nothing when no path was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(f) for f in figures], indent=2))


def add_figures_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--figures", type=Path, help="write the figures as JSON here (bench/run_all.py reads them)")
