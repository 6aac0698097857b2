"""Cluster Settings, the audit log and Users & tokens in a real browser (and the screenshots of those pages)."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from ktizo.domain.devices import Role
from ktizo.services.audit import AuditQuery
from tests.web.conftest import Live, login, screenshot


def test_cluster_settings_save_validate_generate_and_upload(page: Page, live: Live, people: dict[str, str]) -> None:
    login(page, people["admin"])
    page.get_by_role("link", name="Cluster").click()
    expect(page.get_by_role("heading", name="Cluster settings")).to_be_visible()
    expect(page.locator("#base-configs")).to_contain_text("missing")

    page.get_by_label("Cluster name").fill("prod")
    page.get_by_label("Control plane endpoint").fill("not a url")
    page.get_by_label("Kubernetes version").fill("1.33.0")
    page.get_by_label("Gateway").fill("10.0.5.1")
    page.get_by_role("button", name="Save settings").click()
    expect(page.locator(".field-error")).to_have_count(1)
    expect(page.get_by_label("Control plane endpoint")).to_have_attribute("aria-invalid", "true")
    assert live.services.cluster.settings().cluster_name is None  # nothing is half-set

    page.get_by_label("Control plane endpoint").fill("https://10.0.5.10:6443")
    page.get_by_label("Nameservers").fill("10.0.5.1, 1.1.1.1")
    page.get_by_label("Control plane endpoint").press("Enter")
    expect(page.locator(".flash")).to_contain_text("Cluster settings saved")
    view = live.services.cluster.settings()
    assert (view.cluster_name, view.endpoint, view.gateway, view.nameservers) == (
        "prod",
        "https://10.0.5.10:6443",
        "10.0.5.1",
        ["10.0.5.1", "1.1.1.1"],
    )

    page.get_by_role("button", name="Generate cluster configuration…").click()
    expect(page.get_by_text("no secrets bundle yet")).to_be_visible()
    page.get_by_role("button", name="Generate", exact=True).click()
    expect(page.locator(".flash")).to_contain_text("Generated base configs")
    expect(page.locator("#base-configs")).not_to_contain_text("missing")

    page.get_by_label("Rotate secrets").check()
    page.get_by_role("button", name="Generate cluster configuration…").click()
    expect(page.get_by_text("Rotating secrets makes a new cluster identity")).to_be_visible()
    page.get_by_role("link", name="Cancel").click()

    with page.expect_download() as download:
        page.get_by_role("button", name="Download talosconfig").click()
    assert "talosconfig" in download.value.suggested_filename

    worker = live.services.cluster.get_base(Role.WORKER)
    page.locator("#base-role").select_option("worker")
    page.get_by_label("Base config file").set_input_files(
        files=[{"name": "worker.yaml", "mimeType": "application/yaml", "buffer": worker}]
    )
    page.get_by_role("button", name="Upload base config").click()
    expect(page.locator(".flash")).to_contain_text("Uploaded the worker base config")
    page.get_by_label("Base config file").set_input_files(
        files=[{"name": "bad.yaml", "mimeType": "application/yaml", "buffer": b"machine: [not, a, config]\n"}]
    )
    page.get_by_role("button", name="Upload base config").click()
    expect(page.locator("#base-file-error")).to_be_visible()
    page.goto("/ui/cluster")
    screenshot(page, "cluster-settings.png")

    page.get_by_role("link", name="Audit log").click()
    expect(page.locator("table.audit tbody tr").first).to_be_visible()
    screenshot(page, "audit-log.png")
    page.get_by_label("Action").select_option("cluster_generate")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("table.audit tbody tr")).to_have_count(1)
    expect(page.locator("table.audit")).to_contain_text("alice")
    page.get_by_label("Actor").fill("nobody")
    page.get_by_role("button", name="Filter").click()
    expect(page.get_by_text("No events match these filters")).to_be_visible()


def test_users_and_tokens_for_admins(page: Page, live: Live, people: dict[str, str]) -> None:
    page.on("dialog", lambda dialog: dialog.accept())
    login(page, people["admin"])
    page.get_by_role("link", name="Users & tokens").click()
    page.get_by_label("Username").fill("newbie")
    page.locator("#new-role").select_option("operator")
    page.get_by_role("button", name="Create user").click()
    password = page.get_by_role("textbox", name="One-time password for newbie").input_value()
    assert len(password) >= 20
    assert live.services.users.authenticate("newbie", password, None).username == "newbie"

    page.locator("#token-user").select_option("newbie")
    page.get_by_label("Name", exact=True).fill("ci")
    page.get_by_role("button", name="Create token").click()
    token = page.locator("#secret-value").input_value()
    assert token.startswith("ktz_")
    assert live.services.users.resolve_token(token).username == "newbie"
    screenshot(page, "users.png")
    page.goto("/ui/users")
    expect(page.locator("#secret-value")).to_have_count(0)  # shown once

    page.locator("tr").filter(has_text=token[:10]).get_by_role("button", name="Revoke").click()
    expect(page.locator(".flash")).to_contain_text("Revoked token")
    page.locator("tr").filter(has=page.get_by_text("newbie", exact=True)).get_by_role("button", name="Disable").click()
    expect(page.locator(".flash")).to_contain_text("newbie disabled")
    events = {e.action for e in live.services.audit.list(AuditQuery(actor="alice"))[0]}
    assert {"user_create", "token_create", "token_revoke", "user_disable"} <= events
    assert re.search(r"disabled", page.locator("tr").filter(has=page.get_by_text("newbie", exact=True)).inner_text())
