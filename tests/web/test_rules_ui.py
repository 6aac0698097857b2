"""The Rules page, without a browser: the list shows rules in the order they are tried (what each matches and sets
in words, decided of maxCount, revision, last author); an operator creates and changes a rule by posting its YAML
document (the flash says created/configured with the diff), a refused document comes back with the error naming
the document and the field and the text as typed, a rule changed meanwhile is not silently overwritten; a rule's
page shows its dry run (the pending machines it would take, the hostnames and addresses they would get, how many
it passes over, a note when it is disabled); an operator deletes it. Viewers read everything and get no form; their
POSTs are refused (403). In Chromium: an operator types a rule into the textarea, sees it listed and opens its
dry run."""

from __future__ import annotations

import html
import re

import pytest
from fastapi.testclient import TestClient
from playwright.sync_api import Page, expect

from ktizo.domain.errors import NotFound
from ktizo.domain.users import UserRole
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.web.rules import NEW_RULE
from tests.factories import next_mac, pending
from tests.web.conftest import Live, login, screenshot
from tests.web.test_agents_web import sign_in

OPERATOR = Actor.user("oscar", UserRole.OPERATOR)
LAB = {
    "priority": 20,
    "match": {"macPrefix": "52:54:00", "sourceSubnet": "10.0.5.0/24"},
    "action": "approve",
    "role": "worker",
    "hostnamePattern": "lab-{n:02d}",
    "ipRange": "10.0.5.100-10.0.5.150/24",
    "labels": {"rack": "a"},
    "maxCount": 40,
}
DOCUMENT = """apiVersion: ktizo.dev/v1
kind: Rule
metadata:
  name: rack-b
spec:
  priority: 50
  match:
    sourceSubnet: 10.0.6.0/24
    door: [config, ipxe]
  action: approve
  hostnamePattern: "b-{n:03d}"
  labels: {rack: b}
"""


@pytest.fixture
def ui(client: TestClient, people: dict[str, str]) -> TestClient:
    return client


