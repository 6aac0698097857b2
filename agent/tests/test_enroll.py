"""Enrollment against the fake Ktizo, through the command line: the happy path and every way it ends otherwise."""

from __future__ import annotations

import datetime as dt
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from conftest import HOST_IP, HOSTNAME, MACHINE_ID, Host, enroll_args, run
from fake_manager import CA, FakeManager, Reply, pem
from ktizo_agent import enroll, pki
from ktizo_agent.errors import AgentError
from ktizo_agent.stop import Stopper


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("umask0")
def test_enroll_installs_files_config_and_whitelist(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    host.whitelist.parent.mkdir(parents=True)
    host.whitelist.write_text("allowed_ips:\n  - 10.1.0.0/16\nother: kept\n")
    host.config.write_text("log_level: info\nenrollment:\n  max_poll_attempts: 0\n")
    manager.approve_after = 3

    assert run(*enroll_args(manager, host)) == 0

    request = next(iter(manager.records.values())).request
    assert request["machine_id"] == MACHINE_ID
    assert request["hostname"] == "web1"
    assert request["fqdn"] == HOSTNAME
    assert request["ip_addresses"] == [HOST_IP]
    assert request["os"]["id"] == "debian" and request["os"]["version"] == "12" and request["os"]["kernel"]
    csr = x509.load_pem_x509_csr(request["csr_pem"].encode())
    assert csr.subject.rfc4514_string() == "CN=web1"

    certs = host.cert_dir
    assert mode(certs) == 0o700
    assert mode(certs / "ca.pem") == 0o644
    assert mode(certs / "server.pem") == 0o644
    assert mode(certs / "server.key.pem") == 0o600
    assert mode(host.config) == 0o600
    assert host.cert_files() == {"ca.pem", "server.pem", "server.key.pem", ".lock"}  # no pending key, no stash

    cert = pki.load_certificate_file(certs / "server.pem")
    key = pki.load_private_key(certs / "server.key.pem")
    assert pki.public_der(cert.public_key()) == pki.public_der(key.public_key())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert (certs / "ca.pem").read_text() == manager.ca.pem

    saved = host.read_config()
    assert saved["log_level"] == "info"
    assert saved["enrollment"] == {
        "max_poll_attempts": 0,
        "manager_url": manager.url,
        "polling_interval_seconds": manager.poll_interval,
    }
    assert saved["manager"] == {
        "url": manager.url,
        "mtls_url": manager.mtls_url,
        "ca_fingerprint": manager.ca.fingerprint,
        "addresses": ["127.0.0.1"],
    }
    listed = yaml.safe_load(host.whitelist.read_text())
    assert listed == {"allowed_ips": ["10.1.0.0/16", "127.0.0.1"], "other": "kept"}
    err = capsys.readouterr().err
    assert "added 127.0.0.1" in err
    # The polling token is a credential: it must never reach a log line.
    assert next(iter(manager.records)) not in err


def test_enroll_again_when_enrolled_does_nothing(manager: FakeManager, enrolled: Host) -> None:
    before = (enrolled.cert_dir / "server.pem").read_bytes()
    assert run(*enroll_args(manager, enrolled)) == 0
    assert manager.enroll_posts == 1
    assert (enrolled.cert_dir / "server.pem").read_bytes() == before


def test_whitelist_is_not_duplicated(manager: FakeManager, host: Host) -> None:
    host.whitelist.parent.mkdir(parents=True)
    host.whitelist.write_text("allowed_ips:\n  - 127.0.0.1/32\n")
    manager.addresses = ["127.0.0.1", "10.0.0.5", "10.0.0.5"]
    manager.approve_after = 1
    assert run(*enroll_args(manager, host)) == 0
    assert yaml.safe_load(host.whitelist.read_text()) == {"allowed_ips": ["127.0.0.1/32", "10.0.0.5"]}


def test_restart_resumes_polling_with_the_saved_token_and_key(manager: FakeManager, host: Host) -> None:
    assert run(*enroll_args(manager, host, "--max-attempts", "2")) == 5
    token = host.read_config()["enrollment"]["polling_token"]
    pending = (host.cert_dir / "server.key.pem.pending").read_bytes()
    assert manager.enroll_posts == 1 and manager.status_polls == 2

    manager.approve(MACHINE_ID)
    assert run(*enroll_args(manager, host)) == 0

    assert manager.enroll_posts == 1  # no second enrollment: it polled with the saved token
    assert next(iter(manager.records)) == token
    assert (host.cert_dir / "server.key.pem").read_bytes() == pending
    assert not (host.cert_dir / "server.key.pem.pending").exists()
    assert "polling_token" not in host.read_config()["enrollment"]


def test_rejected_exits_3(manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    manager.reject_after = 2
    assert run(*enroll_args(manager, host)) == 3
    err = capsys.readouterr().err
    assert "rejected" in err and f"ktizo agents show {MACHINE_ID}" in err
    assert not (host.cert_dir / "server.pem").exists()


def test_purged_exits_4_and_forgets_the_token(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    manager.purge_after = 2
    assert run(*enroll_args(manager, host)) == 4
    assert "purged or expired" in capsys.readouterr().err
    assert "polling_token" not in host.read_config()["enrollment"]
    assert not (host.cert_dir / "server.key.pem.pending").exists()
    # Run again: a fresh enrollment, not a poll with a dead token.
    manager.purge_after, manager.approve_after = None, 1
    assert run(*enroll_args(manager, host)) == 0
    assert manager.enroll_posts == 2


def test_gives_up_after_max_attempts_with_5(manager: FakeManager, host: Host) -> None:
    assert run(*enroll_args(manager, host, "--max-attempts", "3")) == 5
    assert manager.status_polls == 3


def test_max_poll_attempts_comes_from_the_config(manager: FakeManager, host: Host) -> None:
    host.config.parent.mkdir(parents=True)
    host.config.write_text("enrollment:\n  max_poll_attempts: 2\n")
    assert run(*enroll_args(manager, host)) == 5
    assert manager.status_polls == 2


@pytest.mark.parametrize("extra", [[], ["--ca-fingerprint", "sha256:1234"]])
def test_no_usable_pin_is_a_usage_error(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    assert run("enroll", manager.url, *host.args, *extra) == 2
    assert "ktizo pki fingerprint" in capsys.readouterr().err
    assert manager.enroll_posts == 0


def test_pin_mismatch_exits_1_before_sending_anything(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    other = CA().fingerprint
    assert run("enroll", manager.url, "--ca-fingerprint", other, *host.args) == 1
    assert "not the one you pinned" in capsys.readouterr().err
    assert manager.enroll_posts == 0 and manager.status_polls == 0
    assert not (host.cert_dir / "server.pem").exists()


def test_pin_accepts_other_spellings(manager: FakeManager, host: Host) -> None:
    hexdigits = manager.ca.fingerprint.removeprefix("sha256:").upper()
    colons = ":".join(hexdigits[i : i + 2] for i in range(0, 64, 2))
    manager.approve_after = 1
    assert run("enroll", manager.url, "--ca-fingerprint", colons, *host.args) == 0


def test_insecure_trusts_and_records_what_it_saw(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    manager.approve_after = 1
    assert run("enroll", manager.url, "--insecure", *host.args) == 0
    assert "TRUSTING" in capsys.readouterr().err
    assert host.read_config()["manager"]["ca_fingerprint"] == manager.ca.fingerprint


def test_409_without_a_saved_token_explains(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(*enroll_args(manager, host, "--max-attempts", "1")) == 5
    host.config.unlink()  # the token is lost; Ktizo still holds the live enrollment
    assert run(*enroll_args(manager, host)) == 1
    err = capsys.readouterr().err
    assert "already has a live enrollment" in err and "purge" in err and "--config" in err


def test_409_with_a_saved_token_resumes_it(manager: FakeManager, host: Host, tmp_path: Path) -> None:
    assert run(*enroll_args(manager, host, "--max-attempts", "1")) == 5
    # The same Ktizo under another name: the saved token's URL differs, so the agent enrolls, gets 409, resumes.
    other_name = manager.url.replace("127.0.0.1", "localhost")
    manager.approve(MACHINE_ID)
    assert run("enroll", other_name, "--ca-fingerprint", manager.ca.fingerprint, *host.args) == 0
    assert manager.enroll_posts == 2
    assert host.read_config()["manager"]["url"] == other_name


def test_429_waits_and_retries(manager: FakeManager, host: Host) -> None:
    manager.throttle_enroll, manager.throttle_status, manager.approve_after = 2, 2, 1
    assert run(*enroll_args(manager, host)) == 0
    assert manager.enroll_posts == 3


def test_422_detail_is_printed(manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    manager.enroll_override = Reply(422, {"detail": [{"loc": ["body", "hostname"], "msg": "not a hostname"}]})
    assert run(*enroll_args(manager, host)) == 1
    assert "hostname: not a hostname" in capsys.readouterr().err


def test_unreadable_machine_id_is_a_clear_error(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    (host.root / "machine-id").write_text("uninitialized\n")
    assert run(*enroll_args(manager, host)) == 1
    assert "does not hold a machine-id" in capsys.readouterr().err
    assert manager.enroll_posts == 0


def _other_key_cert(manager: FakeManager, bundle: dict[str, Any]) -> dict[str, Any]:
    stranger = ec.generate_private_key(ec.SECP256R1())
    cert = manager.ca.issue(stranger.public_key(), cn=HOSTNAME)
    return {**bundle, "server_crt": pem(cert), "chain": pem(cert) + manager.ca.pem}


def _forged_cert(bundle: dict[str, Any]) -> dict[str, Any]:
    # Same subject name as the real CA, different key: only the signature check can tell.
    impostor = CA()
    ours = x509.load_pem_x509_certificate(bundle["server_crt"].encode())
    cert = impostor.issue(ours.public_key(), cn=HOSTNAME)
    return {**bundle, "server_crt": pem(cert), "chain": pem(cert) + bundle["ca_crt"]}


def _foreign_ca(bundle: dict[str, Any]) -> dict[str, Any]:
    impostor = CA()
    ours = x509.load_pem_x509_certificate(bundle["server_crt"].encode())
    cert = impostor.issue(ours.public_key(), cn=HOSTNAME)
    return {**bundle, "ca_crt": impostor.pem, "server_crt": pem(cert), "chain": pem(cert) + impostor.pem}


def _expired(manager: FakeManager, bundle: dict[str, Any]) -> dict[str, Any]:
    ours = x509.load_pem_x509_certificate(bundle["server_crt"].encode())
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    cert = manager.ca.issue(ours.public_key(), cn=HOSTNAME, not_before=start, days=1)
    return {**bundle, "server_crt": pem(cert), "chain": pem(cert) + manager.ca.pem}


@pytest.mark.parametrize(
    ("tamper", "complaint"),
    [
        ("other_key", "not for this host's key"),
        ("forged", "not signed by the pinned CA"),
        ("foreign_ca", "not the one you pinned"),
        ("expired", "expired"),
        ("two_certs", "exactly one PEM certificate"),
    ],
)
def test_a_bad_bundle_is_refused_and_nothing_written(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str], tamper: str, complaint: str
) -> None:
    tampers = {
        "other_key": lambda b: _other_key_cert(manager, b),
        "forged": _forged_cert,
        "foreign_ca": _foreign_ca,
        "expired": lambda b: _expired(manager, b),
        "two_certs": lambda b: {**b, "server_crt": b["server_crt"] + b["ca_crt"]},
    }
    manager.tamper, manager.approve_after = tampers[tamper], 1
    assert run(*enroll_args(manager, host)) == 1
    err = capsys.readouterr().err
    assert complaint in err and "nothing was installed" in err
    assert host.cert_files() <= {"server.key.pem.pending", ".lock"}
    assert "manager" not in host.read_config()
    assert not host.whitelist.exists()


class Crash(BaseException):
    """Stands for the power going out: no `except Exception` on the way catches it."""


def crash_once(monkeypatch: pytest.MonkeyPatch, name: str | None = None) -> list[str]:
    """Make the first ``os.replace`` (onto a file called ``name``, if given) die; returns the targets seen."""
    real = os.replace
    calls: list[str] = []

    def replace(src: Any, dst: Any) -> None:
        calls.append(str(dst))
        if (name is None or Path(dst).name == name) and not getattr(replace, "done", False):
            replace.done = True  # type: ignore[attr-defined]
            raise Crash
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return calls


def test_crash_before_replace_then_the_next_run_finishes_from_the_stash(
    manager: FakeManager, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.approve_after = 2
    assert run(*enroll_args(manager, host, "--max-attempts", "1")) == 5  # config and key on disk already
    calls = crash_once(monkeypatch)
    with pytest.raises(Crash):
        run(*enroll_args(manager, host))
    assert calls[0].endswith("ca.pem")
    left = host.cert_files()
    assert "ca.pem" not in left and "server.pem" not in left
    assert "bundle.json.pending" in left
    assert any(name.startswith(".ca.pem.tmp-") for name in left)
    polls = manager.status_polls

    assert run(*enroll_args(manager, host)) == 0

    assert manager.status_polls == polls  # Ktizo hands the bundle out once; the stash carried it
    assert host.cert_files() == {"ca.pem", "server.pem", "server.key.pem", ".lock"}
    assert host.read_config()["manager"]["url"] == manager.url


def test_ed25519_key_type(manager: FakeManager, host: Host) -> None:
    manager.approve_after = 1
    assert run(*enroll_args(manager, host, "--key-type", "ed25519")) == 0
    assert pki.key_kind(pki.load_private_key(host.cert_dir / "server.key.pem")) == "ed25519"


@pytest.mark.parametrize("how", ["manager-ca", "system-trust", "insecure"])
def test_an_https_manager_url(tmp_path: Path, host: Host, capsys: pytest.CaptureFixture[str], how: str) -> None:
    manager = FakeManager(tmp_path / "tls-ktizo", public_tls=True).start()
    try:
        manager.approve_after = 1
        (tmp_path / "ktizo-ca.pem").write_text(manager.ca.pem)
        extra = {
            "manager-ca": ["--manager-ca", str(tmp_path / "ktizo-ca.pem")],
            "system-trust": [],
            "insecure": ["--insecure"],
        }[how]
        code = run(*enroll_args(manager, host, *extra))
    finally:
        manager.stop()
    err = capsys.readouterr().err
    if how == "system-trust":
        assert code == 1 and "does not verify" in err and "--manager-ca" in err
        assert manager.enroll_posts == 0
    else:
        assert code == 0, err
        assert "plain http" not in err


def test_5xx_and_network_failures_while_polling_are_retried(manager: FakeManager, host: Host) -> None:
    manager.fail_status, manager.drop_status, manager.approve_after = 2, 2, 1
    assert run(*enroll_args(manager, host)) == 0
    assert manager.status_polls == 5


def test_network_failures_count_as_attempts(manager: FakeManager, host: Host) -> None:
    manager.drop_status = 100
    assert run(*enroll_args(manager, host, "--max-attempts", "3")) == 5
    assert manager.status_polls == 3


def test_an_unreachable_ktizo_is_tried_a_few_times_then_explained(host: Host) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nobody listens here once the socket closes
    options = enroll.Options(manager_url=f"http://127.0.0.1:{port}", pin="sha256:" + "ab" * 32)
    with pytest.raises(AgentError, match="could not reach Ktizo") as caught:
        enroll.enroll(host.paths, host.sources, options, Stopper(), enroll.Pacing(retry_base=0.01, tries=3))
    assert caught.value.hint and "MANAGER_URL" in caught.value.hint
    assert not host.config.exists() and not (host.cert_dir / "server.key.pem.pending").exists()
