"""The web chat page: served at / without an API key, self-contained, API still protected."""

from __future__ import annotations

import re

import pytest

from gateway.routes.web import WEB_DIR


async def test_page_and_assets_need_no_api_key(configured_client) -> None:
    async with configured_client(api_keys=("sk-page",)) as client:
        page = await client.get("/")
        script = await client.get("/web/chat.js")
        style = await client.get("/web/chat.css")
        api = await client.get("/v1/models")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/web/chat.js">' in page.text
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert api.status_code == 401


@pytest.mark.parametrize("path", ["/web/../config.py", "/web/%2e%2e/config.py", "/web/nope.js"])
async def test_nothing_outside_the_web_directory_is_served(client, path) -> None:
    response = await client.get(path)
    assert response.status_code == 404


@pytest.mark.parametrize("name", ["index.html", "chat.js", "chat.css"])
def test_page_loads_nothing_from_other_origins(name) -> None:
    # Works offline and leaks no prompt: every URL the page uses is on this server.
    text = (WEB_DIR / name).read_text()
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.IGNORECASE)
