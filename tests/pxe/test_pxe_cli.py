"""``ktizo pxe config`` and the errors of ``ktizo pxe run`` that come before dnsmasq starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from ktizo.cli import app
from ktizo.pxe import supervisor as sup
from ktizo.settings import Settings


@pytest.fixture
def cli(settings: Settings):  # type: ignore[no-untyped-def]
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}

    def run(*args: str, code: int = 0, **extra: str):  # type: ignore[no-untyped-def]
        result = runner.invoke(app, list(args), env={**env, **extra})
        assert result.exit_code == code, result.output
        return result

    return run


def test_config_proxy_mode(cli, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    out = cli(
        "pxe", "config", "--interface", "eth1", "--subnet", "192.168.7.0/24", "--boot-url", "http://192.168.7.2:8000/boot.ipxe"
    ).stdout  # fmt: skip
    assert "interface=eth1\n" in out and "dhcp-range=192.168.7.0,proxy\n" in out
    assert "dhcp-boot=tag:ipxe,http://192.168.7.2:8000/boot.ipxe\n" in out
    assert f"tftp-root={settings.pxe_dir / 'tftp'}\n" in out
    assert f"dhcp-script={settings.pxe_dir / 'dhcp-event'}\n" in out


def test_config_full_mode_from_settings_and_interface(cli) -> None:  # type: ignore[no-untyped-def]
    out = cli(
        "pxe", "config", KTIZO_PXE_INTERFACE="lo", KTIZO_DHCP_MODE="full", KTIZO_DHCP_RANGE="127.0.0.100,127.0.0.200"
    ).stdout
    assert "dhcp-range=127.0.0.100,127.0.0.200,12h\n" in out and "no-ping\n" in out
    # No public URL: the interface's own address and Ktizo's port.
    assert "dhcp-boot=tag:ipxe,http://127.0.0.1:8000/boot.ipxe\n" in out
    public = cli("pxe", "config", "-i", "lo", "--mode", "full", "--range", "127.0.0.5,127.0.0.6,1h",
                 KTIZO_PUBLIC_URL="http://ktizo.example:8080/").stdout  # fmt: skip
    assert "dhcp-boot=tag:ipxe,http://ktizo.example:8080/boot.ipxe\n" in public


def test_config_errors_say_what_to_do(cli) -> None:  # type: ignore[no-untyped-def]
    assert "--interface IF" in cli("pxe", "config", code=2).output
    assert "needs an address range" in cli("pxe", "config", "-i", "lo", "--mode", "full", code=2).output
    assert (
        "a DHCP range is START,END" in cli("pxe", "config", "-i", "lo", "--mode", "full", "--range", "x", code=2).output
    )
    missing = cli("pxe", "config", "-i", "ktizo-nope0", "--mode", "proxy", code=1).output
    assert "there is no network interface 'ktizo-nope0'" in missing and "--subnet" in missing
    assert "use proxy or full" in cli("pxe", "config", "-i", "lo", KTIZO_DHCP_MODE="relay", code=2).output
    assert "not an interface name" in cli("pxe", "config", "-i", "lo;rm", "--subnet", "10.0.0.0/8",
                                          "--boot-url", "http://h/boot.ipxe", code=2).output  # fmt: skip


def test_run_without_dnsmasq_names_the_package(cli, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sup, "DNSMASQ_PATHS", ("/nonexistent/dnsmasq",))
    out = cli("pxe", "run", "-i", "lo", "--subnet", "127.0.0.0/8", code=1).output
    assert "install Debian's dnsmasq-base" in out


def test_run_refuses_a_tftp_root_dnsmasq_cannot_read(cli, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    if not Path("/usr/lib/ipxe/undionly.kpxe").exists() or not Path("/usr/sbin/dnsmasq").exists():
        pytest.skip("needs Debian's ipxe and dnsmasq")
    import os

    if os.geteuid() != 0:
        pytest.skip("dnsmasq only changes user when started as root")
    # pytest's tmp_path lives below a 0700 directory, as a data dir under /root would.
    out = cli("pxe", "run", "-i", "lo", "--subnet", "127.0.0.0/8", code=1).output
    assert "dnsmasq serves TFTP as user 'nobody', who cannot enter" in out and "chmod o+x" in out
