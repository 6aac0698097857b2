"""Zero-touch site enrollment (seed 004) against the fake Ktizo: one round trip when the site approves on its own,
the pending path, every refusal, where the key may come from, and that the key never shows anywhere."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
import stat
from pathlib import Path
from typing import Any

import pytest

from conftest import MACHINE_ID, Host, StderrReader, agent_cli, enroll_args, run
from fake_manager import CA, FakeManager, Reply, Site, pem
from ktizo_agent import cli, identity, pki
from ktizo_agent.manager import Door
from ktizo_agent.redact import MASK, Secret, redact
from ktizo_agent.stop import Stopper
from test_enroll import Crash, crash_once

SITE = "lab1"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def site(manager: FakeManager) -> Site:
    return manager.add_site(SITE)


def key_file(host: Host, key: str, name: str = "site.key") -> Path:
    path = host.root / name
    path.write_text(key + "\n# anything after the first line is ignored\n")
    return path


def site_args(manager: FakeManager, host: Host, *extra: str, site: str = SITE) -> list[str]:
    return ["enroll", manager.url, "--site", site, "--ca-fingerprint", manager.ca.fingerprint, *host.args, *extra]


def with_key(manager: FakeManager, host: Host, key: str, *extra: str, site: str = SITE) -> list[str]:
    return site_args(manager, host, "--enrollment-key-file", str(key_file(host, key)), *extra, site=site)


def api_key(host: Host) -> str:
    return (host.cert_dir / "agent-api-key").read_text().strip()


def expected_uid(fingerprint: str) -> str:
    return hashlib.sha256(f"{MACHINE_ID}\n{fingerprint}".encode()).hexdigest()


@pytest.fixture
def site_enrolled(manager: FakeManager, host: Host, site: Site) -> Host:
    assert run(*with_key(manager, host, site.key)) == 0
    return host


# -- the one round trip ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("umask0")
def test_zero_touch_is_one_request_and_installs_the_certificate_and_the_api_key(
    manager: FakeManager, host: Host, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(*with_key(manager, host, site.key)) == 0

    assert manager.requests == [("GET", "/api/v1/pki/ca.pem"), ("POST", "/api/enroll")]  # no poll, no agent door
    assert manager.status_polls == 0 and manager.enroll_posts == 0
    assert manager.site_answers[0].status == 201 and manager.site_answers[0].body["outcome"] == "new"
    body = manager.site_posts[0].body
    assert set(body) == {
        "site_code", "enrollment_key", "machine_uid", "hostname", "fqdn", "ip_addresses", "os", "csr_pem",
    }  # fmt: skip
    assert body["site_code"] == SITE and body["enrollment_key"] == site.key
    assert body["hostname"] == "web1" and body["os"]["id"] == "debian"

    certs = host.cert_dir
    assert host.cert_files() == {"ca.pem", "server.pem", "server.key.pem", "agent-api-key", ".lock"}
    assert mode(certs / "agent-api-key") == 0o600 and mode(certs / "server.key.pem") == 0o600
    assert mode(certs / "server.pem") == 0o644 and mode(certs) == 0o700
    held = api_key(host)
    assert held == manager.site_agents[body["machine_uid"]].api_key and held.startswith("cak_1_")
    cert = pki.load_certificate_file(certs / "server.pem")
    key = pki.load_private_key(certs / "server.key.pem")
    assert pki.public_der(cert.public_key()) == pki.public_der(key.public_key())

    saved = host.read_config()
    assert saved["manager"] == {
        "url": manager.url,
        "mtls_url": manager.mtls_url,
        "site": SITE,
        "ca_fingerprint": manager.ca.fingerprint,
        "addresses": ["127.0.0.1"],
        "agent_id": 1,
    }
    assert saved["enrollment"] == {"manager_url": manager.url}  # no token, no site key
    text = host.config.read_text()
    assert site.key not in text and held not in text and "cek_" not in text

    err = capsys.readouterr().err
    assert "in site lab1" in err and site.key not in err and held not in err
    assert run("status", *host.args) == 0
    out = capsys.readouterr().out
    assert "state: enrolled" in out and "site: lab1" in out and "agent_id: 1" in out
    assert "agent_api_key: held" in out and held not in out


def test_manual_policy_gets_202_then_polls_then_installs_with_the_api_key(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    site = manager.add_site(SITE, policy="manual")
    assert run(*with_key(manager, host, site.key, "--max-attempts", "1")) == 5
    assert manager.site_answers[0].status == 202
    assert host.read_config()["enrollment"]["site"] == SITE
    assert "polling_token" in host.read_config()["enrollment"]
    assert manager.site_agents == {}  # nothing minted while pending
    capsys.readouterr()
    assert run("status", *host.args) == 0
    out = capsys.readouterr().out
    assert "state: pending" in out and "site: lab1" in out

    manager.approve_after = 2
    assert run(*with_key(manager, host, site.key)) == 0
    assert len(manager.site_posts) == 1  # resumed with the saved token
    assert manager.status_polls == 2
    assert api_key(host) == next(iter(manager.site_agents.values())).api_key
    saved = host.read_config()
    assert saved["manager"]["site"] == SITE and saved["manager"]["agent_id"] == 1
    assert "site" not in saved["enrollment"] and "polling_token" not in saved["enrollment"]


# -- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["wrong key", "unknown site", "rotated key"])
def test_a_refused_key_exits_6_and_is_not_retried(
    manager: FakeManager, host: Host, site: Site, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    key, code = site.key, SITE
    if how == "wrong key":
        key = "cek_" + "A" * 43
    elif how == "unknown site":
        code = "nowhere"
    else:
        manager.rotate_key(SITE)
    assert run(*with_key(manager, host, key, site=code)) == 6
    assert len(manager.site_posts) == 1
    err = capsys.readouterr().err
    assert f"ktizo sites key {code}" in err and f"ktizo sites rotate-key {code}" in err
    assert Secret(key).fingerprint in err
    assert key not in err
    assert not (host.cert_dir / "server.pem").exists()
    assert "manager" not in host.read_config()


def test_429_waits_for_retry_after_then_succeeds(
    manager: FakeManager, host: Host, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(Stopper, "sleep", lambda self, seconds: slept.append(seconds))
    manager.throttle_site, manager.retry_after = 2, "7"
    assert run(*with_key(manager, host, site.key)) == 0
    assert slept == [7.0, 7.0]
    assert [a.status for a in manager.site_answers] == [429, 429, 201]
    assert manager.status_polls == 0


def test_a_lockout_counts_against_max_attempts(
    manager: FakeManager, host: Host, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    slept: list[float] = []
    monkeypatch.setattr(Stopper, "sleep", lambda self, seconds: slept.append(seconds))
    manager.lockout_after = 1
    assert run(*with_key(manager, host, "cek_" + "B" * 43)) == 6
    assert run(*with_key(manager, host, site.key, "--max-attempts", "2")) == 5
    assert [a.status for a in manager.site_answers] == [401, 429, 429]
    assert slept == [30.0]


def test_a_full_site_exits_1_with_the_detail(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    site = manager.add_site(SITE, max_agents=0)
    assert run(*with_key(manager, host, site.key)) == 1
    err = capsys.readouterr().err
    assert "site lab1 is full" in err and "ask a Ktizo admin" in err


def test_400_exits_1_with_the_detail_and_an_echoed_key_is_masked(
    manager: FakeManager, host: Host, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    manager.site_override = Reply(400, {"detail": f"enrollment_key {site.key} looks odd"})
    assert run(*with_key(manager, host, site.key, "-v")) == 1
    err = capsys.readouterr().err
    assert "Ktizo refused the enrollment request: enrollment_key" in err and MASK in err
    assert site.key not in err


# -- where the key comes from ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "winner"),
    [
        ({"file"}, "file"),
        ({"env"}, "env"),
        ({"option", "file", "env"}, "option"),
        ({"file", "env"}, "file"),
        ({"option", "env"}, "option"),
    ],
)
def test_the_key_comes_from_the_option_then_the_file_then_the_environment(
    manager: FakeManager,
    host: Host,
    site: Site,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    sources: set[str],
    winner: str,
) -> None:
    def key_for(source: str) -> str:
        return site.key if source == winner else "cek_" + source.upper() * 20

    extra: list[str] = []
    if "option" in sources:
        extra += ["--enrollment-key", key_for("option")]
    if "file" in sources:
        extra += ["--enrollment-key-file", str(key_file(host, key_for("file")))]
    if "env" in sources:
        monkeypatch.setenv(cli.KEY_ENV, key_for("env"))
    assert run(*site_args(manager, host, *extra)) == 0
    assert manager.site_posts[0].body["enrollment_key"] == site.key
    err = capsys.readouterr().err
    assert ("on the command line" in err) == (winner == "option")
    assert site.key not in err


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--site", SITE], "needs the site's enrollment key"),
        (["--enrollment-key", "cek_" + "C" * 43], "add --site CODE"),
        (["--enrollment-key-file", "KEYFILE"], "add --site CODE"),
        (["env"], "add --site CODE"),
        (["--site", SITE, "--enrollment-key", "sha256:abcdef0123456789"], "not a site enrollment key"),
        (["--site", SITE, "--enrollment-key-file", "/nonexistent/site.key"], "No such file"),
        (["--site", SITE, "--enrollment-key-file", "EMPTY"], "is empty"),
        (["--site", "no such site!", "--enrollment-key", "cek_" + "C" * 43], "is not a site code"),
    ],
)
def test_usage_errors_exit_2_before_anything_is_sent(
    manager: FakeManager,
    host: Host,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    complaint: str,
) -> None:
    if argv == ["env"]:
        argv = []
        monkeypatch.setenv(cli.KEY_ENV, "cek_" + "C" * 43)
    (host.root / "empty.key").write_text("\n")
    argv = [
        {"KEYFILE": str(key_file(host, "cek_" + "C" * 43)), "EMPTY": str(host.root / "empty.key")}.get(a, a)
        for a in argv
    ]
    for spelling in (["enroll", manager.url], ["--enroll", manager.url]):
        assert run(*spelling, "--ca-fingerprint", manager.ca.fingerprint, *argv, *host.args) == 2
        err = capsys.readouterr().err
        assert complaint in err
        assert "C" * 43 not in err and "abcdef0123456789" not in err
    assert manager.requests == []


def test_a_mistyped_option_does_not_echo_the_key(
    manager: FakeManager, host: Host, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(*site_args(manager, host, "--enrolment-key", site.key)) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and site.key not in err and "cek_" + MASK in err


def test_enrolled_in_the_site_the_key_is_not_needed_any_more(
    manager: FakeManager, site_enrolled: Host, site: Site
) -> None:
    (site_enrolled.root / "site.key").unlink()  # what an installer does once the host is in
    assert run(*with_key(manager, site_enrolled, site.key)[:-2], "--enrollment-key-file", "/gone") == 0
    assert len(manager.site_posts) == 1
    # A host in no site yet still needs it.
    other = Host(site_enrolled.root / "other")
    assert run(*site_args(manager, other, "--enrollment-key-file", "/gone")) == 2


# -- the key stays secret ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["ok", "refused", "pending then checkin"])
def test_the_keys_never_reach_stderr_or_the_log_file_even_verbose(
    manager: FakeManager, host: Host, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    site = manager.add_site(SITE, policy="manual" if case.startswith("pending") else "auto-approve")
    manager.approve_after = 1
    log = host.root / "agent.log"
    key = site.key if case != "refused" else "cek_" + "D" * 43
    code = run(*with_key(manager, host, key, "-v", "--log-file", str(log)))
    assert code == (6 if case == "refused" else 0)
    if case != "refused":
        assert run("checkin", "-v", "--log-file", str(log), *host.args) == 0
        assert run("status", "-v", *host.args) == 0
    captured = capsys.readouterr()
    logged = log.read_text()
    assert f"POST /api/enroll {{'site_code': 'lab1', 'enrollment_key': '{MASK}'" in logged  # -v: the body, masked
    secrets = [key] + [a.api_key for a in manager.site_agents.values() if a.api_key]
    for secret in secrets:
        for text in (captured.err, captured.out, logged):
            assert secret not in text
            assert secret.split("_", 2)[-1] not in text  # not even the secret part of a cak_<id>_<secret>


def test_secrets_do_not_show_in_repr_or_tracebacks() -> None:
    key = Secret("cek_" + "E" * 43)
    assert "E" * 43 not in repr(key) and "E" * 43 not in str(key) and "E" * 43 not in f"{key}"
    assert key.fingerprint == hashlib.sha256(key.reveal().encode()).hexdigest()[:4].upper()
    assert "E" * 43 not in redact(f"Traceback …: {{'enrollment_key': '{key.reveal()}'}}")
    assert redact("Authorization: Bearer cak_12_abcdefghijkl") == f"Authorization: Bearer cak_12_{MASK}"


def test_an_unexpected_failure_prints_a_masked_traceback(
    manager: FakeManager, host: Host, site: Site, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = Door.request

    def request(self: Door, method: str, path: str, body: Any = None, **kwargs: Any) -> Any:
        if method == "POST":  # a bug that puts the request body into an exception
            raise RuntimeError(f"could not send {body!r}")
        return real(self, method, path, body, **kwargs)

    monkeypatch.setattr(Door, "request", request)
    assert run(*with_key(manager, host, site.key)) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: could not send {'site_code': 'lab1'" in err
    assert "a bug in ktizo-agent" in err
    assert site.key not in err and MASK in err


# -- machine_uid ----------------------------------------------------------------------------------------


def test_machine_uid_is_the_formula_and_depends_on_the_ca() -> None:
    fingerprint = "sha256:" + "ab" * 32
    uid = identity.machine_uid(MACHINE_ID, fingerprint)
    assert uid == hashlib.sha256(f"{MACHINE_ID}\n{fingerprint}".encode()).hexdigest()
    assert uid == identity.machine_uid(MACHINE_ID, fingerprint)  # deterministic
    assert len(uid) == 64 and uid == uid.lower()
    assert identity.machine_uid(MACHINE_ID, "sha256:" + "cd" * 32) != uid
    assert identity.machine_uid("f" * 32, fingerprint) != uid
    with pytest.raises(ValueError, match="normalised"):
        identity.machine_uid(MACHINE_ID, "SHA256:" + "AB" * 32)


def test_the_request_carries_the_machine_uid_for_the_pinned_ca_and_not_the_machine_id(
    manager: FakeManager, host: Host, site: Site
) -> None:
    hexdigits = manager.ca.fingerprint.removeprefix("sha256:").upper()
    colons = ":".join(hexdigits[i : i + 2] for i in range(0, 64, 2))  # another spelling of the same pin
    args = with_key(manager, host, site.key)
    args[args.index("--ca-fingerprint") + 1] = colons
    assert run(*args) == 0
    (post,) = manager.site_posts
    assert post.body["machine_uid"] == expected_uid(manager.ca.fingerprint)
    assert MACHINE_ID not in post.raw.decode() and "machine_id" not in post.body


def test_another_ktizo_sees_another_machine_uid(tmp_path: Path, manager: FakeManager, host: Host, site: Site) -> None:
    other = FakeManager(tmp_path / "other-ktizo").start()
    try:
        other_site = other.add_site(SITE)
        assert run(*with_key(other, host, other_site.key)) == 0
        uid = other.site_posts[0].body["machine_uid"]
    finally:
        other.stop()
    assert uid == expected_uid(other.ca.fingerprint) != expected_uid(manager.ca.fingerprint)


# -- proof for re-enrollment, site moves, collisions ------------------------------------------------------


def _expire(manager: FakeManager, host: Host) -> None:
    key = pki.load_private_key(host.cert_dir / "server.key.pem")
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    cert = manager.ca.issue(key.public_key(), cn="web1", not_before=start, days=1)
    (host.cert_dir / "server.pem").write_text(pem(cert))


def test_re_enrolling_sends_the_held_api_key_and_stores_the_new_one(
    manager: FakeManager, site_enrolled: Host, site: Site
) -> None:
    old = api_key(site_enrolled)
    _expire(manager, site_enrolled)
    assert run(*with_key(manager, site_enrolled, site.key)) == 0
    second = manager.site_posts[1]
    assert second.body["agent_api_key"] == old
    assert manager.site_answers[1].status == 201 and manager.site_answers[1].body["outcome"] == "reuse"
    new = api_key(site_enrolled)
    assert new != old and new == manager.site_agents[second.body["machine_uid"]].api_key
    assert (site_enrolled.cert_dir / "agent-api-key.prev").read_text().strip() == old
    assert mode(site_enrolled.cert_dir / "agent-api-key.prev") == 0o600
    assert old not in manager.api_keys  # revoked when the new one was minted
    assert run("checkin", *site_enrolled.args) == 0
    assert manager.checkins[-1]["authorization"] == f"Bearer {new}"


def test_moving_to_another_site_proves_the_agent_with_its_key(
    manager: FakeManager, site_enrolled: Host, site: Site
) -> None:
    old = api_key(site_enrolled)
    lab2 = manager.add_site("lab2")
    assert run(*with_key(manager, site_enrolled, lab2.key, site="lab2")) == 0
    assert manager.site_posts[1].body["agent_api_key"] == old
    assert manager.site_answers[1].body["outcome"] == "site_move"
    assert site_enrolled.read_config()["manager"]["site"] == "lab2"
    assert api_key(site_enrolled) != old
    # Enrolled in lab2 now: running the same command again has nothing to do.
    assert run(*with_key(manager, site_enrolled, lab2.key, site="lab2")) == 0
    assert len(manager.site_posts) == 2


def test_a_second_machine_with_the_same_machine_uid_is_held_and_gets_nothing(
    manager: FakeManager, site_enrolled: Host, site: Site, tmp_path: Path
) -> None:
    clone = Host(site_enrolled.root)  # same machine-id, its own files: a cloned image
    clone_dir = tmp_path / "clone"
    clone_args = ["--config", str(clone_dir / "config.yaml"), "--cert-dir", str(clone_dir / "certs")]
    keys_before = dict(manager.api_keys)
    assert run(*with_key(manager, clone, site.key, *clone_args, "--max-attempts", "1")) == 5
    assert "agent_api_key" not in manager.site_posts[1].body
    assert manager.site_answers[1].status == 202
    assert manager.api_keys == keys_before


def test_the_api_key_is_never_sent_to_another_ktizo(tmp_path: Path, manager: FakeManager, site_enrolled: Host) -> None:
    site_enrolled.config.write_text(site_enrolled.config.read_text().split("manager:")[0])  # the hint's move
    other = FakeManager(tmp_path / "other-ktizo").start()
    try:
        other_site = other.add_site(SITE)
        assert run(*with_key(other, site_enrolled, other_site.key)) == 0
        assert "agent_api_key" not in other.site_posts[0].body
        assert api_key(site_enrolled) == next(iter(other.site_agents.values())).api_key
    finally:
        other.stop()


def test_a_plain_enrollment_retires_an_api_key_it_did_not_bring(manager: FakeManager, site_enrolled: Host) -> None:
    old = api_key(site_enrolled)
    site_enrolled.config.write_text(site_enrolled.config.read_text().split("manager:")[0])
    manager.approve_after = 1
    assert run(*enroll_args(manager, site_enrolled)) == 0
    assert not (site_enrolled.cert_dir / "agent-api-key").exists()
    assert (site_enrolled.cert_dir / "agent-api-key.prev").read_text().strip() == old
    assert "site" not in site_enrolled.read_config()["manager"]
    assert run("checkin", *site_enrolled.args) == 0
    assert manager.checkins[-1]["authorization"] is None


# -- the mTLS door ------------------------------------------------------------------------------------------


def test_checkin_and_renewal_send_the_api_key_as_a_bearer_token(manager: FakeManager, site_enrolled: Host) -> None:
    held = api_key(site_enrolled)
    assert run("checkin", *site_enrolled.args) == 0
    assert run("renew", *site_enrolled.args) == 0
    assert manager.checkins[0]["authorization"] == f"Bearer {held}"
    assert manager.renewals[0]["authorization"] == f"Bearer {held}"
    assert api_key(site_enrolled) == held  # a renewal without a key keeps the one held


def test_a_plain_agent_sends_no_authorization(manager: FakeManager, enrolled: Host) -> None:
    assert run("checkin", *enrolled.args) == 0
    assert manager.checkins[0]["authorization"] is None


def test_without_its_api_key_the_agent_is_refused_as_revoked(manager: FakeManager, site_enrolled: Host) -> None:
    (site_enrolled.cert_dir / "agent-api-key").unlink()
    assert run("checkin", *site_enrolled.args) == 3


def test_a_renewal_that_rotates_the_api_key_stores_the_new_one(manager: FakeManager, site_enrolled: Host) -> None:
    old = api_key(site_enrolled)
    uid = next(iter(manager.site_agents))

    def rotate(bundle: dict[str, object]) -> dict[str, object]:
        return {**bundle, "agent_api_key": manager._mint(manager.site_agents[uid])}

    manager.tamper_renew = rotate
    assert run("renew", *site_enrolled.args) == 0
    assert api_key(site_enrolled) != old
    assert (site_enrolled.cert_dir / "agent-api-key.prev").read_text().strip() == old
    assert run("checkin", *site_enrolled.args) == 0


# -- crashes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("crash_at", ["ca.pem", "agent-api-key"])
def test_a_crash_between_stash_and_install_keeps_the_api_key(
    manager: FakeManager, host: Host, site: Site, monkeypatch: pytest.MonkeyPatch, crash_at: str
) -> None:
    calls = crash_once(monkeypatch, crash_at)
    with pytest.raises(Crash):
        run(*with_key(manager, host, site.key))
    assert calls[-1].endswith("/" + crash_at)
    assert not (host.cert_dir / "agent-api-key").exists()
    stash = host.cert_dir / "bundle.json.pending"
    assert mode(stash) == 0o600
    minted = next(iter(manager.site_agents.values())).api_key
    assert json.loads(stash.read_text())["agent_api_key"] == minted
    assert site.key not in stash.read_text()  # the site key is not stashed either

    assert run("checkin", *host.args) == 0  # any command finishes the install first

    assert len(manager.site_posts) == 1
    assert api_key(host) == minted
    assert mode(host.cert_dir / "agent-api-key") == 0o600
    assert manager.checkins[0]["authorization"] == f"Bearer {minted}"
    assert host.read_config()["manager"]["site"] == SITE
    assert host.cert_files() == {"ca.pem", "server.pem", "server.key.pem", "agent-api-key", ".lock"}


# -- the seed's spelling, as a process -------------------------------------------------------------------


def test_the_seed_spelling_enrolls_in_the_site_then_serves(
    manager: FakeManager, host: Host, site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(cli.KEY_ENV, site.key)
    proc = agent_cli(
        "--enroll", manager.url, "--site", SITE, "--ca-fingerprint", manager.ca.fingerprint,
        "--listen", "127.0.0.1:0", "-v", *host.args,
    )  # fmt: skip
    reader = StderrReader(proc)
    reader.wait_for("listening on")
    manager.wait_for(lambda: bool(manager.checkins))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    err = reader.rest()
    assert "Traceback" not in err and site.key not in err
    held = api_key(host)
    assert held not in err
    assert manager.checkins[0]["authorization"] == f"Bearer {held}"
    assert manager.status_polls == 0 and len(manager.site_posts) == 1


def test_impostor_ca_is_refused_before_the_key_is_sent(
    manager: FakeManager, host: Host, site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    args = with_key(manager, host, site.key)
    args[args.index("--ca-fingerprint") + 1] = CA().fingerprint
    assert run(*args) == 1
    assert "not the one you pinned" in capsys.readouterr().err
    assert manager.site_posts == []


def test_a_waiting_site_enrollment_is_resumed_by_a_plain_enroll_and_left_for_another_site(
    manager: FakeManager, host: Host
) -> None:
    lab1 = manager.add_site(SITE, policy="manual")
    assert run(*with_key(manager, host, lab1.key, "--max-attempts", "1")) == 5
    # Another site asked for: a new enrollment there, not a poll of the one waiting in lab1.
    lab2 = manager.add_site("lab2", policy="manual")
    assert run(*with_key(manager, host, lab2.key, "--max-attempts", "1", site="lab2")) == 5
    assert [p.body["site_code"] for p in manager.site_posts] == [SITE, "lab2"]
    assert host.read_config()["enrollment"]["site"] == "lab2"
    # A plain `enroll` carries on with what waits, and the host lands in that site.
    manager.approve_after = 1
    assert run(*enroll_args(manager, host)) == 0
    assert manager.enroll_posts == 0 and len(manager.site_posts) == 2
    assert host.read_config()["manager"]["site"] == "lab2"
    assert api_key(host) == next(iter(manager.site_agents.values())).api_key
