"""Sites and the collision gate in the UI, without a browser: an admin creates a site through the form (a refused
value comes back next to its field), rotates its key (shown once, in that answer only; afterwards only its
fingerprint), edits and deletes it; the installer one-liner carries the site code and the CA pin but never a key;
enrollments are counted by key version and filtered; a claim held at the collision gate shows up on the device
list and each of its three resolutions works. Operators and viewers cannot change sites (403), viewers cannot
resolve collisions; whatever a host or an admin typed is shown as text."""

from __future__ import annotations

import html
import re
import secrets
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ktizo.domain.errors import NotFound
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from tests.agents.test_zero_touch import zt_body
from tests.web.test_agents_web import sign_in

CEK = re.compile(r"cek_[A-Za-z0-9_-]{20,}")


@pytest.fixture
def zt(make_client: Any, people: dict[str, str]) -> tuple[TestClient, Services]:
    """The UI over an app with no new-machine budget, so the zero-touch door takes every test enrollment."""
    return make_client(new_devices_per_minute=0)  # type: ignore[no-any-return]


def make_site(services: Services, code: str = "fra1", **kwargs: Any) -> str:
    services.sites.create(Actor.cli(), code, name=kwargs.pop("name", code.upper()), **kwargs)
    return services.sites.rotate_key(Actor.cli(), code)[0]


def enroll(c: TestClient, code: str, key: str, uid: str | None = None, **over: Any) -> dict[str, Any]:
    r = c.post("/api/enroll", json=zt_body(code, key, uid, **over))
    assert r.status_code in (201, 202), r.text
    out: dict[str, Any] = r.json()
    return out


def collide(c: TestClient, services: Services) -> tuple[dict[str, Any], str]:
    """An active agent web-01, and a second claim on its machine_uid (no proof) held at the gate."""
    key = make_site(services)
    uid = secrets.token_hex(32)
    first = enroll(c, "fra1", key, uid)
    assert first["enrollment_state"] == "active"
    held = enroll(c, "fra1", key, uid, hostname="web-02")
    assert held["enrollment_state"] == "pending" and len(services.zero_touch.collisions()) == 1
    return first, held["polling_token"]


def code_block(page: str, element_id: str) -> str:
    found = re.search(rf'<code id="{element_id}" class="copy-text">(.*?)</code>', page, re.S)
    assert found, element_id
    return html.unescape(found.group(1))


# -- creating, editing, deleting ---------------------------------------------------------------------------


