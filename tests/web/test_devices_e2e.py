"""The device pages in a real browser: a machine asks for its config, appears as pending by itself, and an
operator approves or rejects it through the form; bulk approval with a pattern and a range."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Page, expect

from ktizo.domain.devices import DeviceStatus
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges, DeviceQuery
from tests.web.conftest import Live, login, screenshot

MAC_A = "52:54:00:aa:00:01"
MAC_B = "52:54:00:aa:00:02"
UUID_A = "4c4c4544-0042-3510-8051-b4c04f4e3132"


def row(page: Page, text: str):  # type: ignore[no-untyped-def]
    """The device (one tbody) whose row shows ``text``."""
    return page.locator("tbody.device").filter(has_text=text)


def test_talos_device_appears_pending_and_is_approved_through_the_form(
    page: Page, live: Live, people: dict[str, str], bases: Path
) -> None:
    live.services.cluster.update(Actor.system(), {"gateway": "10.0.5.1"})
    assert live.talos_get(mac=MAC_A, uuid=UUID_A, serial="SN-A1").status_code == 403
    live.set_device(MAC_A, facts={"manufacturer": "Supermicro", "product": "SYS-1029P", "arch": "amd64"})

    login(page, people["operator"])
    a = row(page, MAC_A)
    expect(a.get_by_role("status")).to_have_count(0)
    expect(a).to_contain_text("Pending")
    expect(a).to_contain_text("Talos config fetch")
    expect(a).to_contain_text("SN-A1")
    expect(a).to_contain_text("Supermicro SYS-1029P")

    a.get_by_role("button", name="Approve…").click()
    a.get_by_label("Hostname").fill("node-01")
    expect(a.get_by_text("gateway 10.0.5.1")).to_be_visible()

    # Another machine knocks while the operator is typing: its row appears by itself, the form keeps its text.
    assert live.talos_get(mac=MAC_B, serial="SN-B2").status_code == 403
    expect(row(page, MAC_B)).to_be_visible(timeout=12_000)
    expect(row(page, MAC_B)).to_contain_text("New")
    expect(a.get_by_label("Hostname")).to_have_value("node-01")
    expect(page.locator("#count-pending")).to_have_text("2")

    a.get_by_label("IP address").fill("10.0.5.20")  # no prefix: refused next to the field
    a.get_by_label("Role").select_option("worker")
    a.get_by_label("Notes").fill("rack 3, slot 12")
    screenshot(page, "approve-form.png", full_page=False)
    a.get_by_role("button", name="Approve", exact=True).click()
    expect(a.locator(".field-error")).to_contain_text("no prefix length")
    expect(a.get_by_label("IP address")).to_have_attribute("aria-invalid", "true")
    assert live.device(MAC_A).status == "pending"

    a.get_by_label("IP address").fill("10.0.5.20/24")
    a.get_by_label("IP address").press("Enter")
    expect(a.get_by_role("status")).to_contain_text("Approved as node-01 · 10.0.5.20/24 · worker")
    expect(a).to_contain_text("Approved")
    expect(page.locator("#count-approved")).to_have_text("1")
    expect(page.locator("#count-pending")).to_have_text("1")

    page.get_by_role("link", name=re.compile(r"^Approved")).click()
    expect(row(page, "node-01")).to_contain_text("10.0.5.20/24")
    expect(page.locator("tbody.device")).to_have_count(1)

    served = live.talos_get(mac=MAC_A, uuid=UUID_A, serial="SN-A1")
    assert served.status_code == 200, served.text
    assert served.headers["content-type"].startswith("application/yaml")
    assert "hostname: node-01" in served.text
    assert "10.0.5.20/24" in served.text
    approve = live.services.audit.list(AuditQuery(action="approve"))[0][0]
    assert (approve.actor, approve.details["hostname"], approve.source_ip) == ("oscar", "node-01", "127.0.0.1")


def test_reject_through_the_form(page: Page, live: Live, people: dict[str, str]) -> None:
    assert live.talos_get(mac=MAC_A).status_code == 403
    login(page, people["operator"])
    a = row(page, MAC_A)
    a.get_by_role("button", name="Approve…").click()
    notes = a.get_by_label("Notes")
    # Let the editor's swap settle before typing (a CI run once typed into a form that was then replaced).
    expect(notes).to_be_visible()
    page.wait_for_load_state("networkidle")
    notes.fill("not ours")
    expect(notes).to_have_value("not ours")
    a.get_by_role("button", name="Reject").click()
    expect(a.get_by_role("status")).to_contain_text("Rejected")
    expect(page.locator("#count-rejected")).to_have_text("1")
    device = live.device(MAC_A)
    assert (device.status, device.notes, device.rejected_by) == ("rejected", "not ours", "oscar")
    refused = live.talos_get(mac=MAC_A)
    assert (refused.status_code, refused.text.strip()) == (403, "Device not approved. Current status: rejected")


def _pending_rack(live: Live, count: int) -> list[str]:
    macs = []
    for i in range(count):
        mac = f"52:54:00:bb:00:{i + 1:02x}"
        assert live.talos_get(mac=mac, serial=f"S{7000 + i}").status_code == 403
        live.set_device(
            mac,
            facts={"manufacturer": "Dell Inc.", "product": "PowerEdge R650", "arch": "amd64"},
            source="ipxe" if i % 2 else "config_fetch",
            last_ip=f"10.0.5.{200 + i}",
        )
        macs.append(mac)
    return macs


def test_bulk_approve_five_with_a_pattern_and_a_range(page: Page, live: Live, people: dict[str, str]) -> None:
    # worker-03 exists and holds 10.0.5.101: numbering goes on at 04 and that address is skipped.
    services = live.services
    existing = services.devices.create(
        Actor.system(), DeviceChanges(mac_address="52:54:00:cc:00:01", hostname="worker-03", ip_address="10.0.5.101/24")
    )
    services.devices.approve(Actor.system(), existing.id, DeviceChanges())
    macs = _pending_rack(live, 6)

    login(page, people["operator"])
    expect(page.locator("tbody.device")).to_have_count(6)
    screenshot(page, "device-list.png")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "device-list-phone.png", full_page=False)
    page.set_viewport_size({"width": 1280, "height": 900})

    chosen = macs[:5]  # first seen first: that is the order names and addresses are handed out in
    for mac in chosen:
        row(page, mac).get_by_role("checkbox").check()
    expect(page.locator("#selected-count")).to_have_text("5")
    page.get_by_label("Hostname pattern").fill("worker-{n:02d}")
    page.get_by_label("IP addresses").fill("10.0.5.100-10.0.5.120/24")
    page.locator("#bulk-role").select_option("worker")
    screenshot(page, "bulk-form.png", full_page=False)
    page.get_by_role("button", name="Preview approval").click()

    expect(page.get_by_role("heading", name="Approve 5 devices?")).to_be_visible()
    cells = page.locator("table.preview tbody tr")
    expect(cells).to_have_count(5)
    expected = [
        ("worker-04", "10.0.5.100/24"),
        ("worker-05", "10.0.5.102/24"),
        ("worker-06", "10.0.5.103/24"),
        ("worker-07", "10.0.5.104/24"),
        ("worker-08", "10.0.5.105/24"),
    ]
    for i, (name, ip) in enumerate(expected):
        expect(cells.nth(i)).to_contain_text(chosen[i])
        expect(cells.nth(i)).to_contain_text(name)
        expect(cells.nth(i)).to_contain_text(ip)
    screenshot(page, "bulk-preview.png")
    assert all(services.devices.resolve(m).status == "pending" for m in chosen)  # a preview changes nothing

    page.get_by_role("button", name="Approve 5 devices").click()
    expect(page.locator(".flash")).to_contain_text("Approved 5 devices")
    for name, ip in expected:
        expect(row(page, name)).to_contain_text(ip)
    got = {services.devices.resolve(m).hostname: services.devices.resolve(m).ip_address for m in chosen}
    assert got == dict(expected)
    assert services.devices.resolve(macs[5]).status == "pending"
    events, total = services.audit.list(AuditQuery(action="approve", actor="oscar"))
    assert total == 5 and {e.device_mac for e in events} == set(chosen)


def test_bulk_reject_every_pending_device_matching_the_filter(page: Page, live: Live, people: dict[str, str]) -> None:
    macs = _pending_rack(live, 3)
    other = "52:54:00:dd:00:01"
    assert live.talos_get(mac=other).status_code == 403
    login(page, people["operator"])
    page.get_by_label("Search").fill("52:54:00:bb")
    page.get_by_label("Search").press("Enter")
    expect(page.locator("tbody.device")).to_have_count(3)
    page.locator("#bulk-panel summary").click()
    page.get_by_label(re.compile("take every pending device")).check()
    page.get_by_role("button", name="Reject selected…").click()
    expect(page.get_by_role("heading", name="Reject 3 devices?")).to_be_visible()
    page.get_by_role("button", name="Reject 3 devices").click()
    expect(page.locator(".flash")).to_contain_text("Rejected 3 devices")
    assert [live.device(m).status for m in macs] == ["rejected"] * 3
    assert live.device(other).status == "pending"


def test_a_search_keeps_the_open_bulk_panel_and_what_was_typed_in_it(
    page: Page, live: Live, people: dict[str, str]
) -> None:
    _pending_rack(live, 2)
    assert live.talos_get(mac="52:54:00:dd:00:01").status_code == 403
    login(page, people["operator"])
    page.locator("#bulk-panel summary").click()
    page.get_by_label("Hostname pattern").fill("edge-{n:02d}")
    page.locator("#bulk-panel").get_by_label("Notes").fill("rack 9")
    searches: list[str] = []
    page.on("request", lambda r: searches.append(r.url) if "/ui/devices?" in r.url and "q=" in r.url else None)
    # Typing starts a search after a pause and Enter sends one at once: asked once, the list re-drawn once, and
    # the re-draw keeps the panel as the operator left it.
    page.get_by_label("Search").fill("52:54:00:bb")
    page.get_by_label("Search").press("Enter")
    expect(page.locator("tbody.device")).to_have_count(2)
    expect(page).to_have_url(re.compile(r"q=52%3A54%3A00%3Abb"))
    page.wait_for_timeout(600)  # past the typing pause
    assert len(searches) == 1, searches
    expect(page.locator("#bulk-panel")).to_have_attribute("open", "")
    expect(page.get_by_label("Hostname pattern")).to_have_value("edge-{n:02d}")
    expect(page.locator("#bulk-panel").get_by_label("Notes")).to_have_value("rack 9")
    expect(page.get_by_label(re.compile("take every pending device"))).to_be_visible()
    expect(page.get_by_label(re.compile("take every pending device"))).not_to_be_checked()
    expect(page.locator("#bulk-panel")).to_contain_text("matching “52:54:00:bb”")


def test_detail_page_history_preview_edit_revoke_and_delete(
    page: Page, live: Live, people: dict[str, str], bases: Path
) -> None:
    assert live.talos_get(mac=MAC_A, uuid=UUID_A, serial="SN-A1").status_code == 403
    device = live.device(MAC_A)
    page.on("dialog", lambda dialog: dialog.accept())
    login(page, people["operator"])
    page.goto(f"/ui/devices/{device.id}")
    expect(page.get_by_role("heading", name="Config preview")).to_be_visible()
    expect(page.locator("pre.config")).to_contain_text("***redacted***")

    page.get_by_label("Hostname").first.fill("edge-07")
    page.get_by_label("IP address").first.fill("10.0.9.7/24")
    page.get_by_role("button", name="Approve", exact=True).click()
    expect(page.locator(".flash")).to_contain_text("Approved as edge-07")
    expect(page.locator(".timeline")).to_contain_text("approve")
    expect(page.locator(".timeline")).to_contain_text("register")

    screenshot(page, "device-detail.png")
    page.get_by_text("Edit", exact=True).click()
    page.locator("#edit-labels").fill("rack=r3")
    page.get_by_role("button", name="Save changes").click()
    expect(page.locator(".flash")).to_contain_text("labels changed")

    page.get_by_role("button", name="Clear identity binding").click()
    expect(page.locator(".flash")).to_contain_text("Identity binding cleared")
    assert live.device(MAC_A).uuid is None

    page.get_by_role("button", name="Revoke").click()
    expect(page.locator(".flash")).to_contain_text("Revoked")
    assert live.device(MAC_A).status == DeviceStatus.REJECTED.value
    page.get_by_role("button", name="Approve", exact=True).click()  # re-approve a rejected device
    expect(page.locator(".flash")).to_contain_text("Approved as edge-07")

    page.get_by_role("button", name="Delete…").click()
    expect(page.locator(".flash")).to_contain_text("Deleted edge-07")
    assert live.services.devices.list(DeviceQuery())[1] == 0
