"""``/docs`` works with no internet: the page names only local files, the package serves them, and a real browser
renders the operation list with every non-local request blocked."""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from playwright.sync_api import Browser, Route, expect, sync_playwright

from ktizo.api.docs import STATIC, install_docs

# As tests/web/conftest.py launches Debian's Chromium; not imported from there, which would pull in the whole app.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PROBE_PATH = "/offline-probe/{item_id}"
STATIC_PREFIX = "/docs/static/"
CONTENT_TYPES = {
    "swagger-ui-bundle.js": ("text/javascript", "application/javascript"),
    "swagger-ui.css": ("text/css",),
    "favicon-32x32.png": ("image/png",),
}


def tiny_app() -> FastAPI:
    """An app built as Ktizo's is: FastAPI's own (CDN) docs page off, ours installed."""
    app = FastAPI(title="Offline probe", docs_url=None, redoc_url=None)

    @app.get(PROBE_PATH)
    def probe(item_id: int) -> dict[str, int]:
        return {"item_id": item_id}

    install_docs(app)
    return app


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links.extend(value for name, value in attrs if name in ("src", "href") and value is not None)


def links_of(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    parser.close()
    return parser.links


def is_external(url: str) -> bool:
    return url.startswith("//") or urllib.parse.urlsplit(url).scheme != "" or not url.startswith("/")


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(tiny_app()) as c:
        yield c


def test_docs_page_names_only_local_urls_and_they_are_served(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    html = r.text
    assert "http:" not in html and "https:" not in html and "//" not in html, html

    links = links_of(html)
    assert links, html
    for link in links:
        assert not is_external(link), link
        assert link.startswith(STATIC_PREFIX) or link == "/openapi.json", link
    # The schema the page loads sits in its script, not in an attribute.
    assert re.findall(r"url: '([^']*)'", html) == ["/openapi.json"]
    assert client.get("/openapi.json").json()["paths"].keys() == {PROBE_PATH}

    served = {link.removeprefix(STATIC_PREFIX) for link in links if link.startswith(STATIC_PREFIX)}
    assert served == set(CONTENT_TYPES)
    for name in served:
        got = client.get(STATIC_PREFIX + name)
        assert got.status_code == 200, name
        assert got.headers["content-type"].split(";")[0] in CONTENT_TYPES[name], got.headers["content-type"]
        assert len(got.content) > 500, name
        assert got.content == (STATIC / name).read_bytes(), name


def test_oauth2_redirect_page_is_there_and_local(client: TestClient) -> None:
    r = client.get("/docs/oauth2-redirect")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "http:" not in r.text and "https:" not in r.text
    assert links_of(r.text) == []


def test_docs_routes_stay_out_of_the_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not any(p.startswith("/docs") for p in paths)


def test_vendored_checksums_match_the_files() -> None:
    """VENDORED.md states each file's sha256; an edited or half-updated file would disagree."""
    text = (STATIC / "VENDORED.md").read_text()
    stated = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)}
    files = {p.name for p in STATIC.iterdir() if p.name != "VENDORED.md"}
    assert set(stated) == files
    for name, digest in stated.items():
        assert hashlib.sha256((STATIC / name).read_bytes()).hexdigest() == digest, name
    assert not any(name.endswith(".map") for name in files)


def test_install_docs_needs_the_schema() -> None:
    with pytest.raises(ValueError, match="openapi_url"):
        install_docs(FastAPI(docs_url=None, openapi_url=None))


@pytest.fixture
def live_url() -> Iterator[str]:
    """The tiny app under a real uvicorn on a free loopback port, in a thread (as tests/web's ``live`` does)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(tiny_app(), log_level="warning", access_log=False, ws="none", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_swagger_ui_renders_in_a_browser_with_no_internet(browser: Browser, live_url: str) -> None:
    blocked: list[str] = []
    requested: list[str] = []
    errors: list[str] = []

    def only_local(route: Route) -> None:
        url = urllib.parse.urlsplit(route.request.url)
        if url.scheme in ("data", "blob") or url.hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort("internetdisconnected")

    context = browser.new_context(base_url=live_url)
    try:
        context.route("**/*", only_local)
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto("/docs")
        operation = page.locator(".opblock").filter(has=page.locator(f'[data-path="{PROBE_PATH}"]'))
        try:
            expect(operation).to_be_visible(timeout=20_000)
        except AssertionError as e:
            raise AssertionError(f"Swagger UI did not render; blocked: {blocked}, page errors: {errors}") from e
        expect(page.locator(".swagger-ui .info .title")).to_contain_text("Offline probe")
        # Opening the operation renders its parameter from the schema: the UI is working, not just painted.
        operation.locator(".opblock-summary").click()
        expect(operation.locator(".parameters")).to_contain_text("item_id")
    finally:
        context.close()

    assert blocked == []
    assert errors == []
    assert f"{live_url}/docs/static/swagger-ui-bundle.js" in requested
    assert f"{live_url}/openapi.json" in requested
