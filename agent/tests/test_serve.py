"""The agent's listener, over real TLS handshakes: who gets in, who is refused where, and certificates swapped live."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import HOSTNAME, MACHINE_ID, Host, https_get, manager_identity, run, serving
from fake_manager import CA, FakeManager
from ktizo_agent import pki, serve


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("the condition never came true")
        time.sleep(0.02)


def serial(host: Host) -> int:
    return pki.load_certificate_file(host.cert_dir / "server.pem").serial_number


def test_ktizo_gets_the_facts_and_the_agent_checks_in(manager: FakeManager, enrolled: Host, tmp_path: Path) -> None:
    cert, key = manager_identity(manager, tmp_path)
    with serving(enrolled) as port:
        answer = https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key)
        manager.wait_for(lambda: bool(manager.checkins))
    assert answer.status == 200
    assert answer.peer.serial_number == serial(enrolled)
    facts = answer.body
    assert facts["machine_id"] == MACHINE_ID and facts["hostname"] == "web1" and facts["fqdn"] == HOSTNAME
    assert facts["cpu"] == {"model": "Fake CPU @ 2.00GHz", "logical_cpus": 2}
    assert facts["memory"] == {"total_bytes": 16318412 * 1024}
    assert [d["name"] for d in facts["disks"]] == ["nvme0n1", "sda"]
    assert manager.checkins[0]["listen_port"] == port
    assert manager.checkins[0]["facts"]["machine_id"] == MACHINE_ID


def test_a_ca_certificate_without_the_manager_uri_gets_403(
    manager: FakeManager, enrolled: Host, tmp_path: Path
) -> None:
    # What any other agent holds: a certificate from the same CA, but no urn:ktizo:manager.
    cert, key = manager.ca.write_pair(tmp_path, "another-agent", dns=["web2.example.test"])
    with serving(enrolled) as port:
        answer = https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key)
    assert answer.status == 403
    assert "manager identity" in answer.body["detail"]


@pytest.mark.parametrize("who", ["foreign", "none"])
def test_a_foreign_or_missing_client_certificate_is_refused_in_the_handshake(
    manager: FakeManager, enrolled: Host, tmp_path: Path, who: str, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = (
        CA().write_pair(tmp_path, "impostor", uris=["urn:ktizo:manager"], server=False)
        if who == "foreign"
        else (None, None)
    )
    with serving(enrolled) as port:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key)
        eventually(lambda: "refused the TLS handshake" in caplog.text)


def test_a_peer_outside_the_whitelist_gets_403_and_the_file_is_reread(
    manager: FakeManager, enrolled: Host, tmp_path: Path
) -> None:
    cert, key = manager_identity(manager, tmp_path)
    ca = enrolled.cert_dir / "ca.pem"
    with serving(enrolled) as port:
        enrolled.whitelist.write_text("allowed_ips:\n  - 10.9.9.9\n")
        answer = https_get(port, ca=ca, cert=cert, key=key)
        assert answer.status == 403 and "whitelist" in answer.body["detail"]
        enrolled.whitelist.write_text("allowed_ips:\n  - 127.0.0.0/8\n")
        assert https_get(port, ca=ca, cert=cert, key=key).status == 200
        enrolled.whitelist.unlink()
        assert https_get(port, ca=ca, cert=cert, key=key).status == 403  # no whitelist: nobody


def test_anything_but_get_facts_is_404(manager: FakeManager, enrolled: Host, tmp_path: Path) -> None:
    cert, key = manager_identity(manager, tmp_path)
    with serving(enrolled) as port:
        for method, path in (("GET", "/"), ("GET", "/v1/facts/x"), ("POST", "/v1/facts"), ("DELETE", "/v1/facts")):
            answer = https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key, method=method, path=path)
            assert answer.status == 404, (method, path)


def test_an_oversized_request_head_gets_431(manager: FakeManager, enrolled: Host, tmp_path: Path) -> None:
    cert, key = manager_identity(manager, tmp_path)
    with serving(enrolled) as port:
        answer = https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key, path="/v1/facts?" + "a" * 9000)
    assert answer.status == 431


def _connect(port: int, host: Host, cert: Path, key: Path) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(host.cert_dir / "ca.pem"))
    context.load_cert_chain(cert, key)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname=HOSTNAME)


def test_a_silent_client_is_dropped_at_the_deadline(
    manager: FakeManager, enrolled: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve, "REQUEST_DEADLINE", 0.3)
    cert, key = manager_identity(manager, tmp_path)
    with serving(enrolled) as port, _connect(port, enrolled, cert, key) as tls:
        started = time.monotonic()
        assert tls.recv(1) == b""  # the agent hung up, having heard nothing
        assert time.monotonic() - started < 3


def test_connections_beyond_the_cap_are_closed(
    manager: FakeManager, enrolled: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serve, "REQUEST_DEADLINE", 1.0)
    cert, key = manager_identity(manager, tmp_path)
    with serving(enrolled, max_connections=1) as port:
        held = _connect(port, enrolled, cert, key)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key)
        held.close()

        def gets_in() -> bool:
            try:
                return https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key).status == 200
            except (ssl.SSLError, OSError):
                return False

        eventually(gets_in)


def test_after_a_timed_renewal_the_listener_presents_the_new_certificate(
    manager: FakeManager, enrolled: Host, tmp_path: Path
) -> None:
    cert, key = manager_identity(manager, tmp_path)
    first = serial(enrolled)
    manager.renew_soon = True  # the first check-in answers renew_after = now
    with serving(enrolled) as port:
        manager.wait_for(lambda: bool(manager.renewals))
        new = manager.renewals[0]["new_serial"]
        eventually(lambda: serial(enrolled) == new)
        answer = https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key)
    assert answer.status == 200
    assert answer.peer.serial_number == new != first
    assert manager.renewals[0]["old_serial"] == first


def test_a_renewal_by_hand_is_picked_up_without_restart(manager: FakeManager, enrolled: Host, tmp_path: Path) -> None:
    cert, key = manager_identity(manager, tmp_path)
    ca = enrolled.cert_dir / "ca.pem"
    with serving(enrolled) as port:
        before = https_get(port, ca=ca, cert=cert, key=key).peer.serial_number
        assert run("renew", *enrolled.args) == 0
        after = https_get(port, ca=ca, cert=cert, key=key).peer.serial_number
    assert before != after == serial(enrolled)


def test_a_refused_checkin_ends_the_loops_but_not_the_listener(
    manager: FakeManager, enrolled: Host, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = manager_identity(manager, tmp_path)
    manager.revoke(MACHINE_ID)
    with serving(enrolled) as port:
        eventually(lambda: "No more check-ins or renewals" in caplog.text)
        assert https_get(port, ca=enrolled.cert_dir / "ca.pem", cert=cert, key=key).status == 200


def test_serve_before_enrolling_says_enroll_first(host: Host, capsys: pytest.CaptureFixture[str]) -> None:
    assert run("serve", "--listen", "127.0.0.1:0", *host.args) == 1
    assert "run `ktizo-agent enroll" in capsys.readouterr().err


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_curl_with_the_manager_certificate_and_with_a_foreign_one(
    manager: FakeManager, enrolled: Host, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good_cert, good_key = manager_identity(manager, tmp_path)
    bad_cert, bad_key = CA().write_pair(tmp_path, "impostor", uris=["urn:ktizo:manager"], server=False)
    ca = enrolled.cert_dir / "ca.pem"
    with serving(enrolled) as port:

        def curl(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["curl", "-sS", "--max-time", "5", "--cacert", ca, "--cert", cert, "--key", key,
                 "--connect-to", f"{HOSTNAME}:{port}:127.0.0.1:{port}", f"https://{HOSTNAME}:{port}/v1/facts"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip

        good = curl(good_cert, good_key)
        bad = curl(bad_cert, bad_key)
    assert good.returncode == 0, good.stderr
    assert f'"machine_id": "{MACHINE_ID}"' in good.stdout
    assert bad.returncode != 0 and "machine_id" not in bad.stdout
    assert "refused the TLS handshake from 127.0.0.1: CERTIFICATE_VERIFY_FAILED" in caplog.text


@pytest.mark.skipif(not shutil.which("openssl"), reason="needs openssl")
def test_openssl_s_client_with_a_foreign_certificate_is_refused(
    manager: FakeManager, enrolled: Host, tmp_path: Path
) -> None:
    good_cert, good_key = manager_identity(manager, tmp_path)
    bad_cert, bad_key = CA().write_pair(tmp_path, "impostor", uris=["urn:ktizo:manager"], server=False)
    ca = enrolled.cert_dir / "ca.pem"
    with serving(enrolled) as port:

        def s_client(cert: Path, key: Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", HOSTNAME,
                 "-CAfile", ca, "-verify_return_error", "-cert", cert, "-key", key, "-ign_eof"],
                input="GET /v1/facts HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=10, check=False,
            )  # fmt: skip

        good = s_client(good_cert, good_key)
        bad = s_client(bad_cert, bad_key)
    assert "HTTP/1.0 200" in good.stdout and MACHINE_ID in good.stdout
    assert "HTTP/1.0" not in bad.stdout and MACHINE_ID not in bad.stdout
    assert "alert" in bad.stderr + bad.stdout
