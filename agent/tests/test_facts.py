"""Facts from a fake /proc and /sys, identity from fake files, and the PKI helpers' edge cases."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import HOSTNAME, MACHINE_ID, Host, make_fake_roots, run
from fake_manager import CA, pem
from ktizo_agent import facts, identity, pki
from ktizo_agent.errors import AgentError


def me() -> identity.Identity:
    return identity.Identity(
        MACHINE_ID, "web1", HOSTNAME, ["192.0.2.10"], {"id": "debian", "version": "12", "kernel": "6"}
    )


def test_facts_from_a_fake_tree(tmp_path: Path) -> None:
    make_fake_roots(tmp_path)
    when = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    got = facts.collect(me(), facts.Roots(proc=tmp_path / "proc", sys=tmp_path / "sys"), when)
    assert got == {
        "machine_id": MACHINE_ID,
        "hostname": "web1",
        "fqdn": HOSTNAME,
        "os": {"id": "debian", "version": "12", "kernel": "6"},
        "cpu": {"model": "Fake CPU @ 2.00GHz", "logical_cpus": 2},
        "memory": {"total_bytes": 16318412 * 1024},
        "disks": [
            {"name": "nvme0n1", "size_bytes": 2000 * 512, "rotational": False, "model": None},
            {"name": "sda", "size_bytes": 1953525168 * 512, "rotational": True, "model": "FAKE DISK"},
        ],
        "nics": [
            {"name": "eth0", "mac": "52:54:00:12:34:56", "mtu": 1500, "operstate": "up", "speed_mbps": 1000},
            {"name": "wlan0", "mac": "52:54:00:ab:cd:ef", "mtu": None, "operstate": "down", "speed_mbps": None},
        ],
        "ip_addresses": ["192.0.2.10"],
        "collected_at": "2026-01-02T03:04:05Z",
    }


def test_facts_with_nothing_there_are_nulls(tmp_path: Path) -> None:
    got = facts.collect(me(), facts.Roots(proc=tmp_path / "none", sys=tmp_path / "none"))
    assert got["cpu"] == {"model": None, "logical_cpus": None}
    assert got["memory"] == {"total_bytes": None}
    assert got["disks"] is None and got["nics"] is None


def test_facts_command_prints_json(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("facts", *host.args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["machine_id"] == MACHINE_ID and printed["cpu"]["logical_cpus"] == 2


@pytest.mark.parametrize("text", ["", "uninitialized\n", "0123", "0123456789abcdef0123456789abcdeg"])
def test_machine_id_must_be_32_hex(tmp_path: Path, text: str) -> None:
    (tmp_path / "machine-id").write_text(text)
    with pytest.raises(AgentError, match="machine-id"):
        identity.read_machine_id(tmp_path / "machine-id")


def test_machine_id_is_normalised_and_a_missing_file_explained(tmp_path: Path) -> None:
    (tmp_path / "machine-id").write_text("  0123456789ABCDEF0123456789ABCDEF \n")
    assert identity.read_machine_id(tmp_path / "machine-id") == MACHINE_ID
    with pytest.raises(AgentError) as caught:
        identity.read_machine_id(tmp_path / "absent")
    assert caught.value.hint and "systemd-machine-id-setup" in caught.value.hint


def test_os_release_quotes_and_missing_values(tmp_path: Path) -> None:
    path = tmp_path / "os-release"
    path.write_text('# comment\nID="rocky"\nVERSION_ID=\'9.4\'\nPRETTY_NAME="Rocky \\"Blue\\" Linux"\n')
    got = identity.read_os(path)
    assert got["id"] == "rocky" and got["version"] == "9.4" and got["kernel"]
    assert identity.read_os(tmp_path / "absent")["id"] is None


def test_fqdn_chain() -> None:
    assert identity.resolve_fqdn("web1.example.test", given=True) == "web1.example.test"
    assert identity.short_name("web1.example.test") == identity.short_name("web1") == "web1"
    assert identity.short_name("192.0.2.7") == "192.0.2.7"
    assert identity.resolve_hostname(" web1.example.test. ") == "web1.example.test"
    with pytest.raises(AgentError):
        identity.resolve_hostname("  ")


def test_discovered_addresses_are_reachable_ones() -> None:
    for address in identity.discover_ip_addresses():
        assert not address.startswith(("127.", "::1", "fe80"))


@pytest.mark.parametrize(
    "spelling",
    [
        "sha256:" + "ab" * 32,
        "SHA256:" + "AB" * 32,
        "ab" * 32,
        ":".join(["AB"] * 32),
        "sha256=" + "ab" * 32,
    ],
)
def test_fingerprint_spellings(spelling: str) -> None:
    assert pki.normalize_fingerprint(spelling) == "sha256:" + "ab" * 32


@pytest.mark.parametrize("spelling", ["", "sha256:", "sha1:" + "ab" * 20, "ab" * 31, "zz" * 32, "md5:" + "ab" * 32])
def test_bad_fingerprints(spelling: str) -> None:
    with pytest.raises(ValueError, match="64 hex"):
        pki.normalize_fingerprint(spelling)


@pytest.mark.parametrize("kind", [k for k in pki.KEY_TYPES if k not in ("rsa3072", "rsa4096")])  # slow; 2048 is RSA
def test_every_key_type_makes_a_valid_csr(kind: str) -> None:
    key = pki.generate_key(kind)
    csr = x509.load_pem_x509_csr(pki.build_csr(key, "web1", HOSTNAME).encode())
    assert csr.is_signature_valid and pki.key_kind(key) == kind
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert names == ["web1", HOSTNAME]


def test_a_bundle_not_yet_valid_beyond_the_skew_is_refused() -> None:
    ca, key = CA(), ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(key.public_key(), cn="web1", not_before=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1))
    with pytest.raises(pki.BadBundle, match="valid only from") as caught:
        pki.check_bundle(
            {"ca_crt": ca.pem, "server_crt": pem(cert)}, key=key, pin=ca.fingerprint, now=dt.datetime.now(dt.UTC)
        )
    assert caught.value.hint and "clock" in caught.value.hint
    soon = ca.issue(key.public_key(), cn="web1", not_before=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    bundle = pki.check_bundle(
        {"ca_crt": ca.pem, "server_crt": pem(soon), "manager_addresses": ["10.0.0.1", "bad", "10.0.0.0/8"]},
        key=key,
        pin=ca.fingerprint,
        now=dt.datetime.now(dt.UTC),
    )
    assert bundle.manager_addresses == ["10.0.0.1", "10.0.0.0/8"]
    assert bundle.mtls_url is None


def test_renewal_is_due_at_two_thirds() -> None:
    ca, key = CA(), ec.generate_private_key(ec.SECP256R1())
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cert = ca.issue(key.public_key(), cn="web1", not_before=start, days=30)
    assert pki.renewal_due(cert) == start + dt.timedelta(days=20)
