"""Agents in the UI without a browser: the device list shows them beside Talos machines, the approve form asks
only a hostname and notes, the agent's page shows its enrollment, certificates and check-in, revoke and purge go
through the services with the operator role and the CSRF token, and the install page carries the CA fingerprint.
Whatever a host reported is shown as text."""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from ktizo.db.models import Device
from ktizo.domain.errors import NotFound
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.agents.support import body
from tests.web.conftest import PASSWORD

MAC = "52:54:00:ab:00:01"
HX = {"HX-Request": "true"}
HOST_FACTS = {
    "cpu": {"model": "Intel(R) Xeon(R) E-2276G CPU @ 3.80GHz", "logical_cpus": 12},
    "memory": {"total_bytes": 33_554_432 * 1024},
    "disks": [{"name": "nvme0n1", "size_bytes": 512_110_190_592, "rotational": False, "model": "Samsung 970"}],
    "nics": [{"name": "eno1", "mac": "3c:ec:ef:00:11:22", "mtu": 1500, "operstate": "up", "speed_mbps": 1000}],
}


def sign_in(c: TestClient, username: str) -> str:
    """Sign ``username`` in (any earlier session dropped); returns the session's CSRF token."""
    c.cookies.clear()
    form = c.get("/ui/login").text
    nonce = re.search(r'name="nonce" value="([^"]+)"', form)
    assert nonce
    r = c.post(
        "/ui/login",
        data={"username": username, "password": PASSWORD, "nonce": nonce.group(1)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', c.get("/ui/devices").text)
    assert csrf
    return csrf.group(1)


def enroll(c: TestClient, services: Services, **over: Any) -> Device:
    payload = body(**over)
    r = c.post("/api/v1/enroll", json=payload)
    assert r.status_code == 202, r.text
    return services.agents.resolve(payload["machine_id"])


def set_facts(services: Services, device_id: int, facts: dict[str, Any]) -> None:
    """Facts as a check-in (or an older release, or a restored backup) leaves them: written directly."""
    with services.db.write() as s:
        s.execute(update(Device).where(Device.id == device_id).values(facts=facts))


@pytest.fixture
def ui(client: TestClient, people: dict[str, str]) -> TestClient:
    return client


def test_the_list_shows_an_agent_beside_a_talos_machine(ui: TestClient, services: Services) -> None:
    services.devices.create(Actor.system(), DeviceChanges(mac_address=MAC))
    agent = enroll(ui, services, hostname="web-01")
    assert agent.machine_id
    sign_in(ui, "vera")
    page = ui.get("/ui/devices").text
    rows = {m.group(1): m.group(0) for m in re.finditer(r'<tbody id="device-(\d+)".*?</tbody>', page, re.S)}
    row = rows[str(agent.id)]
    assert '<span class="kind kind-agent"' in row and ">agent</span>" in row
    assert f'title="machine-id {agent.machine_id}"' in row
    assert f">{agent.machine_id[:12]}…</div>" in row
    assert "no MAC" not in row and "None" not in row
    assert "calls itself web-01" in row
    assert "10.0.7.21" in row and "reported" in row
    assert "debian 12" in row and "6.1.0-27-amd64" in row
    assert "web-01.lab.example.com" in row
    assert "Agent enrollment" in row
    talos = next(r for i, r in rows.items() if i != str(agent.id))
    assert ">talos</span>" in talos and MAC in talos
    # The search finds it by machine-id too.
    found = ui.get("/ui/devices", params={"q": agent.machine_id[:10]}).text
    assert f'id="device-{agent.id}"' in found and MAC not in found


def test_the_inline_approve_form_of_an_agent_asks_only_hostname_and_notes(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services, hostname="db-07")
    sign_in(ui, "oscar")
    form = ui.get(f"/ui/devices/{agent.id}/row", params={"editor": "1"}, headers=HX).text
    assert 'name="hostname"' in form and 'placeholder="db-07"' in form
    assert 'name="notes"' in form
    assert 'name="ip_address"' not in form and 'name="role"' not in form
    assert "issues its certificate" in form
    detail = ui.get(f"/ui/devices/{agent.id}").text
    assert 'name="hostname"' in detail and 'name="ip_address"' not in detail and 'name="role"' not in detail


def test_approving_with_an_empty_hostname_uses_the_reported_one_and_issues_a_certificate(
    ui: TestClient, services: Services
) -> None:
    agent = enroll(ui, services, hostname="web-01")
    csrf = sign_in(ui, "oscar")
    r = ui.post(
        f"/ui/devices/{agent.id}/approve",
        data={"csrf": csrf, "hostname": "", "notes": "front end"},
        headers=HX,
    )
    assert r.status_code == 200, r.text
    assert "Approved as web-01 (web-01.lab.example.com)" in r.text
    assert 'id="count-approved"' in r.text  # the tab counts follow, out of band
    approved = services.agents.resolve(str(agent.id))
    assert (approved.status, approved.hostname, approved.notes) == ("approved", "web-01", "front end")
    certificates = services.agents.certificates(agent.id)
    assert len(certificates) == 1 and certificates[0].reason == "enroll"
    enrollment = services.agents.enrollment(agent.id)
    assert enrollment is not None and enrollment.status == "approved"

    page = ui.get(f"/ui/devices/{agent.id}").text
    assert certificates[0].serial in page
    assert "awaiting pickup" in page
    assert ">Valid</span>" in page
    assert "web-01.lab.example.com" in page
    assert f'action="/ui/agents/{agent.id}/revoke"' in page
    assert f'action="/ui/agents/{agent.id}/purge"' in page
    assert "Config preview" not in page  # a Talos machine's sections are not an agent's


def test_a_refused_hostname_comes_back_next_to_the_field(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services)
    csrf = sign_in(ui, "oscar")
    r = ui.post(f"/ui/devices/{agent.id}/approve", data={"csrf": csrf, "hostname": "not a name!"}, headers=HX)
    assert r.status_code == 422
    assert 'aria-invalid="true"' in r.text and 'name="ip_address"' not in r.text
    assert services.agents.resolve(str(agent.id)).status == "pending"
    assert services.agents.certificates(agent.id) == []


def test_a_viewer_sees_the_agent_but_cannot_approve_revoke_or_purge_it(ui: TestClient, services: Services) -> None:
    pending = enroll(ui, services, hostname="web-01")
    approved = enroll(ui, services, hostname="web-02")
    services.agents.approve(Actor.cli(), str(approved.id))
    csrf = sign_in(ui, "vera")
    page = ui.get(f"/ui/devices/{approved.id}").text
    assert approved.machine_id and approved.machine_id in page
    assert "/revoke" not in page and "/purge" not in page and 'name="hostname"' not in page
    assert ui.post(f"/ui/devices/{pending.id}/approve", data={"csrf": csrf, "hostname": ""}).status_code == 403
    assert ui.post(f"/ui/devices/{pending.id}/reject", data={"csrf": csrf}).status_code == 403
    for target in (pending, approved):
        assert ui.post(f"/ui/agents/{target.id}/revoke", data={"csrf": csrf}).status_code == 403
        assert ui.post(f"/ui/agents/{target.id}/purge", data={"csrf": csrf}).status_code == 403
    assert services.agents.resolve(str(pending.id)).status == "pending"
    assert services.agents.resolve(str(approved.id)).status == "approved"
    assert all(c.revoked_at is None for c in services.agents.certificates(approved.id))


def test_an_agent_rejected_while_pending_can_still_be_approved(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services, hostname="web-01")
    csrf = sign_in(ui, "oscar")
    r = ui.post(f"/ui/devices/{agent.id}/reject", data={"csrf": csrf, "notes": "not yet"}, headers=HX)
    assert r.status_code == 200 and "Rejected" in r.text
    assert services.agents.resolve(str(agent.id)).status == "rejected"
    assert "Re-approve…" in ui.get("/ui/devices?status=rejected").text
    page = ui.get(f"/ui/devices/{agent.id}").text
    assert "Re-approve" in page and "it can still be approved" in page
    done = ui.post(f"/ui/devices/{agent.id}/approve", data={"csrf": csrf, "hostname": "web-09"}, follow_redirects=False)
    assert done.status_code == 303
    assert services.agents.resolve(str(agent.id)).hostname == "web-09"
    assert len(services.agents.certificates(agent.id)) == 1


def test_revoke_and_purge_need_the_csrf_token(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services)
    services.agents.approve(Actor.cli(), str(agent.id))
    sign_in(ui, "oscar")
    assert ui.post(f"/ui/agents/{agent.id}/revoke", data={}).status_code == 403
    assert ui.post(f"/ui/agents/{agent.id}/purge", data={"csrf": "0" * 64}).status_code == 403
    assert services.agents.resolve(str(agent.id)).status == "approved"


def test_revoke_revokes_every_certificate(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services, hostname="web-01")
    services.agents.approve(Actor.cli(), str(agent.id))
    csrf = sign_in(ui, "oscar")
    r = ui.post(f"/ui/agents/{agent.id}/revoke", data={"csrf": csrf}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, f"/ui/devices/{agent.id}")
    revoked = services.agents.resolve(str(agent.id))
    assert (revoked.status, revoked.rejected_by) == ("rejected", "oscar")
    certificates = services.agents.certificates(agent.id)
    assert certificates and all(c.revoked_at is not None and c.revoked_by == "oscar" for c in certificates)
    page = ui.get(f"/ui/devices/{agent.id}").text
    assert "Revoked: its certificates are refused" in page  # the one-time notice
    assert ">Revoked</span>" in page and "/revoke" not in page
    # Its enrollment is spent: no re-approval, purging lets the host start over.
    assert 'name="hostname"' not in page and "cannot be approved again" in page
    rejected_tab = ui.get("/ui/devices?status=rejected").text
    assert f'id="device-{agent.id}"' in rejected_tab and "Re-approve…" not in rejected_tab
    # Revoking again is refused as a conflict, shown as a page.
    again = ui.post(f"/ui/agents/{agent.id}/revoke", data={"csrf": csrf})
    assert again.status_code == 409 and "only an approved agent can be revoked" in again.text


def test_purge_removes_the_agent_and_revokes_its_certificates(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services, hostname="web-01")
    services.agents.approve(Actor.cli(), str(agent.id))
    csrf = sign_in(ui, "oscar")
    r = ui.post(f"/ui/agents/{agent.id}/purge", data={"csrf": csrf}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/devices?status=approved")
    with pytest.raises(NotFound):
        services.agents.resolve(str(agent.id))
    listed = ui.get("/ui/devices?status=all").text
    assert "Purged web-01" in listed
    assert agent.machine_id and agent.machine_id not in listed
    actions = [e.action for e in services.audit.list(AuditQuery(device_id=agent.id, limit=50))[0]]
    assert "purge" in actions and "cert_revoke" in actions
    # A second click (another tab) lands on the list rather than an error.
    assert ui.post(f"/ui/agents/{agent.id}/purge", data={"csrf": csrf}, follow_redirects=False).status_code == 303
    assert ui.get(f"/ui/devices/{agent.id}").status_code == 404


def test_the_agent_page_shows_its_last_check_in(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services, hostname="web-01")
    services.agents.approve(Actor.cli(), str(agent.id))
    set_facts(services, agent.id, {**agent.facts, "host": HOST_FACTS, "host_at": "2030-01-01T10:00:00+00:00"})
    sign_in(ui, "vera")
    page = ui.get(f"/ui/devices/{agent.id}").text
    assert "Intel(R) Xeon(R) E-2276G CPU @ 3.80GHz · 12 CPUs" in page
    assert "32 GiB" in page
    assert "nvme0n1" in page and "477 GiB" in page and "SSD" in page and "Samsung 970" in page
    assert "eno1" in page and "3c:ec:ef:00:11:22" in page and "1,000 Mb/s" in page
    assert "2030-01-01 10:00:00 UTC" in page
    row = ui.get("/ui/devices?status=approved").text
    assert "12 CPUs" in row


def test_facts_of_any_shape_do_not_break_the_pages(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services)
    odd = {"cpu": "fast", "memory": [1], "disks": {"a": 1}, "nics": [None, 3, {"name": 7, "speed_mbps": True}]}
    set_facts(services, agent.id, {"hostname": ["x"], "os": "linux", "ip_addresses": "10.0.0.1", "host": odd})
    sign_in(ui, "oscar")
    assert ui.get("/ui/devices").status_code == 200
    page = ui.get(f"/ui/devices/{agent.id}")
    assert page.status_code == 200 and "Last check-in" in page.text


def test_hostile_values_a_host_reported_are_escaped(ui: TestClient, services: Services) -> None:
    agent = enroll(ui, services, hostname="web-01")
    hostile_os = "<script>window.pwned=1</script>"
    hostile_cpu = "<img src=x onerror=window.pwned=2>"
    hostile_nic = '"><svg onload=window.pwned=3>'
    facts = {
        **agent.facts,
        "os": {"id": hostile_os, "version": "12", "kernel": "</td><b>k</b>"},
        "host": {"cpu": {"model": hostile_cpu, "logical_cpus": 2}, "nics": [{"name": hostile_nic}], "disks": []},
    }
    set_facts(services, agent.id, facts)
    sign_in(ui, "oscar")
    for url in ("/ui/devices", f"/ui/devices/{agent.id}", f"/ui/devices/{agent.id}/row?editor=1"):
        text = ui.get(url).text
        for hostile in (hostile_os, hostile_cpu, hostile_nic, "<b>k</b>"):
            assert hostile not in text, (url, hostile)
        assert "<script>" not in text and "<img" not in text and "<svg onload" not in text and "<b>" not in text
    detail = ui.get(f"/ui/devices/{agent.id}").text
    assert html.escape(hostile_os, quote=False) in detail
    assert html.escape(hostile_cpu, quote=False) in detail


def test_bulk_approval_takes_agents_without_an_address(ui: TestClient, services: Services) -> None:
    talos = services.devices.create(Actor.system(), DeviceChanges(mac_address=MAC))
    agent = enroll(ui, services, hostname="web-01")
    csrf = sign_in(ui, "oscar")
    ids = [str(talos.id), str(agent.id)]
    form = {"csrf": csrf, "ids": ids, "hostname_pattern": "node-{n:02d}", "action": "preview"}
    preview = ui.post("/ui/devices/bulk", data=form)
    assert preview.status_code == 200, preview.text
    fingerprint = re.search(r'name="fingerprint" value="([0-9a-f]{64})"', preview.text)
    assert fingerprint and "kind-agent" in preview.text and ">None<" not in preview.text
    done = ui.post(
        "/ui/devices/bulk/approve",
        data={**form, "fingerprint": fingerprint.group(1), "ip_range": "", "role": ""},
        follow_redirects=False,
    )
    assert done.status_code == 303, done.text
    assert services.agents.resolve(str(agent.id)).status == "approved"
    assert len(services.agents.certificates(agent.id)) == 1
    assert services.devices.get(talos.id).status == "approved"


def test_the_install_page_shows_the_fingerprint_and_the_commands(ui: TestClient, services: Services) -> None:
    sign_in(ui, "vera")  # reading it needs no more than a viewer
    r = ui.get("/ui/agents/install")
    assert r.status_code == 200
    fingerprint = services.authority.fingerprint()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert f'<code id="ca-fingerprint" class="copy-text">{fingerprint}</code>' in r.text
    command = f"ktizo-agent --enroll http://testserver --ca-fingerprint {fingerprint}"
    assert f'<code id="enroll-command" class="copy-text">{command}</code>' in r.text
    assert "pip install ./agent" in r.text and "pip wheel --no-deps -w dist ./agent" in r.text
    assert 'href="http://testserver/api/v1/pki/ca.pem"' in r.text
    assert r.text.count("data-copy=") >= 3
    assert 'href="/ui/agents/install" aria-current="page"' in r.text  # the nav entry
    assert ui.get("/ui/agents", follow_redirects=False).headers["location"] == "/ui/agents/install"
    assert 'href="/ui/agents/install"' in ui.get("/ui/devices").text  # and from the device list


def test_the_install_page_uses_the_public_url(settings: Settings, services: Services, people: dict[str, str]) -> None:
    from ktizo.app import create_app

    public = settings.model_copy(update={"public_url": "https://ktizo.example.com/"})
    with TestClient(create_app(public, services), base_url="https://10.0.0.1:8000") as c:
        sign_in(c, "alice")
        text = c.get("/ui/agents/install").text
    fingerprint = services.authority.fingerprint()
    assert f"ktizo-agent --enroll https://ktizo.example.com --ca-fingerprint {fingerprint}" in text
    assert "https://ktizo.example.com/api/v1/pki/ca.pem" in text and "10.0.0.1" not in text
    assert "KTIZO_PUBLIC_URL" not in text
