"""Declarative state: ``ktizo apply`` / ``export`` and ``POST /api/v1/apply``: idempotence, the diff, dry runs, prune,
the export round trip, errors naming file, document and field, and nothing half-applied."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from ktizo.db.models import Event
from ktizo.domain.errors import ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.declarative import parse
from ktizo.services.devices import DeviceQuery
from ktizo.services.registry import Services
from tests.agents.support import body, machine_id
from tests.factories import next_mac, pending
from tests.support import TALOS_HEADERS, talos_url

ADMIN = Actor.user("root", UserRole.ADMIN)
UUID = "4c4c4544-0042-3510-8052-b4c04f4e3032"

STATE = """\
apiVersion: ktizo.dev/v1
kind: Site
metadata: {name: fra-1}
spec: {name: Frankfurt, enrollment_policy: manual}
---
apiVersion: ktizo.dev/v1
kind: Group
metadata: {name: rack-a}
spec:
  priority: 10
  selector: {rack: a}
  nameservers: [10.0.5.1]
---
apiVersion: ktizo.dev/v1
kind: Rule
metadata: {name: rack-a}
spec:
  priority: 10
  match: {macPrefix: "52:54:00", sourceSubnet: 10.0.5.0/24}
  action: approve
  role: worker
  hostnamePattern: "worker-{n:02d}"
  ipRange: 10.0.5.100-10.0.5.150/24
---
apiVersion: ktizo.dev/v1
kind: Webhook
metadata: {name: chat}
spec:
  url: http://127.0.0.1:9/hook
  events: [device.approved, cert.issued]
  secret: s3cr3t-s3cr3t-s3cr3t
  format: slack
---
apiVersion: ktizo.dev/v1
kind: Device
metadata: {name: node-01}
spec:
  mac_address: 52:54:00:00:00:01
  hostname: node-01
  ip_address: 10.0.5.11/24
  labels: {rack: a}
  status: approved
---
apiVersion: ktizo.dev/v1
kind: Device
metadata: {name: web-01}
spec:
  machine_id: 0123456789abcdef0123456789abcdef
  hostname: web-01
  status: approved
