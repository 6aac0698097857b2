"""An agent host in a real browser: it enrolls, appears in the device list by itself beside the Talos machines,
the operator approves it with the hostname left empty (so it keeps the name it reported), and the install page
shows the CA fingerprint and the command that pins it."""

from __future__ import annotations

import httpx
from playwright.sync_api import Page, expect

from tests.agents.support import body
from tests.web.conftest import Live, login, screenshot


def test_an_agent_enrolls_is_approved_with_its_reported_hostname_and_the_install_page_pins_the_ca(
    page: Page, live: Live, people: dict[str, str]
) -> None:
    login(page, people["operator"])
    expect(page.get_by_role("heading", name="No machine is waiting")).to_be_visible()

    payload = body(hostname="web-01")
    enrolled = httpx.post(live.url + "/api/v1/enroll", json=payload, timeout=10)
    assert enrolled.status_code == 202, enrolled.text
    machine_id = payload["machine_id"]
    agent = live.services.agents.resolve(machine_id)

    # The poller brings the new row in; no reload.
    row = page.locator(f"tbody#device-{agent.id}")
    expect(row).to_be_visible(timeout=12_000)
    expect(row).to_contain_text("Pending")
    expect(row).to_contain_text("agent")
    expect(row).to_contain_text(machine_id[:12])
    expect(row.get_by_title(f"machine-id {machine_id}")).to_be_visible()
    expect(row).to_contain_text("calls itself web-01")
    expect(row).to_contain_text("10.0.7.21")
    expect(row).to_contain_text("debian 12")

    row.get_by_role("button", name="Approve…").click()
    hostname = row.get_by_label("Hostname")
    expect(hostname).to_be_visible()
    expect(hostname).to_have_value("")
    expect(hostname).to_have_attribute("placeholder", "web-01")
    expect(row.get_by_label("IP address")).to_have_count(0)
    expect(row.get_by_label("Role")).to_have_count(0)
    page.wait_for_load_state("networkidle")
    screenshot(page, "agent-approve-form.png", full_page=False)
    row.get_by_role("button", name="Approve", exact=True).click()

    expect(row.get_by_role("status")).to_contain_text("Approved as web-01 (web-01.lab.example.com)")
    expect(row.locator(".status")).to_contain_text("Approved")
    expect(row.locator("a.machine-name")).to_have_text("web-01")
    expect(page.locator("#count-approved")).to_have_text("1")
    approved = live.services.agents.resolve(machine_id)
    assert (approved.status, approved.hostname, approved.approved_by) == ("approved", "web-01", "oscar")
    certificates = live.services.agents.certificates(approved.id)
    assert len(certificates) == 1

    row.locator("a.machine-name").click()
    expect(page.get_by_role("heading", name="web-01", exact=True)).to_be_visible()
    expect(page.locator("table.certificates")).to_contain_text(certificates[0].serial)
    expect(page.locator("table.certificates")).to_contain_text("Valid")
    expect(page.locator("#enrollment-state")).to_contain_text("awaiting pickup")
    expect(page.get_by_role("button", name="Revoke")).to_be_visible()
    screenshot(page, "agent-detail.png")

    page.get_by_role("navigation", name="Main").get_by_role("link", name="Agents").click()
    expect(page.get_by_role("heading", name="Enroll a Linux host")).to_be_visible()
    fingerprint = live.services.authority.fingerprint()
    expect(page.locator("#ca-fingerprint")).to_have_text(fingerprint)
    command = f"ktizo-agent --enroll {live.url} --ca-fingerprint {fingerprint}"
    expect(page.locator("#enroll-command")).to_have_text(command)
    expect(page.locator("#install-command")).to_have_text("pip install ./agent")
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=live.url)
    copy = page.get_by_role("button", name="Copy the enroll command")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == command
    screenshot(page, "agents-install.png")
    ca = page.request.get(page.get_by_role("link", name=live.url + "/api/v1/pki/ca.pem").get_attribute("href") or "")
    assert ca.ok and ca.text() == live.services.authority.ca_pem()