def test_an_admin_creates_a_site_through_the_form(zt: Any) -> None:
    c, services = zt
    csrf = sign_in(c, "alice")
    listing = c.get("/ui/sites")
    assert listing.status_code == 200
    assert 'href="/ui/sites" aria-current="page"' in listing.text  # the nav entry
    assert 'action="/ui/sites"' in listing.text and "No site yet." in listing.text
    form = {"csrf": csrf, "site_code": "FRA1", "name": "Frankfurt", "enrollment_policy": "manual"}
    r = c.post("/ui/sites", data={**form, "max_pending": "5", "max_agents": ""}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/sites/fra1")
    site = services.sites.get("fra1")
    assert (site.name, site.enrollment_policy, site.max_pending, site.max_agents) == ("Frankfurt", "manual", 5, None)
    page = c.get("/ui/sites/fra1").text
    assert "Created site fra1" in page and "No key yet." in page and "Make the first key" in page
    row = re.search(r'<tr id="site-\d+">.*?</tr>', c.get("/ui/sites").text, re.S)
    assert row and 'href="/ui/sites/fra1"' in row.group(0) and "no key" in row.group(0)
    assert "Frankfurt" in row.group(0) and "manual" in row.group(0) and "5 pending" in row.group(0)


def test_a_bad_code_or_limit_comes_back_next_to_its_field(zt: Any) -> None:
    c, services = zt
    csrf = sign_in(c, "alice")
    r = c.post("/ui/sites", data={"csrf": csrf, "site_code": "Not a code!", "enrollment_policy": "auto-approve"})
    assert r.status_code == 422
    error = re.search(r'<p class="field-error" id="site-code-error">(.*?)</p>', r.text, re.S)
    assert error and "a site code is 1-64 lower-case letters" in error.group(1)
    assert 'value="Not a code!"' in r.text  # what was typed stays
    assert "<details" in r.text and 'id="new-site" open' in r.text
    r = c.post("/ui/sites", data={"csrf": csrf, "site_code": "fra1", "max_agents": "lots"})
    assert r.status_code == 422 and 'id="site-max-agents-error"' in r.text
    with pytest.raises(NotFound):
        services.sites.get("fra1")
    services.sites.create(Actor.cli(), "fra1")
    taken = c.post("/ui/sites", data={"csrf": csrf, "site_code": "fra1", "enrollment_policy": "manual"})
    assert taken.status_code == 422
    error = re.search(r'<p class="field-error" id="site-code-error">(.*?)</p>', taken.text, re.S)
    assert error and "a site &#39;fra1&#39; exists" in error.group(1)


def test_an_admin_edits_and_deletes_a_site(zt: Any) -> None:
    c, services = zt
    key = make_site(services, max_agents=3)
    agent = enroll(c, "fra1", key)
    csrf = sign_in(c, "alice")
    form = {"csrf": csrf, "name": "Frankfurt 1", "enrollment_policy": "manual", "max_pending": "2", "max_agents": ""}
    r = c.post("/ui/sites/fra1/edit", data=form, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/sites/fra1")
    site = services.sites.get("fra1")
    assert (site.name, site.enrollment_policy, site.max_pending, site.max_agents) == ("Frankfurt 1", "manual", 2, None)
    bad = c.post("/ui/sites/fra1/edit", data={**form, "max_pending": "-1"})
    assert bad.status_code == 422 and 'id="edit-max-pending-error"' in bad.text and 'id="edit-site" open' in bad.text
    r = c.post("/ui/sites/fra1/delete", data={"csrf": csrf}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/sites")
    assert "Deleted site fra1" in c.get("/ui/sites").text
    with pytest.raises(NotFound):
        services.sites.get("fra1")
    assert services.agents.resolve(str(agent["agent_id"])).status == "approved"  # its agents stay
    assert c.get("/ui/sites/fra1").status_code == 404
    # A second click lands on the list.
    assert c.post("/ui/sites/fra1/delete", data={"csrf": csrf}, follow_redirects=False).status_code == 303


@pytest.mark.parametrize("who", ["oscar", "vera"])
def test_operators_and_viewers_cannot_create_edit_rotate_or_delete(zt: Any, who: str) -> None:
    c, services = zt
    make_site(services)
    csrf = sign_in(c, who)
    listing = c.get("/ui/sites").text
    assert "fra1" in listing and 'action="/ui/sites"' not in listing and "New site" not in listing
    page = c.get("/ui/sites/fra1").text
    assert "v1 (" in page and '<form method="post"' not in page.split("</header>", 1)[1]
    assert "/rotate" not in page and "/delete" not in page and "/edit" not in page
    posts = {
        "/ui/sites": {"site_code": "ams1"},
        "/ui/sites/fra1/rotate": {},
        "/ui/sites/fra1/edit": {"name": "x", "enrollment_policy": "manual"},
        "/ui/sites/fra1/delete": {},
    }
    for url, data in posts.items():
        assert c.post(url, data={"csrf": csrf, **data}).status_code == 403, url
        assert c.post(url, data=data).status_code == 403, url  # and without the token
    assert [s.site_code for s in services.sites.list()] == ["fra1"]
    assert [k.version for k in services.sites.keys("fra1")] == [1]
    assert services.sites.get("fra1").enrollment_policy == "auto-approve"


# -- the key -----------------------------------------------------------------------------------------------


def test_rotating_shows_the_key_once_and_then_only_its_fingerprint(zt: Any) -> None:
    c, services = zt
    services.sites.create(Actor.cli(), "fra1")
    csrf = sign_in(c, "alice")
    r = c.post("/ui/sites/fra1/rotate", data={"csrf": csrf, "expires_days": "30", "max_uses": "10"})
    assert r.status_code == 200
    keys = set(CEK.findall(r.text))
    assert len(keys) == 1
    [key] = keys
    assert f'id="secret-value" class="mono secret" readonly value="{key}"' in r.text
    assert "Shown once." in r.text and 'data-copy="#secret-value"' in r.text
    assert r.headers["cache-control"] == "no-store"
    assert key not in str(r.headers)  # not in a cookie, a redirect or any other header
    info = services.sites.active_key("fra1")
    assert info is not None and (info.version, info.max_uses, info.expires_at is not None) == (1, 10, True)
    assert info.fingerprint in r.text
    # The key opens the door: it is the real one.
    assert enroll(c, "fra1", key)["enrollment_state"] == "active"

    page = c.get("/ui/sites/fra1")
    assert key not in page.text and "cek_" not in page.text
    assert f'<dd class="mono" id="key-fingerprint">{info.fingerprint}</dd>' in page.text
    assert "1 of 10" in page.text and "in 30 d" in page.text
    assert "Rotate key" in page.text and "data-confirm=" in page.text

    again = c.post("/ui/sites/fra1/rotate", data={"csrf": csrf})
    [second] = set(CEK.findall(again.text))
    assert second != key
    history = c.get("/ui/sites/fra1").text
    assert "cek_" not in history
    table = re.search(r'<table class="plain site-keys">.*?</table>', history, re.S)
    assert table
    rows = re.findall(r"<tr>.*?</tr>", table.group(0), re.S)[1:]
    assert len(rows) == 2 and "v2 (" in rows[0] and ">Active<" in rows[0]
    assert info.fingerprint in rows[1] and "rotated away" in rows[1]
    assert "v2 (" in c.get("/ui/sites").text  # the list shows the active fingerprint


def test_a_bad_expiry_or_use_count_is_refused_next_to_its_field(zt: Any) -> None:
    c, services = zt
    services.sites.create(Actor.cli(), "fra1")
    csrf = sign_in(c, "alice")
    r = c.post("/ui/sites/fra1/rotate", data={"csrf": csrf, "expires_days": "0", "max_uses": "many"})
    assert r.status_code == 422
    assert 'id="rotate-days-error"' in r.text and 'id="rotate-uses-error"' in r.text
    assert "cek_" not in r.text and services.sites.keys("fra1") == []


def test_the_installer_one_liner_has_the_site_and_the_ca_pin_but_no_key(zt: Any) -> None:
    c, services = zt
    key = make_site(services)
    sign_in(c, "vera")  # reading it needs no more than a viewer
    page = c.get("/ui/sites/fra1").text
    fingerprint = services.authority.fingerprint()
    command = code_block(page, "install-command")
    assert command == (
        "pip install ./agent && ktizo-agent --enroll http://testserver --site fra1 "
        f"--enrollment-key-file /root/ktizo.key --ca-fingerprint {fingerprint}"
    )
    assert key not in page and "cek_" not in page
    assert 'data-copy="#install-command"' in page


def test_the_one_liner_uses_the_public_url(make_client: Any, people: dict[str, str]) -> None:
    c, services = make_client(public_url="https://ktizo.example.com/")
    c.base_url = "https://10.0.0.1:8000"  # a Secure session cookie goes over https only
    make_site(services)
    sign_in(c, "alice")
    command = code_block(c.get("/ui/sites/fra1").text, "install-command")
    assert "--enroll https://ktizo.example.com --site fra1 " in command and "10.0.0.1" not in command


# -- who enrolled with which key ---------------------------------------------------------------------------


def test_enrollments_are_counted_by_key_version_and_filtered(zt: Any) -> None:
    c, services = zt
    v1 = make_site(services)
    a = enroll(c, "fra1", v1, hostname="web-01")
    v2, _ = services.sites.rotate_key(Actor.cli(), "fra1")
    b = enroll(c, "fra1", v2, hostname="web-02")
    d = enroll(c, "fra1", v2, hostname="web-03")
    sign_in(c, "vera")
    page = c.get("/ui/sites/fra1").text
    table = re.search(r'<table class="plain by-version">.*?</table>', page, re.S)
    assert table
    counts = re.findall(r"<tr>\s*<td>v(\d+)</td>\s*<td>(\d+)</td>", table.group(0))
    assert counts == [("2", "2"), ("1", "1")]
    agents = re.search(r'<table class="plain site-agents".*?</table>', page, re.S)
    assert agents and all(f'href="/ui/devices/{x["agent_id"]}"' in agents.group(0) for x in (a, b, d))

    only_v2 = c.get("/ui/sites/fra1", params={"version": "2"}).text
    listed = re.search(r'<table class="plain site-agents".*?</table>', only_v2, re.S)
    assert listed
    assert f'href="/ui/devices/{b["agent_id"]}"' in listed.group(0)
    assert f'href="/ui/devices/{d["agent_id"]}"' in listed.group(0)
    assert f'href="/ui/devices/{a["agent_id"]}"' not in listed.group(0)
    assert 'href="/ui/sites/fra1?version=2#enrollments"' in page  # the count links to its list

    later = c.get("/ui/sites/fra1", params={"version": "2", "after": "2999-01-01"}).text
    assert "No agent of this site matches." in later
    today = services.agents.resolve(str(a["agent_id"])).first_seen.date().isoformat()
    since = c.get("/ui/sites/fra1", params={"after": today}).text
    assert all(f'href="/ui/devices/{x["agent_id"]}"' in since for x in (a, b, d))
    bad = c.get("/ui/sites/fra1", params={"version": "x", "after": "31/12/2030"})
    assert bad.status_code == 200
    assert 'id="filter-version-error"' in bad.text and 'id="filter-after-error"' in bad.text

    # The agent's own page names its site and key version.
    detail = c.get(f"/ui/devices/{a['agent_id']}").text
    assert '<a class="mono" href="/ui/sites/fra1">fra1</a>' in detail and "enrolled with key v1" in detail
    assert "machine-uid" in detail


def test_hostile_site_names_and_claims_are_escaped(zt: Any) -> None:
    c, services = zt
    services.sites.create(Actor.cli(), "fra1", name="<script>window.pwned=1</script>")
    key = services.sites.rotate_key(Actor.cli(), "fra1")[0]
    uid = secrets.token_hex(32)
    enroll(c, "fra1", key, uid)
    hostile_os = {"id": "<img src=x onerror=window.pwned=2>", "version": "12", "kernel": "</td><b>k</b>"}
    assert enroll(c, "fra1", key, uid, hostname="web-09", os=hostile_os)["enrollment_state"] == "pending"
    sign_in(c, "oscar")
    for url in ("/ui/sites", "/ui/sites/fra1", "/ui/collisions"):
        text = c.get(url).text
        assert "<script>window" not in text and "<img" not in text and "<b>k</b>" not in text, url
    assert html.escape("<img src=x onerror=window.pwned=2>", quote=False) in c.get("/ui/collisions").text


# -- the collision gate ------------------------------------------------------------------------------------


def test_a_collision_shows_on_the_device_list_and_its_page(zt: Any) -> None:
    c, services = zt
    sign_in(c, "vera")
    assert "collision gate" not in c.get("/ui/devices").text
    first, _token = collide(c, services)
    listing = c.get("/ui/devices").text
    assert re.search(r'<a href="/ui/collisions">1 enrollment held at the collision gate</a>', listing)
    assert "1 enrollment held at the collision gate" in c.get("/ui/sites").text
    page = c.get("/ui/collisions").text
    [held] = services.zero_touch.collisions()
    card = re.search(rf'<section class="card collision" id="collision-{held.enrollment_id}".*?</section>', page, re.S)
    assert card
    body = card.group(0)
    assert "web-02 claims to be web-01" in body
    assert f'href="/ui/devices/{first["agent_id"]}"' in body
    assert held.device.machine_uid and held.device.machine_uid[:16] in body
    assert "10.0.7.21" in body and "debian 12" in body and "10.0.0.9" in body  # addresses, OS, source address
    assert '<span class="mono">fra1</span> · key v1' in body
    assert "/resolve" not in page  # a viewer reads, but has no forms
    csrf = sign_in(c, "vera")
    forged = c.post(f"/ui/collisions/{held.enrollment_id}/resolve", data={"csrf": csrf, "action": "reject"})
    assert forged.status_code == 403
    assert len(services.zero_touch.collisions()) == 1


def test_rejecting_a_collision_refuses_its_poll(zt: Any) -> None:
    c, services = zt
    first, token = collide(c, services)
    [held] = services.zero_touch.collisions()
    csrf = sign_in(c, "oscar")
    page = c.get("/ui/collisions").text
    assert page.count(f'action="/ui/collisions/{held.enrollment_id}/resolve"') == 3
    assert page.count("data-confirm=") >= 3
    assert c.post(f"/ui/collisions/{held.enrollment_id}/resolve", data={"action": "reject"}).status_code == 403
    r = c.post(
        f"/ui/collisions/{held.enrollment_id}/resolve", data={"csrf": csrf, "action": "reject"}, follow_redirects=False
    )
    assert (r.status_code, r.headers["location"]) == (303, "/ui/collisions")
    assert c.get(f"/api/v1/enroll/status/{token}").status_code == 403
    after = c.get("/ui/collisions").text
    assert "Rejected the claim of web-02 on web-01" in after and "Nothing waits at the gate" in after
    assert "collision gate</a>" not in c.get("/ui/devices").text
    assert services.agents.resolve(str(first["agent_id"])).status == "approved"  # the real one is untouched
    # Deciding it again (another tab): a notice, not an error.
    again = c.post(f"/ui/collisions/{held.enrollment_id}/resolve", data={"csrf": csrf, "action": "reject"})
    assert again.status_code == 200 and "decided already?" in again.text
    huge = c.post(f"/ui/collisions/{'9' * 40}/resolve", data={"csrf": csrf, "action": "new"}, follow_redirects=False)
    assert (huge.status_code, huge.headers["location"]) == (303, "/ui/collisions")
    assert c.get("/ui/sites/" + "x" * 300).status_code == 404


def test_replacing_the_existing_agent_hands_its_record_to_the_claimant(zt: Any) -> None:
    c, services = zt
    first, token = collide(c, services)
    [held] = services.zero_touch.collisions()
    csrf = sign_in(c, "oscar")
    r = c.post(f"/ui/collisions/{held.enrollment_id}/resolve", data={"csrf": csrf, "action": "replace"})
    assert r.status_code == 200 and "web-02 replaced web-01" in r.text
    pickup = c.get(f"/api/v1/enroll/status/{token}")
    assert pickup.status_code == 200 and pickup.json()["agent_api_key"].startswith("cak_")
    agent = services.agents.resolve(str(first["agent_id"]))
    assert agent.hostname == "web-02"
    assert sum(cert.revoked_at is None for cert in services.agents.certificates(agent.id)) == 1
    assert services.zero_touch.collisions() == []


def test_approving_the_claimant_as_a_new_machine(zt: Any) -> None:
    c, services = zt
    first, token = collide(c, services)
    [held] = services.zero_touch.collisions()
    csrf = sign_in(c, "oscar")
    url = f"/ui/collisions/{held.enrollment_id}/resolve"
    bad = c.post(url, data={"csrf": csrf, "action": "new", "hostname": "not a name!"})
    assert bad.status_code == 422
    assert f'id="hostname-{held.enrollment_id}-error"' in bad.text and 'value="not a name!"' in bad.text
    assert len(services.zero_touch.collisions()) == 1
    r = c.post(url, data={"csrf": csrf, "action": "new", "hostname": "web-02b"})
    assert r.status_code == 200 and "Approved web-02b as a new machine" in r.text
    assert c.get(f"/api/v1/enroll/status/{token}").status_code == 200
    twin = next(a for a in services.agents.list() if a.id != first["agent_id"])
    assert (twin.status, twin.hostname, twin.key_version) == ("approved", "web-02b", 1)
    assert services.agents.resolve(str(first["agent_id"])).hostname == "web-01"
    assert services.zero_touch.collisions() == []
