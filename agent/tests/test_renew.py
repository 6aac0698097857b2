"""After enrollment: renewal and check-in over real mTLS with the fake Ktizo, and status."""

from __future__ import annotations

import pytest

from conftest import Host, run
from fake_manager import CA, FakeManager, pem
from ktizo_agent import pki
from test_enroll import Crash, crash_once


def test_renew_uses_a_new_key_over_mtls_and_keeps_prev(manager: FakeManager, enrolled: Host) -> None:
    certs = enrolled.cert_dir
    old_cert, old_key = (certs / "server.pem").read_bytes(), (certs / "server.key.pem").read_bytes()
    old_serial = pki.load_certificate_file(certs / "server.pem").serial_number

    assert run("renew", *enrolled.args) == 0

    assert manager.renewals == [
        {"old_serial": old_serial, "new_serial": manager.renewals[0]["new_serial"], "authorization": None}
    ]
    new_cert = pki.load_certificate_file(certs / "server.pem")
    new_key = pki.load_private_key(certs / "server.key.pem")
    assert new_cert.serial_number == manager.renewals[0]["new_serial"]
    assert pki.public_der(new_cert.public_key()) == pki.public_der(new_key.public_key())
    assert (certs / "server.key.pem").read_bytes() != old_key
    assert (certs / "server.pem.prev").read_bytes() == old_cert
    assert (certs / "server.key.pem.prev").read_bytes() == old_key
    assert oct(pki.Path(certs / "server.key.pem.prev").stat().st_mode & 0o777) == "0o600"
    assert not (certs / "server.key.pem.pending").exists()
    assert enrolled.read_config()["manager"]["ca_fingerprint"] == manager.ca.fingerprint


def test_renew_refused_exits_3(manager: FakeManager, enrolled: Host, capsys: pytest.CaptureFixture[str]) -> None:
    before = (enrolled.cert_dir / "server.pem").read_bytes()
    manager.revoke(next(iter(manager.issued.values())))
    assert run("renew", *enrolled.args) == 3
    assert "refused the renewal" in capsys.readouterr().err
    assert (enrolled.cert_dir / "server.pem").read_bytes() == before
    assert not (enrolled.cert_dir / "server.key.pem.pending").exists()


def test_renewal_from_another_ca_is_refused(
    manager: FakeManager, enrolled: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    impostor = CA()

    def swap(bundle: dict[str, object]) -> dict[str, object]:
        ours = pki.x509.load_pem_x509_certificate(str(bundle["server_crt"]).encode())
        cert = impostor.issue(ours.public_key(), cn="web1")
        return {**bundle, "ca_crt": impostor.pem, "server_crt": pem(cert), "chain": ""}

    manager.tamper_renew = swap
    before = sorted(enrolled.cert_files())
    assert run("renew", *enrolled.args) == 1
    assert "not the one you pinned" in capsys.readouterr().err
    assert sorted(enrolled.cert_files() - {"server.key.pem.pending"}) == before


def test_crash_during_renew_leaves_the_old_files_and_the_next_run_finishes(
    manager: FakeManager, enrolled: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs = enrolled.cert_dir
    old = {name: (certs / name).read_bytes() for name in ("ca.pem", "server.pem", "server.key.pem")}
    calls = crash_once(monkeypatch, "server.key.pem")
    with pytest.raises(Crash):
        run("renew", *enrolled.args)
    assert calls[-1].endswith("/server.key.pem")
    assert not any(c.endswith("/ca.pem") for c in calls)  # unchanged, so not rewritten
    assert {name: (certs / name).read_bytes() for name in old} == old
    assert any(name.startswith(".server.key.pem.tmp-") for name in enrolled.cert_files())

    assert run("renew", *enrolled.args) == 0

    assert len(manager.renewals) == 1  # finished from the stash, not renewed twice
    installed = pki.load_certificate_file(certs / "server.pem")
    assert installed.serial_number == manager.renewals[0]["new_serial"]
    assert (certs / "server.pem.prev").read_bytes() == old["server.pem"]
    assert (certs / "server.key.pem.prev").read_bytes() == old["server.key.pem"]
    assert not [name for name in enrolled.cert_files() if ".tmp-" in name or name.endswith(".pending")]


def test_checkin_sends_facts_over_mtls(manager: FakeManager, enrolled: Host) -> None:
    assert run("checkin", *enrolled.args) == 0
    (checkin,) = manager.checkins
    assert checkin["facts"]["machine_id"] == "0123456789abcdef0123456789abcdef"
    assert checkin["facts"]["cpu"] == {"model": "Fake CPU @ 2.00GHz", "logical_cpus": 2}
    assert checkin["listen_port"] is None


def test_checkin_when_revoked_exits_3(manager: FakeManager, enrolled: Host) -> None:
    manager.revoke(next(iter(manager.issued.values())))
    assert run("checkin", *enrolled.args) == 3


def test_renew_when_not_enrolled_says_enroll_first(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("renew", *host.args) == 1
    assert "ktizo-agent enroll" in capsys.readouterr().err


def test_status(manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("status", *host.args) == 0
    assert "state: not enrolled" in capsys.readouterr().out

    assert (
        run("enroll", manager.url, "--ca-fingerprint", manager.ca.fingerprint, "--max-attempts", "1", *host.args) == 5
    )
    capsys.readouterr()
    assert run("status", *host.args) == 0
    out = capsys.readouterr().out
    assert "state: pending" in out and manager.url in out
    assert next(iter(manager.records)) not in out  # never print the token

    manager.approve("0123456789abcdef0123456789abcdef")
    assert run("enroll", manager.url, "--ca-fingerprint", manager.ca.fingerprint, *host.args) == 0
    capsys.readouterr()
    assert run("status", *host.args) == 0
    out = capsys.readouterr().out
    cert = pki.load_certificate_file(host.cert_dir / "server.pem")
    assert "state: enrolled" in out
    assert f"not_after: {pki.iso(cert.not_valid_after_utc)}" in out
    assert f"mtls_url: {manager.mtls_url}" in out


def test_an_unreadable_stash_is_discarded_and_the_command_carries_on(
    manager: FakeManager, enrolled: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    (enrolled.cert_dir / "bundle.json.pending").write_text("{not json")
    assert run("status", *enrolled.args) == 0
    assert "an install was interrupted" in capsys.readouterr().out
    assert run("renew", *enrolled.args) == 0
    assert "discarding" in capsys.readouterr().err
    assert len(manager.renewals) == 1
    assert "bundle.json.pending" not in enrolled.cert_files()
