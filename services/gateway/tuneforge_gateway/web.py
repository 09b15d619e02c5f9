"""The web dashboard: the built single-page app from `dashboard/` (Vite), served at `/` with its assets under
`/ui/assets/`, outside the OpenAPI document.

`make install` builds it into this package's `web/` folder (gitignored, shipped as package data). Pages are
routed client-side after a `#`, so `/` is the only page URL and no API path can be shadowed. Without a build
`/` answers 503 with a page that says how to build it, rather than a bare 404.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.staticfiles import StaticFiles

WEB_DIR = Path(__file__).parent / "web"
ASSETS_PREFIX = "/ui/assets"

NOT_BUILT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>TuneForge: dashboard not built</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 4rem auto; line-height: 1.5">
<h1>The TuneForge dashboard is not built</h1>
<p>The gateway found no built dashboard in <code>{where}</code>.
Run <code>make install</code> in the repository (it runs <code>npm ci &amp;&amp; npm run build</code> in
<code>dashboard/</code>), then reload this page.</p>
<p>The API works without it: <a href="/docs">/docs</a>, <a href="/openapi.json">/openapi.json</a>,
<a href="/healthz">/healthz</a>.</p>
</body></html>
"""


class _Assets(StaticFiles):
    """Static files whose folder may not exist yet (no build): a 404 per file then, not a 500."""

    async def check_config(self) -> None:
        return None


def mount_dashboard(app: FastAPI, web_dir: str | os.PathLike[str] | None = None) -> None:
    """Serve the built dashboard at `/` and its assets under ASSETS_PREFIX; looks for the build per request,
    so building it while the gateway runs needs no restart."""
    root = Path(web_dir) if web_dir is not None else WEB_DIR
    index = root / "index.html"

    @app.get("/", include_in_schema=False)
    async def dashboard() -> Response:
        if not index.is_file():
            return HTMLResponse(NOT_BUILT.format(where=html.escape(str(root))), status_code=503)
        # The page names its hashed assets, so it must never be cached past a rebuild.
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount(ASSETS_PREFIX, _Assets(directory=root / "assets", check_dir=False), name="dashboard-assets")
