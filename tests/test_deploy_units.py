"""The systemd units in deploy/systemd/: each one passes ``systemd-analyze verify`` without a warning, and each
ExecStart is a command this Ktizo (or ktizo-agent) still has."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "deploy" / "systemd"
UNIT_NAMES = ("ktizo.service", "ktizo-pxe.service", "ktizo-agent.service")
SYSTEM_UNITS = Path("/usr/lib/systemd/system")
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(
    ANALYZE is None or not SYSTEM_UNITS.is_dir(), reason="systemd-analyze (Debian's systemd) is not installed"
)


def _unit(name: str) -> dict[str, list[str]]:
    """The unit's [Service] settings, each key with all its values."""
    values: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, _, value = line.partition("=")
        values.setdefault(f"{section}{key}", []).append(value)
    return values


def _exec_start(name: str) -> list[str]:
    (command,) = _unit(name)["[Service]ExecStart"]
    return shlex.split(command)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A file system root for ``systemd-analyze verify --root``: the system's own units (the targets the units
    name), and stand-ins for the programs the units run at the paths they run them from."""
    root = tmp_path / "root"
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    for name in UNIT_NAMES:
        binary = root / _exec_start(name)[0].lstrip("/")
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_text("#!/bin/sh\nexit 0\n")
        binary.chmod(0o755)
    return root


def _verify(root: Path, name: str, text: str) -> subprocess.CompletedProcess[str]:
    (root / "etc/systemd/system" / name).write_text(text)
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", "--generators=no", f"--root={root}", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_systemd
@pytest.mark.parametrize("name", UNIT_NAMES)
def test_unit_passes_systemd_analyze_verify(root: Path, name: str) -> None:
    result = _verify(root, name, (UNITS / name).read_text())
    # An unknown or misspelt setting is only a warning (the unit still loads, without it): any output fails.
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd
@pytest.mark.parametrize(
    ("change", "reported"),
    [
        (("NoNewPrivileges=true", "NoNewPrivileges=true\nProtectSystm=strict"), "Unknown key 'ProtectSystm'"),
        (("Restart=on-failure", "Restart=sometimes"), "Failed to parse service restart specifier"),
        (("ExecStart=/usr/local/bin/ktizo serve", "ExecStart=/usr/local/bin/ktizo-server serve"), "not executable"),
    ],
)
def test_a_broken_unit_is_reported(root: Path, change: tuple[str, str], reported: str) -> None:
    text = (UNITS / "ktizo.service").read_text()
    assert change[0] in text
    result = _verify(root, "ktizo.service", text.replace(change[0], change[1]))
    assert result.returncode != 0 or result.stdout + result.stderr
    assert reported in result.stdout + result.stderr


def test_the_units_run_the_documented_binaries_as_intended() -> None:
    assert _exec_start("ktizo.service") == ["/usr/local/bin/ktizo", "serve"]
    assert _exec_start("ktizo-pxe.service") == ["/usr/local/bin/ktizo", "pxe", "run"]
    assert _exec_start("ktizo-agent.service") == ["/usr/local/bin/ktizo-agent", "serve"]
    server = _unit("ktizo.service")
    assert server["[Service]User"] == ["ktizo"]
    assert server["[Service]Environment"] == ["KTIZO_DATA_DIR=/var/lib/ktizo"]
    assert server["[Service]EnvironmentFile"] == ["-/etc/ktizo/ktizo.env"]
    assert server["[Service]StateDirectory"] == ["ktizo"]
    assert server["[Service]StateDirectoryMode"] == ["0700"]
    assert "AmbientCapabilities" not in "".join(server)  # ports 8000 and 8443 need none
    assert _unit("ktizo-pxe.service")["[Service]Environment"] == ["KTIZO_DATA_DIR=/var/lib/ktizo"]


@pytest.mark.parametrize("name", UNIT_NAMES)
def test_the_units_commands_exist(name: str) -> None:
    """``ktizo serve --help``, ``ktizo pxe run --help``, ``ktizo-agent serve --help``: a renamed command fails."""
    program, *args = _exec_start(name)
    installed = shutil.which(Path(program).name, path=str(Path(sys.executable).parent)) or shutil.which(
        Path(program).name
    )
    assert installed, f"{Path(program).name} is not installed next to this Python"
    result = subprocess.run([installed, *args, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "usage" in result.stdout.lower()