"""


def apply(services: Services, text: str, source: str = "state.yaml", **options: Any) -> dict[str, str]:
    report = services.declarative.apply(ADMIN, parse(text, source), **options)
    return {change.line().rsplit(" ", 1)[0]: change.result for change in report.changes}


def test_apply_creates_then_changes_nothing(services: Services) -> None:
    assert apply(services, STATE) == {
        "site/fra-1": "created",
        "group/rack-a": "created",
        "rule/rack-a": "created",
        "webhook/chat": "created",
        "device/node-01 (52:54:00:00:00:01)": "created",
        "device/web-01 (0123456789abcdef0123456789abcdef)": "created",
    }
    node = services.devices.resolve("52:54:00:00:00:01")  # an unquoted MAC is the text it looks like
    assert (node.status, node.hostname, node.ip_address, node.labels, node.approved_by) == (
        "approved",
        "node-01",
        "10.0.5.11/24",
        {"rack": "a"},
        "root",
    )
    assert services.rules.get("rack-a").settings["hostnamePattern"] == "worker-{n:02d}"
    assert services.sites.get("fra-1").enrollment_policy == "manual"
    before, _ = services.audit.list(AuditQuery(limit=1000))
    assert set(apply(services, STATE).values()) == {"unchanged"}
    after, _ = services.audit.list(AuditQuery(limit=1000))
    assert [e.action for e in after[: len(after) - len(before)]] == ["apply"]  # nothing but the apply itself


def test_export_then_apply_is_a_no_op(services: Services) -> None:
    apply(services, STATE)
    pending(services, next_mac(), source_ip="10.9.9.9")  # a machine that only knocked is exported too
    exported = yaml.dump_all(services.declarative.export(), sort_keys=False)
    assert "s3cr3t" not in exported  # secrets only with include_secrets
    result = apply(services, exported, "export.yaml")
    assert set(result.values()) == {"unchanged"}, result
    kinds = [d["kind"] for d in yaml.safe_load_all(exported)]
    assert kinds == ["Site", "Group", "Rule", "Webhook", "Device", "Device", "Device"]


def test_the_diff_names_each_changed_field(services: Services) -> None:
    apply(services, STATE)
    changed = STATE.replace("hostname: node-01", "hostname: node-02").replace("nameservers: [10.0.5.1]", "")
    report = services.declarative.apply(ADMIN, parse(changed, "state.yaml"))
    diffs = {c.line(): c.diff for c in report.changes if c.result == "configured"}
    assert diffs == {
        "group/rack-a configured": ["- nameservers: [10.0.5.1]"],
        "device/node-01 (52:54:00:00:00:01) configured": ["~ hostname: node-01 -> node-02"],
    }
    assert services.devices.resolve("52:54:00:00:00:01").hostname == "node-02"


def test_a_dry_run_shows_the_diff_and_changes_nothing(services: Services) -> None:
    apply(services, STATE)
    changed = STATE.replace("node-01", "node-09").replace("00:00:01", "00:00:02").replace("5.11/", "5.12/")
    before, _ = services.audit.list(AuditQuery(limit=1000))
    result = apply(services, changed, dry_run=True)
    assert result["device/node-09 (52:54:00:00:00:02)"] == "created"
    assert services.devices.list(DeviceQuery())[1] == 2  # still the two from the first apply
    after, _ = services.audit.list(AuditQuery(limit=1000))
    assert len(after) == len(before)


def test_prune_deletes_only_what_an_apply_made(services: Services) -> None:
    apply(services, STATE)
    knocked = pending(services, next_mac())
    only_node = STATE.split("---\n")[4]
    result = apply(services, only_node, prune=True)
    assert result == {
        "device/node-01 (52:54:00:00:00:01)": "unchanged",
        "device/0123456789abcdef0123456789abcdef": "deleted",
    }
    assert services.devices.get(knocked.id).status == "pending"  # it only knocked: never pruned
    assert [r.name for r in services.rules.list()] == ["rack-a"]  # kinds not applied are left alone
    rules_gone = apply(services, STATE.split("---\n")[1], prune=True)  # a Group file prunes groups only
    assert rules_gone == {"group/rack-a": "unchanged"}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("kind: Device\nmetadata: {name: a}\nspec: {}\n", "state.yaml: document 1: apiVersion"),
        ("apiVersion: ktizo.dev/v1\nkind: Machine\nmetadata: {name: a}\nspec: {}\n", "document 1: kind"),
        ("apiVersion: ktizo.dev/v1\nkind: Device\nspec: {}\n", "metadata.name is required"),
        ("apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {name: a}\n", "spec is required"),
        ("a: [1,\n", "state.yaml: not YAML at line"),
    ],
)
def test_a_malformed_document_is_named(services: Services, text: str, where: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        apply(services, text)
    assert where in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mac_address: 52:54:00:zz:00:01", "spec.mac_address"),
        ("mac_address: 52:54:00:00:00:03\n  hostname: -bad-", "spec.hostname"),
        ("mac_address: 52:54:00:00:00:03\n  ip_address: 10.0.5.300/24", "spec.ip_address"),
        ("mac_address: 52:54:00:00:00:03\n  status: maybe", "spec.status"),
        ("mac_address: 52:54:00:00:00:03\n  colour: red", "spec.colour"),
        ("hostname: lonely", "spec.mac_address: a Device needs mac_address"),
        ("mac_address: 52:54:00:00:00:03\n  hostname: node-01\n  status: approved", "hostname node-01 is taken"),
    ],
)
def test_nothing_is_half_applied(services: Services, spec: str, message: str) -> None:
    apply(services, STATE)
    good = "apiVersion: ktizo.dev/v1\nkind: Rule\nmetadata: {name: fresh}\nspec: {action: reject}\n"
    bad = f"apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {{name: broken}}\nspec:\n  {spec}\n"
    with pytest.raises(ValidationFailed) as caught:
        apply(services, good + "---\n" + bad, "more.yaml")
    assert "more.yaml: document 2 (Device 'broken')" in str(caught.value)
    assert message in str(caught.value)
    assert [r.name for r in services.rules.list()] == ["rack-a"]  # the valid first document was not applied


def test_a_duplicate_machine_in_the_files_is_refused(services: Services) -> None:
    doc = "apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {name: %s}\nspec: {mac_address: '52:54:00:00:00:07'}\n"
    with pytest.raises(ValidationFailed) as caught:
        apply(services, doc % "a" + "---\n" + doc % "b")
    assert "52:54:00:00:00:07 is also document 1" in str(caught.value)


def test_an_approved_talos_machine_gets_its_config_on_arrival(
    client: TestClient, services: Services, bases: Path
) -> None:
    apply(services, STATE)
    r = client.get(talos_url(mac="52:54:00:00:00:01", uuid=UUID), headers=TALOS_HEADERS)
    assert r.status_code == 200 and "hostname: node-01" in r.text
    assert services.devices.resolve("52:54:00:00:00:01").uuid == UUID  # bound on arrival


def test_an_approved_agent_is_approved_when_it_enrolls(client: TestClient, services: Services) -> None:
    mid = machine_id()
    doc = "apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {name: db-1}\n"
    doc += f"spec: {{machine_id: '{mid}', status: approved}}\n"
    apply(services, doc)
    r = client.post("/api/v1/enroll", json=body(mid, hostname="db-1"))
    assert r.status_code == 202, r.text
    bundle = client.get(f"/api/v1/enroll/status/{r.json()['polling_token']}")
    assert bundle.status_code == 200 and "BEGIN CERTIFICATE" in bundle.json()["server_crt"]
    agent = next(d for d in services.devices.list(DeviceQuery())[0] if d.machine_id == mid)
    assert (agent.status, agent.approved_by, agent.approve_on_arrival) == ("approved", "root", None)
    assert set(apply(services, doc).values()) == {"unchanged"}  # what the agent reported is not the file's


def test_a_device_document_sets_what_it_names_and_null_clears(services: Services) -> None:
    apply(services, STATE)
    minimal = "apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {name: n}\nspec: {mac_address: '52:54:00:00:00:01'}\n"
    assert set(apply(services, minimal).values()) == {"unchanged"}
    assert services.devices.resolve("52:54:00:00:00:01").hostname == "node-01"
    cleared = minimal.replace("'}", "', labels: null, notes: hello}")
    report = services.declarative.apply(ADMIN, parse(cleared, "x.yaml"))
    assert report.changes[0].diff == ["- labels: {rack: a}", "+ notes: hello"]


def test_a_big_file_applies_in_batches_with_every_machine_audited(services: Services) -> None:
    docs = [
        f"apiVersion: ktizo.dev/v1\nkind: Device\nmetadata: {{name: n{i}}}\n"
        f"spec: {{mac_address: '02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}', hostname: n{i}, status: approved}}\n"
        for i in range(2500)
    ]
    result = apply(services, "---\n".join(docs))
    assert list(result.values()).count("created") == 2500
    assert services.devices.list(DeviceQuery(limit=1))[1] == 2500
    approvals, total = services.audit.list(AuditQuery(action="approve", limit=1))
    assert total == 2500 and approvals[0].actor == "root"
    with services.db.read() as s:
        assert s.scalar(select(func.count()).select_from(Event).where(Event.event == "device.approved")) == 2500
    assert set(apply(services, "---\n".join(docs)).values()) == {"unchanged"}


def test_the_api_applies_and_answers_with_the_diff(client: TestClient, admin: dict[str, str]) -> None:
    r = client.post("/api/v1/apply", content=STATE, headers={**admin, "Content-Type": "application/yaml"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["counts"] == {"created": 6} and answer["dry_run"] is False
    again = client.post("/api/v1/apply?dry_run=true", content=STATE.replace("node-01", "node-05"), headers=admin)
    changes = {c["name"]: c for c in again.json()["changes"]}
    assert changes["52:54:00:00:00:01"]["diff"] == ["~ hostname: node-01 -> node-05"]
    exported = client.get("/api/v1/export", params={"kind": "device"}, headers=admin)
    assert exported.headers["content-type"].startswith("application/yaml")
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(exported.text)] == ["node-01", "web-01"]


def test_the_api_names_the_broken_document(client: TestClient, admin: dict[str, str], ops: dict[str, str]) -> None:
    bad = "apiVersion: ktizo.dev/v1\nkind: Rule\nmetadata: {name: r}\nspec: {action: later}\n"
    r = client.post("/api/v1/apply", content=bad, headers=admin)
    assert r.status_code == 422
    assert "body: document 1 (Rule 'r'): spec.action: action is approve or reject" in r.text
    assert client.post("/api/v1/apply", content=STATE, headers=ops).status_code == 403
    assert client.post("/api/v1/apply", content=b"\xff\xfe", headers=admin).status_code == 422


def test_the_cli_applies_files_directories_and_stdin(cli: Any, tmp_path: Path) -> None:
    parts = STATE.split("---\n")
    folder = tmp_path / "state"
    folder.mkdir()
    for i, part in enumerate(parts):
        (folder / f"{i:02d}.yaml").write_text(part)
    result = cli("apply", "-f", str(folder))
    assert "device/node-01 (52:54:00:00:00:01) created" in result.output
    assert result.output.strip().endswith("6 created")
    again = cli("apply", "-f", "-", input=STATE.replace("node-01", "node-02"), ok=True)
    assert "~ hostname: node-01 -> node-02" in again.output
    assert cli("export", "--kind", "rule").output.startswith("apiVersion: ktizo.dev/v1\nkind: Rule\n")
    missing = cli("apply", "-f", str(tmp_path / "nope.yaml"), ok=False)
    assert missing.exit_code != 0 and "no such file or directory" in missing.output
