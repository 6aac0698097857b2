"""End-to-end fixtures: a real uvicorn server over the test database, and Debian's Chromium driven by Playwright
(never a downloaded browser)."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright
from sqlalchemy import update

from ktizo.app import create_app
from ktizo.db.models import Device
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.support import TALOS_HEADERS, talos_url

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
SCREENSHOTS = Path(__file__).resolve().parents[2] / "docs" / "screenshots"
PASSWORD = "correct horse battery staple"

expect.set_options(timeout=10_000)


@dataclass(frozen=True)
class Live:
    url: str
    services: Services

    def talos_get(self, **values: str) -> httpx.Response:
        """A config request exactly as Talos makes it: GET, its query form, Go's headers, no credentials."""
        return httpx.get(self.url + talos_url(**values), headers=TALOS_HEADERS, timeout=10)

    def device(self, mac: str) -> Device:
        return self.services.devices.resolve(mac)

    def set_device(self, mac: str, **values: Any) -> None:
        """Facts and the like arrive through doors other issues build (DHCP, iPXE); tests write them directly."""
        with self.services.db.write() as s:
            s.execute(update(Device).where(Device.mac_address == mac).values(**values))


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def live(settings: Settings, services: Services) -> Iterator[Live]:
    """``ktizo serve`` in miniature: uvicorn on a free loopback port, in a thread, over the test database."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # A pending machine's config request is held open (long poll) in production; the tests want its 403 now.
    settings = settings.model_copy(update={"long_poll_seconds": 0})
    config = uvicorn.Config(
        create_app(settings, services), log_level="warning", access_log=False, ws="none", lifespan="off"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    yield Live(f"http://127.0.0.1:{port}", services)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def people(services: Services) -> dict[str, str]:
    """One user per role, all with the same password."""
    for name, role in (("alice", UserRole.ADMIN), ("oscar", UserRole.OPERATOR), ("vera", UserRole.VIEWER)):
        services.users.create(Actor.system(), name, role, PASSWORD)
    return {"admin": "alice", "operator": "oscar", "viewer": "vera"}


@pytest.fixture
def page(browser: Browser, live: Live) -> Iterator[Page]:
    context = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 900}, locale="en-GB")
    page = context.new_page()
    yield page
    context.close()


def login(page: Page, username: str, password: str = PASSWORD) -> None:
    page.goto("/ui/devices")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_label("Password").press("Enter")  # Enter submits, as on every form
    expect(page.get_by_role("heading", name="Devices", exact=True)).to_be_visible()


def csrf_of(page: Page) -> str:
    value = page.locator("input[name=csrf]").first.get_attribute("value")
    assert value
    return value


def screenshot(page: Page, name: str, *, full_page: bool = True) -> None:
    """Take the picture every run (it proves the page renders); keep it in docs/ only when asked to, so a test
    run leaves the working tree as it found it: ``KTIZO_SCREENSHOTS=1 python3 -m pytest tests/web``."""
    target = SCREENSHOTS if os.environ.get("KTIZO_SCREENSHOTS") == "1" else Path(tempfile.gettempdir()) / "ktizo-shots"
    target.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(target / name), full_page=full_page)
