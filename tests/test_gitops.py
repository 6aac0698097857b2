"""GitOps export: a real git repository and a real bare remote. Every approval, change, rejection and deletion is one
commit authored by whoever made it; the manifests pass Tinkerbell's own CRD schema (strictly); a remote that is
away is caught up with once it is back; ``ktizo gitops sync`` commits only when something differs."""

from __future__ import annotations

import copy
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ktizo.app import build_services
from ktizo.domain.errors import NotReady
from ktizo.domain.users import UserRole
from ktizo.gitops import manifests
from ktizo.gitops.repo import Author, redact
from ktizo.jobs.runner import default_jobs
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges
from ktizo.services.registry import Services
from ktizo.settings import Settings
from tests.factories import pending

CRD = Path(__file__).parent / "fixtures" / "tinkerbell" / "hardware-crd-v1alpha1.yaml"
ALICE = Actor.user("alice", UserRole.OPERATOR, "10.0.0.7")
BOB = Actor.user("bob", UserRole.ADMIN, "10.0.0.8")
MAC = "52:54:00:12:34:56"
NAME = r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?"


def _strict(schema: Any) -> Any:
    """The CRD's schema refusing unknown fields (what the API server prunes, and kubectl's strict validation
    refuses): every object that lists its properties takes no others."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def hardware_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def check_hardware(schema: dict[str, Any], doc: dict[str, Any]) -> None:
    jsonschema.validate(doc, schema, cls=jsonschema.Draft7Validator)
    assert doc["apiVersion"] == "tinkerbell.org/v1alpha1" and doc["kind"] == "Hardware"
    assert re.fullmatch(NAME, doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 253


def git(path: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, check=True).stdout


def log(path: Path, ref: str = "HEAD") -> list[str]:
    """``author<TAB>subject``, oldest first."""
    out = git(path, "log", "--reverse", "--format=%an <%ae>%x09%s", ref)
    return out.splitlines()


def tree(path: Path, ref: str = "HEAD") -> set[str]:
    return set(git(path, "ls-tree", "-r", "--name-only", ref).split())


def load(path: Path, rel: str) -> dict[str, Any]:
    return yaml.safe_load((path / rel).read_text())


@pytest.fixture
def gitops(tmp_path: Path, database_url: str) -> Iterator[Callable[..., tuple[Services, Path]]]:
    """Services with a GitOps repository at tmp_path/repo (no app: its job runner would write it meanwhile)."""
    made: list[Services] = []

    def make(remote: str | Path | None = None, **overrides: Any) -> tuple[Services, Path]:
        repo = tmp_path / "repo"
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=database_url,
            gitops_repo=repo,
            gitops_remote=str(remote) if remote is not None else None,
            **overrides,
        )
        services = build_services(settings)
        made.append(services)
        assert services.gitops is not None
        return services, repo

    yield make
    for services in made:
        services.db.dispose()


def bare(tmp_path: Path, name: str = "remote.git") -> Path:
    path = tmp_path / name
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(path)], check=True)
    return path


def test_every_change_is_one_commit_by_whoever_made_it(gitops, hardware_schema) -> None:
    services, repo = gitops()
    services.cluster.update(BOB, {"gateway": "10.0.5.1", "nameservers": ["10.0.5.1"]})
    device = pending(services, MAC)
    assert services.gitops.run() == 1
    assert (repo / ".git").is_dir()  # git init'ed by Ktizo
    found = load(repo, "discovered/52-54-00-12-34-56.yaml")
    check_hardware(hardware_schema, found)
    notes = found["metadata"]["annotations"]
    assert notes["auto-generated"] == "true" and notes["discovery-timeout"] == "24h"
    assert notes["ktizo.dev/expires-at"].endswith("Z") and notes["ktizo.dev/device-id"] == str(device.id)
    assert found["metadata"]["name"] == "temp-discovered-52-54-00-12-34-56"
    assert found["spec"]["interfaces"][0]["dhcp"] == {"mac": MAC, "hostname": "discovered-123456"}
    assert found["spec"]["interfaces"][0]["netboot"]["allowPXE"] is False
    assert load(repo, "ktizo/devices/52-54-00-12-34-56.yaml")["spec"] == {
        "mac_address": MAC,
        "role": "worker",
        "status": "pending",
    }

    services.devices.approve(
        ALICE,
        device.id,
        DeviceChanges(hostname="node-01", ip_address="10.0.5.100/24", role="worker", install_disk="/dev/nvme0n1"),
    )
    assert services.gitops.run() == 1
    assert tree(repo) == {"hardware/node-01.yaml", "ktizo/devices/node-01.yaml"}  # moved out of discovered/
    hw = load(repo, "hardware/node-01.yaml")
    check_hardware(hardware_schema, hw)
    assert hw["metadata"]["name"] == "node-01" and hw["metadata"]["namespace"] == "tink-system"
    (nic,) = hw["spec"]["interfaces"]
    assert nic["dhcp"]["mac"] == MAC and nic["dhcp"]["hostname"] == "node-01"
    assert nic["dhcp"]["ip"] == {
        "address": "10.0.5.100",
        "netmask": "255.255.255.0",
        "gateway": "10.0.5.1",
        "family": 4,
    }
    assert nic["dhcp"]["name_servers"] == ["10.0.5.1"]
    assert nic["netboot"] == {"allowPXE": True, "allowWorkflow": True}
    assert hw["spec"]["disks"] == [{"device": "/dev/nvme0n1"}]
    assert "annotations" in hw["metadata"] and "auto-generated" not in hw["metadata"]["annotations"]
    assert load(repo, "ktizo/devices/node-01.yaml") == {
        "apiVersion": "ktizo.dev/v1",
        "kind": "Device",
        "metadata": {"name": "node-01"},
        "spec": {
            "mac_address": MAC,
            "hostname": "node-01",
            "ip_address": "10.0.5.100/24",
            "role": "worker",
            "status": "approved",
        },
    }

    services.devices.update(ALICE, device.id, DeviceChanges(hostname="node-02", labels={"rack": "r1"}))
    services.gitops.run()
    assert tree(repo) == {"hardware/node-02.yaml", "ktizo/devices/node-02.yaml"}  # a new hostname moves the files
    assert load(repo, "ktizo/devices/node-02.yaml")["spec"]["labels"] == {"rack": "r1"}

    services.devices.reject(BOB, device.id, "decommissioned")
    services.gitops.run()
    # Rejected machines stay in hardware/ under their MAC (hostnames are unique among approved ones only), PXE off.
    assert tree(repo) == {"hardware/52-54-00-12-34-56.yaml", "ktizo/devices/52-54-00-12-34-56.yaml"}
    rejected = load(repo, "hardware/52-54-00-12-34-56.yaml")
    check_hardware(hardware_schema, rejected)
    assert rejected["spec"]["interfaces"][0]["netboot"] == {"allowPXE": False, "allowWorkflow": False}
    assert rejected["spec"]["metadata"]["instance"]["allow_pxe"] is False

    services.devices.delete(BOB, device.id)
    services.gitops.run()
    assert tree(repo) == set()

    assert log(repo) == [
        "device <device@ktizo>\tdevice.discovered: 52:54:00:12:34:56 by device",
        "alice <alice@ktizo>\tdevice.approved: node-01 (52:54:00:12:34:56) by alice",
        "alice <alice@ktizo>\tdevice.updated: node-02 (52:54:00:12:34:56) by alice",
        "bob <bob@ktizo>\tdevice.rejected: node-02 (52:54:00:12:34:56) by bob",
        "bob <bob@ktizo>\tdevice.deleted: node-02 (52:54:00:12:34:56) by bob",
    ]
    assert git(repo, "log", "-1", "--format=%cn <%ce>").strip() == "Ktizo <ktizo@ktizo>"
    body = git(repo, "log", "--format=%B", "--skip=3", "-1")  # the approval: its audit details and trailers
    assert "from: pending" in body and "ip_address: 10.0.5.100/24" in body and "Ktizo-Event:" in body
    assert services.gitops.run() == 0  # nothing pending: nothing done
    assert services.gitops.status().pending_events == 0


def test_changes_made_between_two_runs_are_still_one_commit_each(gitops, hardware_schema) -> None:
    services, repo = gitops()
    device = pending(services, MAC)
    services.devices.approve(ALICE, device.id, DeviceChanges(hostname="node-01", ip_address="10.0.5.100/24"))
    services.devices.update(BOB, device.id, DeviceChanges(ip_address="10.0.5.101/24"))
    assert services.gitops.run() == 3
    assert [line.split("\t")[1].split(":")[0] for line in log(repo)] == [
        "device.discovered",
        "device.approved",
        "device.updated",
    ]
    # Each commit holds the machine as its event left it: the approval the first address, the update the second.
    approved_then = yaml.safe_load(git(repo, "show", "HEAD~1:hardware/node-01.yaml"))
    assert approved_then["spec"]["interfaces"][0]["dhcp"]["ip"]["address"] == "10.0.5.100"
    assert load(repo, "hardware/node-01.yaml")["spec"]["interfaces"][0]["dhcp"]["ip"]["address"] == "10.0.5.101"
    # A change that alters nothing in the repository (installed) makes no commit, and leaves the outbox.
    services.devices.set_installed(ALICE, device.id, True)
    assert services.gitops.run() == 1
    assert len(log(repo)) == 3 and services.gitops.status().pending_events == 0


def test_rule_and_agent_machines(gitops, hardware_schema) -> None:
    services, repo = gitops()
    other = pending(services, "52:54:00:aa:bb:cc")
    services.devices.approve(Actor.rule("lab", UserRole.ADMIN), other.id, DeviceChanges())  # no hostname
    services.gitops.run()
    assert "hardware/52-54-00-aa-bb-cc.yaml" in tree(repo)
    check_hardware(hardware_schema, load(repo, "hardware/52-54-00-aa-bb-cc.yaml"))
    assert log(repo)[-1] == "rule:lab <rule-lab@ktizo>\tdevice.approved: 52:54:00:aa:bb:cc by rule:lab"
    assert Author.of("evil <x@y>\nname") == Author("evil x@yname", "evil-x-yname@ktizo")


def test_pushes_to_a_bare_remote_and_catches_up_when_it_comes_back(gitops, tmp_path: Path, cli, monkeypatch) -> None:
    remote = tmp_path / "away.git"  # not there yet: unreachable
    services, repo = gitops(remote)
    device = pending(services, MAC)
    services.gitops.run()
    services.devices.approve(ALICE, device.id, DeviceChanges(hostname="node-01"))
    services.gitops.run()
    status = services.gitops.status()
    assert status.head is not None and status.pushed is None and status.unpushed == 2
    assert status.last_error and "away.git" in status.last_error
    assert len(log(repo)) == 2  # the commits are made and safe locally

    bare(tmp_path, "away.git")  # the remote is back
    assert services.gitops.run() == 1  # no event pending: just the push
    status = services.gitops.status()
    assert status.pushed == status.head and status.unpushed == 0 and status.last_error is None
    assert git(remote, "rev-parse", "main").strip() == status.head
    assert log(remote, "main") == log(repo)
    assert tree(remote, "main") == {"hardware/node-01.yaml", "ktizo/devices/node-01.yaml"}

    services.devices.update(BOB, device.id, DeviceChanges(role="controlplane"))
    services.gitops.run()
    assert git(remote, "rev-parse", "main").strip() == services.gitops.status().head

    monkeypatch.setenv("KTIZO_GITOPS_REPO", str(repo))
    monkeypatch.setenv("KTIZO_GITOPS_REMOTE", str(remote))
    out = cli("gitops", "status").output
    assert "unpushed:   0 commit(s)" in out and "pending:    0" in out


def test_sync_rewrites_the_tree_and_commits_only_a_difference(gitops, tmp_path: Path, cli, monkeypatch) -> None:
    remote = bare(tmp_path)
    services, repo = gitops(remote)
    a = pending(services, MAC)
    services.devices.approve(ALICE, a.id, DeviceChanges(hostname="node-01", ip_address="10.0.5.100/24"))
    pending(services, "52:54:00:aa:bb:cc")
    # Never run the job: the sync writes it all in one commit, and the outbox is done.
    result = services.gitops.sync(BOB)
    assert result.commit is not None and result.pushed
    assert sorted(result.changes) == [
        "A  discovered/52-54-00-aa-bb-cc.yaml",
        "A  hardware/node-01.yaml",
        "A  ktizo/devices/52-54-00-aa-bb-cc.yaml",
        "A  ktizo/devices/node-01.yaml",
    ]
    assert log(repo) == ["bob <bob@ktizo>\tgitops.sync: 4 file(s) rewritten from the database by bob"]
    assert services.gitops.status().pending_events == 0
    assert services.gitops.run() == 0

    again = services.gitops.sync(BOB)  # unchanged: no commit
    assert again.commit is None and again.changes == [] and len(log(repo)) == 1

    # Uncommitted edits of the work tree: put back, and nothing differs from the last commit.
    (repo / "hardware" / "node-01.yaml").write_text("tampered: true\n")
    assert services.gitops.sync(BOB).commit is None
    # A file someone committed by hand, and a gateway set on the cluster (no machine changed, no event): the sync
    # removes the one and writes the other.
    (repo / "hardware" / "stray.yaml").write_text("kind: Hardware\n")
    git(repo, "add", "hardware/stray.yaml")
    git(repo, "-c", "user.name=eve", "-c", "user.email=eve@x", "commit", "-q", "-m", "by hand")
    services.cluster.update(BOB, {"gateway": "10.0.5.1"})
    monkeypatch.setenv("KTIZO_GITOPS_REPO", str(repo))
    monkeypatch.setenv("KTIZO_GITOPS_REMOTE", str(remote))
    out = cli("gitops", "sync").output
    assert "committed" in out and "M  hardware/node-01.yaml" in out and "D  hardware/stray.yaml" in out
    assert "pushed" in out
    assert not (repo / "hardware" / "stray.yaml").exists()
    assert load(repo, "hardware/node-01.yaml")["spec"]["interfaces"][0]["dhcp"]["ip"]["gateway"] == "10.0.5.1"
    assert cli("gitops", "sync").output.strip() == "the repository already matches the database: no commit"
    assert log(remote, "main") == log(repo) and len(log(repo)) == 3
    assert log(repo)[-1] == "cli <cli@ktizo>\tgitops.sync: 2 file(s) rewritten from the database by cli"
    entries, total = services.audit.list(AuditQuery(action="gitops_sync"))
    assert total == 5 and entries[0].actor == "cli" and entries[0].details["changes"] == 0  # every sync is audited


def test_patches_stay_out_of_the_repository_unless_asked(gitops) -> None:
    services, repo = gitops()
    patch = "machine:\n  env:\n    TOKEN: hunter2\n"
    created = services.devices.create(BOB, DeviceChanges(mac_address=MAC, hostname="node-01", patch=patch))
    services.devices.approve(BOB, created.id, DeviceChanges())
    services.gitops.run()
    text = "".join(p.read_text() for p in repo.rglob("*.yaml"))
    assert "hunter2" not in text and "hunter2" not in git(repo, "log", "-p")
    # A pre-registered pending machine is not auto-generated and never expires.
    doc = manifests.hardware(manifests.Machine(id=9, kind="talos", status="pending", mac_address=MAC))
    assert doc["metadata"]["annotations"] == {"ktizo.dev/device-id": "9", "auto-generated": "false"}
    with_patch = manifests.device_document(
        manifests.Machine(id=9, kind="talos", status="approved", mac_address=MAC, patch=patch),
        manifests.Options(include_patches=True),
    )
    assert with_patch["spec"]["patch"] == patch


def test_a_directory_that_is_not_a_repository_is_refused(gitops, tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "notes.txt").write_text("mine")
    services, _ = gitops()
    with pytest.raises(NotReady, match="neither a git repository nor empty"):
        services.gitops.run()


def test_credentials_in_a_remote_url_are_never_shown() -> None:
    assert redact("fatal: unable to access 'https://ktizo:s3cret@git.example/fleet.git/'") == (
        "fatal: unable to access 'https://***@git.example/fleet.git/'"
    )


def test_the_job_runs_only_with_a_repository(services: Services, gitops, cli) -> None:
    assert services.gitops is None and "gitops" not in [job.name for job in default_jobs(services)]
    with_repo, _ = gitops(gitops_interval_seconds=2.5)
    (job,) = [job for job in default_jobs(with_repo) if job.name == "gitops"]
    assert job.every == 2.5 and job.own_transactions
    result = cli("gitops", "status", ok=False)
    assert result.exit_code == 1 and "KTIZO_GITOPS_REPO" in result.output


@pytest.mark.postgres_only  # one SQLite database is one host: there the flock on the repository is the lock
def test_one_writer_at_a_time(gitops) -> None:
    """Another replica holding the writer's row (PostgreSQL): this one skips its run, and a sync says so."""
    services, repo = gitops()
    pending(services, MAC)
    from sqlalchemy import text

    from ktizo.domain.errors import Conflict

    with services.db.write_engine.connect() as other, other.begin():
        other.execute(text("SELECT id FROM gitops_state WHERE id = 1 FOR UPDATE"))
        assert services.gitops.run() == 0
        with pytest.raises(Conflict, match="another Ktizo replica"):
            services.gitops.sync(BOB)
    assert services.gitops.run() == 1 and len(log(repo)) == 1
