"""Shared by the benchmarks (run as scripts, so this directory is on sys.path)."""

from __future__ import annotations

from typing import Any

from tuneforge_jobs.service import CatalogInputs


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
