"""The gateway serves the built web dashboard at `/` and its assets under `/ui/assets/`, outside the OpenAPI
document and without shadowing an API route; with no build, `/` says how to make one (503)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tuneforge_gateway.app import create_app

# Nothing listens there: these routes never call a backend.
NOWHERE = "127.0.0.1:9"


def client(web_dir: Path) -> httpx.AsyncClient:
    app = create_app(NOWHERE, NOWHERE, web_dir=web_dir)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway")


@pytest.fixture
def built(tmp_path: Path) -> Path:
    (tmp_path / "assets").mkdir()
    (tmp_path / "index.html").write_text('<!doctype html><script src="/ui/assets/index-abc.js"></script>')
    (tmp_path / "assets" / "index-abc.js").write_text("console.log('dashboard')")
    return tmp_path


async def test_root_serves_the_built_dashboard_and_its_assets(built: Path) -> None:
    async with client(built) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["cache-control"] == "no-cache"  # a rebuild's new asset names reach the browser
        assert "/ui/assets/index-abc.js" in page.text

        script = await http.get("/ui/assets/index-abc.js")
        assert script.status_code == 200
        assert "javascript" in script.headers["content-type"]
        assert script.text == "console.log('dashboard')"

        assert (await http.get("/ui/assets/missing.js")).status_code == 404
        assert (await http.get("/ui/assets/../index.html")).status_code == 404


async def test_without_a_build_root_answers_503_saying_to_run_make_install(tmp_path: Path) -> None:
    async with client(tmp_path / "web") as http:
        page = await http.get("/")
        assert page.status_code == 503
        assert page.headers["content-type"].startswith("text/html")
        assert "make install" in page.text
        assert "not built" in page.text
        assert (await http.get("/ui/assets/index-abc.js")).status_code == 404  # a 404, not a server error


async def test_dashboard_is_outside_the_openapi_document_and_shadows_no_api_route(built: Path) -> None:
    async with client(built) as http:
        document = (await http.get("/openapi.json")).json()
        assert "/" not in document["paths"]
        assert not [p for p in document["paths"] if p.startswith("/ui")]
        assert "/api/v1/jobs" in document["paths"] and "/healthz" in document["paths"]

        # The API's own pages still answer as before.
        assert (await http.get("/docs")).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        missing = await http.get("/api/v1/no-such-route")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "NOT_FOUND"
