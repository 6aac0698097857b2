"""Sites and the collision gate in a real browser: an admin creates a site, rotates its key, sees the key once
and copies the installer one-liner (which holds no key); an operator finds a claim held at the collision gate
from the device list and rejects it, and the claimant's poll is refused."""

from __future__ import annotations

import secrets

import httpx
from playwright.sync_api import Page, expect

from ktizo.services.context import Actor
from tests.agents.test_zero_touch import zt_body
from tests.web.conftest import Live, login, screenshot


def test_an_admin_creates_a_site_rotates_its_key_and_copies_the_one_liner(
    page: Page, live: Live, people: dict[str, str]
) -> None:
    page.on("dialog", lambda dialog: dialog.accept())
    login(page, people["admin"])
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Sites").click()
    expect(page.get_by_role("heading", name="Sites", exact=True)).to_be_visible()

    page.locator("#new-site > summary").click()
    page.get_by_label("Code").fill("Bad code!")
    page.get_by_role("button", name="Create site").click()
    expect(page.locator("#site-code-error")).to_contain_text("a site code is 1-64")
    page.get_by_label("Code").fill("fra1")
    page.get_by_label("Name", exact=True).fill("Frankfurt")
    page.get_by_label("Max agents").fill("50")
    page.get_by_role("button", name="Create site").click()
    expect(page.get_by_role("heading", name="Site fra1")).to_be_visible()
    expect(page.locator(".flash")).to_contain_text("Created site fra1")

    page.get_by_label("Max uses").fill("20")
    page.get_by_role("button", name="Make the first key").click()
    secret = page.get_by_role("textbox", name="The new enrollment key")
    expect(secret).to_be_visible()
    key = secret.input_value()
    assert key.startswith("cek_")
    expect(page.get_by_role("alert").filter(has_text="Shown once.")).to_be_visible()
    info = live.services.sites.active_key("fra1")
    assert info is not None and info.max_uses == 20
    expect(page.locator("#key-fingerprint")).to_have_text(info.fingerprint)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    copy_key = page.get_by_role("button", name="Copy the enrollment key")
    copy_key.click()
    expect(copy_key).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == key
    screenshot(page, "site-key-rotated.png")

    # The key opens the door.
    enrolled = httpx.post(live.url + "/api/enroll", json=zt_body("fra1", key), timeout=10)
    assert enrolled.status_code == 201, enrolled.text

    page.goto("/ui/sites/fra1")  # afterwards: the fingerprint only
    expect(page.locator("#secret-value")).to_have_count(0)
    assert key not in page.content()
    expect(page.locator("#key-fingerprint")).to_have_text(info.fingerprint)
    expect(page.locator("table.by-version")).to_contain_text("v1")
    expect(page.locator("table.site-agents")).to_contain_text("web-01")

    fingerprint = live.services.authority.fingerprint()
    command = (
        f"pip install ./agent && ktizo-agent --enroll {live.url} --site fra1 "
        f"--enrollment-key-file /root/ktizo.key --ca-fingerprint {fingerprint}"
    )
    expect(page.locator("#install-command")).to_have_text(command)
    copy = page.get_by_role("button", name="Copy the installer one-liner")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == command
    screenshot(page, "site-detail.png")

    page.get_by_role("link", name="Sites", exact=True).first.click()
    row = page.locator("table.sites tbody tr").filter(has_text="fra1")
    expect(row).to_contain_text(info.fingerprint)
    expect(row).to_contain_text("Frankfurt")


def test_an_operator_rejects_a_claim_held_at_the_collision_gate(page: Page, live: Live, people: dict[str, str]) -> None:
    live.services.sites.create(Actor.cli(), "fra1")
    key, _ = live.services.sites.rotate_key(Actor.cli(), "fra1")
    uid = secrets.token_hex(32)
    first = httpx.post(live.url + "/api/enroll", json=zt_body("fra1", key, uid), timeout=10)
    assert first.status_code == 201, first.text
    held = httpx.post(live.url + "/api/enroll", json=zt_body("fra1", key, uid, hostname="impostor"), timeout=10)
    assert held.status_code == 202, held.text
    token = held.json()["polling_token"]

    page.on("dialog", lambda dialog: dialog.accept())
    login(page, people["operator"])
    banner = page.get_by_role("link", name="1 enrollment held at the collision gate")
    expect(banner).to_be_visible()
    banner.click()
    expect(page.get_by_role("heading", name="Collision gate")).to_be_visible()
    card = page.locator("section.collision")
    expect(card).to_have_count(1)
    expect(card.get_by_role("heading", name="impostor claims to be web-01")).to_be_visible()
    expect(card).to_contain_text("debian 12")
    expect(card).to_contain_text("key v1")
    screenshot(page, "collision-gate.png")

    card.get_by_role("button", name="Reject").click()
    expect(page.locator(".flash")).to_contain_text("Rejected the claim of impostor on web-01")
    expect(page.get_by_role("heading", name="Nothing waits at the gate")).to_be_visible()
    assert httpx.get(f"{live.url}/api/v1/enroll/status/{token}", timeout=10).status_code == 403
    assert live.services.agents.resolve(str(first.json()["agent_id"])).status == "approved"
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Devices").click()
    expect(page.get_by_role("link", name="1 enrollment held at the collision gate")).to_have_count(0)
