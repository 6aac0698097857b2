"""Atomic writes, the whitelist under its lock (two processes at once), and the listener's view of the whitelist."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ktizo_agent import config, files, whitelist
from ktizo_agent.errors import AgentError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "wanted"), [(0, 0o600), (0, 0o644), (0o077, 0o644), (0o022, 0o600)])
def test_write_atomic_sets_the_mode_whatever_the_umask(tmp_path: Path, umask: int, wanted: int) -> None:
    old = os.umask(umask)
    try:
        files.write_atomic(tmp_path / "f", b"data", wanted)
    finally:
        os.umask(old)
    assert mode(tmp_path / "f") == wanted
    assert (tmp_path / "f").read_bytes() == b"data"


def test_write_atomic_keeps_prev_as_a_link_to_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "server.pem"
    files.write_atomic(target, b"one", 0o644, keep_prev=True)
    assert not (tmp_path / "server.pem.prev").exists()
    files.write_atomic(target, b"two", 0o644, keep_prev=True)
    files.write_atomic(target, b"three", 0o644, keep_prev=True)
    assert target.read_bytes() == b"three"
    assert (tmp_path / "server.pem.prev").read_bytes() == b"two"
    assert sorted(os.listdir(tmp_path)) == ["server.pem", "server.pem.prev"]


def test_a_failed_write_leaves_the_target_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "ca.pem"
    files.write_atomic(target, b"old", 0o644)

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space"):
        files.write_atomic(target, b"new", 0o644)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["ca.pem"]


def test_write_atomic_refuses_a_symlink_planted_at_the_temp_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "elsewhere").write_bytes(b"keep")
    planted = tmp_path / ".server.key.pem.tmp-0000000000000000"
    planted.symlink_to(tmp_path / "elsewhere")
    monkeypatch.setattr(files, "temp_name", lambda target: planted)
    with pytest.raises(FileExistsError):
        files.write_atomic(tmp_path / "server.key.pem", b"secret", 0o600)
    assert (tmp_path / "elsewhere").read_bytes() == b"keep"


def test_clean_stale_temps_only_takes_ours(tmp_path: Path) -> None:
    for name in (".server.pem.tmp-0123456789abcdef", ".ca.pem.tmp-fedcba9876543210", ".other.tmp-0123456789abcdef",
                 ".server.pem.tmp-short", "server.pem"):  # fmt: skip
        (tmp_path / name).write_text("x")
    removed = files.clean_stale_temps(tmp_path, ["server.pem", "ca.pem"])
    assert sorted(p.name for p in removed) == [".ca.pem.tmp-fedcba9876543210", ".server.pem.tmp-0123456789abcdef"]
    assert sorted(os.listdir(tmp_path)) == [".other.tmp-0123456789abcdef", ".server.pem.tmp-short", "server.pem"]


def test_ensure_dir_creates_0700(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        files.ensure_dir(tmp_path / "a" / "certs")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "certs") == 0o700


def test_config_update_keeps_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("mtls:\n  port: 8443\nenrollment:\n  custom: yes\n")
    config.update(path, lambda data: data["enrollment"].update(polling_token="t"))
    assert yaml.safe_load(path.read_text()) == {
        "mtls": {"port": 8443},
        "enrollment": {"custom": True, "polling_token": "t"},
    }
    assert mode(path) == 0o600


def test_config_that_is_not_a_mapping_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("- a list\n")
    with pytest.raises(AgentError, match="must be a YAML mapping"):
        config.update(path, lambda data: None)
    assert path.read_text() == "- a list\n"


def test_whitelist_append_dedupes_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.yaml"
    path.write_text("allowed_ips:\n  - 10.0.0.1/32\n  - 192.168.0.0/16\nmode: strict\n")
    os.chmod(path, 0o640)
    assert whitelist.append(path, ["10.0.0.1", "10.0.0.2", "192.168.0.0/16", "10.0.0.2"]) == ["10.0.0.2"]
    assert yaml.safe_load(path.read_text()) == {
        "allowed_ips": ["10.0.0.1/32", "192.168.0.0/16", "10.0.0.2"],
        "mode": "strict",
    }
    assert mode(path) == 0o640  # the operator's choice of mode survives the rewrite
    assert whitelist.append(path, ["10.0.0.2"]) == []


def test_whitelist_with_a_bad_shape_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.yaml"
    path.write_text("allowed_ips: 10.0.0.1\n")
    with pytest.raises(AgentError, match="must be a list"):
        whitelist.append(path, ["10.0.0.2"])
    assert path.read_text() == "allowed_ips: 10.0.0.1\n"


APPENDER = """
import sys
from pathlib import Path
from ktizo_agent import whitelist
path, prefix = Path(sys.argv[1]), sys.argv[2]
sys.stdin.readline()  # start together
for i in range(60):
    whitelist.append(path, [f"{prefix}.{i}"])
"""


def test_two_processes_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.yaml"
    procs = [
        subprocess.Popen([sys.executable, "-c", APPENDER, str(path), prefix], stdin=subprocess.PIPE, text=True)
        for prefix in ("10.1.0", "10.2.0")
    ]
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.close()
        codes = [proc.wait(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert codes == [0, 0]
    listed = yaml.safe_load(path.read_text())["allowed_ips"]
    assert sorted(listed) == sorted(f"{p}.{i}" for p in ("10.1.0", "10.2.0") for i in range(60))
    assert sorted(os.listdir(tmp_path)) == ["whitelist.yaml", "whitelist.yaml.lock"]


def test_allowlist_matches_ips_and_cidrs_and_rereads(tmp_path: Path) -> None:
    path = tmp_path / "whitelist.yaml"
    allow = whitelist.Allowlist(path)
    assert not allow.allows("127.0.0.1")  # no file: nobody
    path.write_text("allowed_ips:\n  - 127.0.0.1\n  - 10.0.0.0/8\n  - '2001:db8::/32'\n  - not-an-ip\n")
    assert allow.allows("127.0.0.1")
    assert allow.allows("::ffff:10.2.3.4")  # an IPv4 peer on a dual-stack socket
    assert allow.allows("2001:db8::5")
    assert not allow.allows("192.0.2.1")
    assert not allow.allows("garbage")
    path.write_text("allowed_ips: [\n")  # a half-finished edit closes the door rather than opening it
    assert not allow.allows("127.0.0.1")
    path.write_text("allowed_ips:\n  - 192.0.2.0/24\n")
    assert allow.allows("192.0.2.1") and not allow.allows("127.0.0.1")