def text_of(body: str) -> str:
    """The page as a person reads it: tags dropped, entities decoded, spaces collapsed."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


def textarea(body: str) -> str:
    found = re.search(r'<textarea id="rule-document"[^>]*>(.*?)</textarea>', body, re.S)
    assert found, "no rule form"
    return html.unescape(found.group(1))


def hidden(body: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', body)
    assert found, name
    return html.unescape(found.group(1))


def row(body: str, name: str) -> str:
    found = re.search(rf'<tr id="rule-{re.escape(name)}">.*?</tr>', body, re.S)
    assert found, name
    return text_of(found.group(0))


def post_rule(ui: TestClient, csrf: str, document: str, **fields: str) -> object:
    return ui.post("/ui/rules", data={"csrf": csrf, "document": document, **fields}, follow_redirects=False)


def test_the_list_shows_the_rules_in_the_order_they_are_tried(ui: TestClient, services: Services) -> None:
    services.rules.apply(OPERATOR, "lab", LAB)
    services.rules.apply(OPERATOR, "zz-reject", {"priority": 5, "match": {"door": "dhcp"}, "action": "reject"})
    services.rules.apply(OPERATOR, "anything", {"enabled": False, "action": "approve"})
    sign_in(ui, "vera")
    r = ui.get("/ui/rules")
    assert r.status_code == 200
    assert 'href="/ui/rules" aria-current="page"' in r.text  # the nav entry
    order = re.findall(r'<tr id="rule-([a-z0-9._-]+)">', r.text)
    assert order == ["zz-reject", "lab", "anything"]  # priority, then name
    lab = row(r.text, "lab")
    assert "20" in lab and "approve" in lab
    assert "MAC starts with 52:54:00" in lab and "knocks from 10.0.5.0/24" in lab
    assert "role worker" in lab and "hostname lab-{n:02d}" in lab and "address from 10.0.5.100-10.0.5.150/24" in lab
    assert "labels rack=a" in lab and "0 of 40" in lab and "oscar" in lab
    assert 'href="/ui/rules/lab"' in r.text
    reject = row(r.text, "zz-reject")
    assert "arrives by DHCP lease" in reject and "rejects them" in reject
    anything = row(r.text, "anything")
    assert "disabled" in anything and "any pending machine" in anything and "approves them as they are" in anything


def test_an_operator_creates_a_rule_by_posting_its_yaml(ui: TestClient, services: Services) -> None:
    csrf = sign_in(ui, "oscar")
    listing = ui.get("/ui/rules")
    assert "No rule yet" in listing.text
    assert textarea(listing.text) == NEW_RULE  # the new-rule template to start from
    assert hidden(listing.text, "revision") == "" and hidden(listing.text, "editing") == ""
    r = post_rule(ui, csrf, DOCUMENT)
    assert r.status_code == 303, r.text  # type: ignore[attr-defined]
    assert r.headers["location"] == "/ui/rules#rule-rack-b"  # type: ignore[attr-defined]
    rule = services.rules.get("rack-b")
    assert (rule.priority, rule.enabled, rule.action, rule.author, rule.revision) == (50, True, "approve", "oscar", 1)
    assert rule.match == {"sourceSubnet": ["10.0.6.0/24"], "door": ["config", "ipxe"]}
    assert rule.settings == {"hostnamePattern": "b-{n:03d}", "labels": {"rack": "b"}}
    page = ui.get("/ui/rules").text
    assert "Rule rack-b created." in text_of(page)  # the flash
    assert "knocks from 10.0.6.0/24" in row(page, "rack-b") and "arrives by Talos config fetch or iPXE boot" in page

    # Edit as YAML: the form holds the rule's document and its revision; the flash lists what changed.
    editing = ui.get("/ui/rules?edit=rack-b").text
    assert "Edit rule rack-b as YAML" in editing
    assert "name: rack-b" in textarea(editing) and "priority: 50" in textarea(editing)
    assert (hidden(editing, "editing"), hidden(editing, "revision")) == ("rack-b", "1")
    changed = textarea(editing).replace("priority: 50", "priority: 7")
    r = post_rule(ui, csrf, changed, editing="rack-b", revision="1")
    assert r.status_code == 303
    assert "Rule rack-b configured: ~ priority: 50 -> 7." in text_of(ui.get("/ui/rules").text)
    assert services.rules.get("rack-b").revision == 2
    r = post_rule(ui, csrf, changed, editing="rack-b", revision="2")
    assert "Rule rack-b unchanged." in text_of(ui.get("/ui/rules").text)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            DOCUMENT.replace("action: approve", "action: maybe"),
            "form: document 1 (Rule 'rack-b'): spec.action: action is approve or reject",
        ),
        (
            DOCUMENT.replace("door: [config, ipxe]", "colour: blue"),
            "form: document 1 (Rule 'rack-b'): spec.match: unknown condition 'colour'",
        ),
        (
            DOCUMENT.replace('"b-{n:03d}"', '"b-n"'),
            "form: document 1 (Rule 'rack-b'): spec.hostnamePattern: a hostname pattern holds one {n} placeholder",
        ),
        (DOCUMENT.replace("name: rack-b", "name: Rack B!"), "form: document 1 (Rule 'Rack B!'): metadata.name:"),
        (DOCUMENT.replace("  priority: 50", "priority: [50"), "form: not YAML at line"),
        (DOCUMENT.replace("kind: Rule", "kind: Site"), "this form takes a Rule document only"),
        (DOCUMENT + "---\n" + DOCUMENT.replace("rack-b", "rack-c"), "holds 2 documents; this form takes one Rule"),
        (DOCUMENT.replace("hostnamePattern", "role: controlplane\n  hostnamePattern"), "must be written by an admin"),
        ("   \n", "paste or type a Rule document"),
    ],
)
def test_a_refused_document_shows_the_error_and_keeps_the_text(
    ui: TestClient, services: Services, document: str, message: str
) -> None:
    csrf = sign_in(ui, "oscar")
    r = post_rule(ui, csrf, document)
    assert r.status_code == 422  # type: ignore[attr-defined]
    body: str = r.text  # type: ignore[attr-defined]
    error = re.search(r'<p class="field-error" id="rule-document-error"[^>]*>(.*?)</p>', body, re.S)
    assert error and message in text_of(error.group(1))
    assert textarea(body) == document  # exactly as typed
    assert '<details class="card" id="edit-rule" open>' in body
    assert services.rules.list() == []  # nothing applied


def test_a_rule_changed_meanwhile_is_not_silently_overwritten(ui: TestClient, services: Services) -> None:
    services.rules.apply(OPERATOR, "lab", LAB)
    csrf = sign_in(ui, "oscar")
    drawn = ui.get("/ui/rules/lab").text  # the rule's page holds the same form, at revision 1
    assert (hidden(drawn, "editing"), hidden(drawn, "revision"), hidden(drawn, "origin")) == ("lab", "1", "detail")
    services.rules.apply(Actor.user("alice", UserRole.ADMIN), "lab", {**LAB, "priority": 30})  # someone else
    mine = textarea(drawn).replace("maxCount: 40", "maxCount: 10")
    r = post_rule(ui, csrf, mine, editing="lab", revision="1", origin="detail")
    assert r.status_code == 422  # type: ignore[attr-defined]
    body: str = r.text  # type: ignore[attr-defined]
    assert "rule lab was changed since this form was opened (revision 1; now 2, by alice)" in text_of(body)
    assert textarea(body) == mine and hidden(body, "revision") == "2"
    assert "Dry run" in body  # back on the rule's page
    assert services.rules.get("lab").max_count == 40
    r = post_rule(ui, csrf, mine, editing="lab", revision="2", origin="detail")  # knowingly, this time
    assert r.status_code == 303 and r.headers["location"] == "/ui/rules/lab"  # type: ignore[attr-defined]
    assert services.rules.get("lab").max_count == 10 and services.rules.get("lab").priority == 20

    # The new-rule form does not replace an existing rule of the same name without asking either.
    r = post_rule(ui, csrf, DOCUMENT.replace("rack-b", "lab"))
    assert r.status_code == 422  # type: ignore[attr-defined]
    assert "a rule named lab exists already (revision 3, by oscar)" in text_of(r.text)  # type: ignore[attr-defined]
    assert services.rules.get("lab").revision == 3


def test_a_viewer_reads_without_a_form_and_cannot_post(ui: TestClient, services: Services) -> None:
    services.rules.apply(OPERATOR, "lab", LAB)
    csrf = sign_in(ui, "vera")
    listing = ui.get("/ui/rules").text
    assert "lab" in row(listing, "lab")
    assert "<textarea" not in listing and 'action="/ui/rules"' not in listing and "Edit as YAML" not in listing
    detail = ui.get("/ui/rules/lab").text
    assert "<textarea" not in detail and "/delete" not in detail
    yaml_shown = re.search(r'<pre class="config" id="rule-yaml">(.*?)</pre>', detail, re.S)
    assert yaml_shown and "kind: Rule" in html.unescape(yaml_shown.group(1))
    assert "hostnamePattern: lab-{n:02d}" in html.unescape(yaml_shown.group(1))
    r = post_rule(ui, csrf, DOCUMENT)
    assert r.status_code == 403  # type: ignore[attr-defined]
    r = ui.post("/ui/rules/lab/delete", data={"csrf": csrf}, follow_redirects=False)
    assert r.status_code == 403
    assert [x.name for x in services.rules.list()] == ["lab"]
    # Without the session's CSRF token even an operator is refused.
    sign_in(ui, "oscar")
    assert post_rule(ui, "0" * 64, DOCUMENT).status_code == 403  # type: ignore[attr-defined]


def test_the_dry_run_lists_the_pending_machines_and_what_each_would_get(ui: TestClient, services: Services) -> None:
    first = pending(services, "52:54:00:aa:00:01", source_ip="10.0.5.17")
    second = pending(services, "52:54:00:aa:00:02", source_ip="10.0.5.18")
    pending(services, next_mac(), source_ip="10.9.9.9")  # another subnet: passed over
    services.rules.apply(OPERATOR, "lab", LAB)  # after they knocked: it takes them at their next knock
    sign_in(ui, "vera")
    r = ui.get("/ui/rules/lab")
    assert r.status_code == 200
    page = text_of(r.text)
    assert "It would approve 2 machines" in page and "passes over 1 pending machine that does not match" in page
    assert "Room left under maxCount: 40" in page and "This rule is disabled" not in page
    one = re.search(rf'<tr id="dry-run-{first.id}">.*?</tr>', r.text, re.S)
    assert one and f'href="/ui/devices/{first.id}"' in one.group(0)
    assert "52:54:00:aa:00:01 lab-01 10.0.5.100/24 worker rack=a would approve" in text_of(one.group(0))
    two = re.search(rf'<tr id="dry-run-{second.id}">.*?</tr>', r.text, re.S)
    assert two and "52:54:00:aa:00:02 lab-02 10.0.5.101/24" in text_of(two.group(0))
    assert services.devices.get(first.id).status == "pending"  # a dry run decides nothing

    services.rules.apply(OPERATOR, "lab", {**LAB, "enabled": False, "maxCount": 1})
    page = text_of(ui.get("/ui/rules/lab").text)
    assert "This rule is disabled: it decides nothing until enabled" in page
    assert "It would approve 1 machine." in page and "lab-01" in page and "lab-02" not in page


def test_an_operator_deletes_a_rule(ui: TestClient, services: Services) -> None:
    services.rules.apply(OPERATOR, "lab", LAB)
    csrf = sign_in(ui, "oscar")
    detail = ui.get("/ui/rules/lab").text
    assert 'action="/ui/rules/lab/delete" data-confirm="Delete rule lab?' in detail
    r = ui.post("/ui/rules/lab/delete", data={"csrf": csrf}, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/rules")
    with pytest.raises(NotFound):
        services.rules.get("lab")
    listing = ui.get("/ui/rules").text
    assert "Deleted rule lab" in text_of(listing) and 'id="rule-lab"' not in listing
    again = ui.post("/ui/rules/lab/delete", data={"csrf": csrf}, follow_redirects=False)
    assert (again.status_code, again.headers["location"]) == (303, "/ui/rules")  # a second click
    missing = ui.get("/ui/rules/lab")
    assert missing.status_code == 404 and "no rule named" in html.unescape(missing.text)


# -- in a browser ------------------------------------------------------------------------------------------


def test_an_operator_writes_a_rule_in_the_browser_and_opens_its_dry_run(
    page: Page, live: Live, people: dict[str, str]
) -> None:
    waiting = pending(live.services, "52:54:00:bb:00:01", source_ip="10.0.7.21")
    login(page, people["operator"])
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Rules").click()
    expect(page.get_by_role("heading", name="Rules", exact=True)).to_be_visible()
    document = page.get_by_label("Rule document (YAML)")
    expect(document).to_have_value(NEW_RULE)  # the template to start from
    document.fill(DOCUMENT.replace("10.0.6.0/24", "10.0.7.0/24").replace("kind: Rule", "kind: Site"))
    page.get_by_role("button", name="Apply rule").click()
    expect(page.locator("#rule-document-error")).to_contain_text("this form takes a Rule document only")
    typed = document.input_value()
    assert "kind: Site" in typed  # kept as typed
    document.fill(typed.replace("kind: Site", "kind: Rule").replace("    door: [config, ipxe]\n", ""))
    page.get_by_role("button", name="Apply rule").click()
    expect(page.locator(".flash")).to_contain_text("Rule rack-b created.")
    listed = page.locator("#rule-rack-b")
    expect(listed).to_contain_text("knocks from 10.0.7.0/24")
    expect(listed).to_contain_text("hostname b-{n:03d}")
    screenshot(page, "rules.png")

    listed.get_by_role("link", name="rack-b").click()
    expect(page.get_by_role("heading", name="Rule rack-b")).to_be_visible()
    expect(page.locator("#dry-run-summary")).to_contain_text("It would approve 1 machine.")
    machine = page.locator(f"#dry-run-{waiting.id}")
    expect(machine).to_contain_text("52:54:00:bb:00:01")
    expect(machine).to_contain_text("b-001")
    expect(machine).to_contain_text("rack=b")
    screenshot(page, "rule-dry-run.png")
    machine.get_by_role("link", name="52:54:00:bb:00:01").click()
    expect(page).to_have_url(f"{live.url}/ui/devices/{waiting.id}")
    assert live.services.devices.get(waiting.id).status == "pending"  # the dry run decided nothing
