"""``ktizo pxe …``: dnsmasq (proxyDHCP/DHCP + TFTP) under Ktizo, and the DHCP event hook."""

from __future__ import annotations

import ipaddress
import logging
import os
import pwd
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from ktizo.cli.common import fail, reports_errors, reports_errors_without_transaction, state
from ktizo.domain.errors import ValidationFailed
from ktizo.pxe import events
from ktizo.pxe.dnsmasq import DhcpMode, DhcpRange, DnsmasqConfig, render
from ktizo.pxe.netif import InterfaceError, has_routable_ipv6, ipv4_interface
from ktizo.pxe.supervisor import (
    Supervisor,
    SupervisorError,
    diagnose_dnsmasq,
    dnsmasq_argv,
    find_dnsmasq,
    hold_lock,
    stop_stale,
)
from ktizo.pxe.tftp import IPXE_DIR, IpxeMissing, boot_files, find_builds, prepare_tftp_root, unreachable_for

if TYPE_CHECKING:
    from ktizo.settings import Settings

app = typer.Typer(help="PXE: dnsmasq config and supervision, DHCP discovery events.", no_args_is_help=True)

Interfaces = Annotated[
    list[str] | None,
    typer.Option(
        "--interface", "-i", metavar="IF", help="Interface to serve PXE on (repeatable) [default: KTIZO_PXE_INTERFACE]"
    ),
]
Mode = Annotated[
    DhcpMode | None,
    typer.Option(help="proxy: next to an existing DHCP server; full: hand out addresses [default: KTIZO_DHCP_MODE]"),
]
Ranges = Annotated[
    list[str] | None,
    typer.Option(
        "--range",
        metavar="START,END[,LEASE]",
        help="Full mode: an address range (repeatable) [default: KTIZO_DHCP_RANGE]",
    ),
]
Subnets = Annotated[
    list[str] | None,
    typer.Option("--subnet", metavar="CIDR", help="Proxy mode: subnet to serve [default: the interface's IPv4 subnet]"),
]
BootUrl = Annotated[
    str | None,
    typer.Option(help="URL of /boot.ipxe for iPXE [default: KTIZO_PUBLIC_URL, else http://<interface IP>:<port>]"),
]
Ra = Annotated[
    bool,
    typer.Option(
        "--ipv6-ra/--no-ipv6-ra",
        help="Send IPv6 router advertisements (prefix only, not a default route) for the interface's IPv6 prefix. "
        "iPXE waits ~16 s for one on networks without an IPv6 router; this removes that wait.",
    ),
]
DnsmasqUser = Annotated[
    str | None, typer.Option("--dnsmasq-user", help="User dnsmasq drops privileges to [default: dnsmasq's, nobody]")
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log every DHCP option dnsmasq sends (log-dhcp)")]
EfiX64 = Annotated[
    str, typer.Option("--efi-x64", help="iPXE build for x86-64 UEFI: snponly.efi (the firmware's NIC) or ipxe.efi")
]


def _server_url(settings: Settings) -> str:
    return (settings.public_url or f"http://127.0.0.1:{settings.port}").rstrip("/")


def _build(
    settings: Settings,
    interfaces: list[str] | None,
    mode: DhcpMode | None,
    ranges: list[str] | None,
    subnets: list[str] | None,
    boot_url: str | None,
    ra: bool,
    user: str | None,
    verbose: bool,
    efi_x64: str,
) -> DnsmasqConfig:
    names = interfaces or [i.strip() for i in (settings.pxe_interface or "").split(",") if i.strip()]
    if not names:
        fail("name the interface to serve PXE on: --interface IF (or KTIZO_PXE_INTERFACE)", 2)
    try:
        chosen = mode or DhcpMode(settings.dhcp_mode)
    except ValueError:
        fail(f"KTIZO_DHCP_MODE is {settings.dhcp_mode!r}: use proxy or full", 2)
        raise
    range_texts = ranges or ([settings.dhcp_range] if settings.dhcp_range else [])
    parsed_ranges = tuple(DhcpRange.parse(r) for r in range_texts) if chosen is DhcpMode.FULL else ()
    proxy_subnets: tuple[ipaddress.IPv4Network, ...] = ()
    if chosen is DhcpMode.PROXY:
        try:
            proxy_subnets = tuple(ipaddress.IPv4Network(s, strict=False) for s in subnets or [])
        except ValueError as exc:
            raise ValidationFailed(str(exc), "subnet") from None
        if not proxy_subnets:
            proxy_subnets = tuple(_interface(n).network for n in names)
    if boot_url is None:
        base = settings.public_url or f"http://{_interface(names[0]).ip}:{settings.port}"
        boot_url = base.rstrip("/") + "/boot.ipxe"
    tftp_root = settings.pxe_dir / "tftp"
    config = DnsmasqConfig(
        interfaces=tuple(names),
        mode=chosen,
        tftp_root=tftp_root,
        boot_url=boot_url,
        lease_file=settings.pxe_dir / "dnsmasq.leases",
        ranges=parsed_ranges,
        proxy_subnets=proxy_subnets,
        boot_files=boot_files(find_builds(IPXE_DIR, tftp_root), efi_x64=efi_x64),
        dhcp_script=settings.pxe_dir / "dhcp-event",
        pid_file=settings.pxe_dir / "dnsmasq.pid",
        router_advertisements=ra,
        user=user,
        log_dhcp=verbose,
    )
    config.validate()
    return config


def _interface(name: str) -> ipaddress.IPv4Interface:
    try:
        return ipv4_interface(name)
    except InterfaceError as exc:
        fail(f"{exc}; pass --subnet and --boot-url to describe it without reading it")
        raise


@app.command()
@reports_errors
def config(
    ctx: typer.Context,
    interface: Interfaces = None,
    mode: Mode = None,
    range_: Ranges = None,
    subnet: Subnets = None,
    boot_url: BootUrl = None,
    ipv6_ra: Ra = False,
    dnsmasq_user: DnsmasqUser = None,
    verbose: Verbose = False,
    efi_x64: EfiX64 = "snponly.efi",
) -> None:
    """Print the dnsmasq configuration `ktizo pxe run` would use."""
    settings = state(ctx).settings
    cfg = _build(settings, interface, mode, range_, subnet, boot_url, ipv6_ra, dnsmasq_user, verbose, efi_x64)
    sys.stdout.write(render(cfg))


@app.command()
@reports_errors_without_transaction  # it runs for as long as dnsmasq does: each step commits itself
def run(
    ctx: typer.Context,
    interface: Interfaces = None,
    mode: Mode = None,
    range_: Ranges = None,
    subnet: Subnets = None,
    boot_url: BootUrl = None,
    ipv6_ra: Ra = False,
    dnsmasq_user: DnsmasqUser = None,
    verbose: Verbose = False,
    efi_x64: EfiX64 = "snponly.efi",
) -> None:
    """Run dnsmasq for PXE until stopped.

    Serves proxyDHCP (or full DHCP) and TFTP on the interface until Ctrl-C or SIGTERM; dnsmasq is restarted with
    backoff if it dies."""
    st = state(ctx)
    settings = st.settings
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    services = st.services()  # first: a wrong data directory is reported before anything is written into it
    cfg = _build(settings, interface, mode, range_, subnet, boot_url, ipv6_ra, dnsmasq_user, verbose, efi_x64)
    try:
        binary = find_dnsmasq()
        tftp = prepare_tftp_root(cfg.tftp_root, IPXE_DIR, efi_x64=efi_x64)
    except (SupervisorError, IpxeMissing) as exc:
        fail(str(exc))
        return
    pxe_dir = settings.pxe_dir
    pxe_dir.chmod(0o755)  # dnsmasq's unprivileged user reads the TFTP root below it
    _check_tftp_access(cfg)
    try:
        _lock = hold_lock(pxe_dir / "pxe.lock")  # held until the process ends
    except SupervisorError as exc:
        fail(str(exc))
    if ipv6_ra and not any(has_routable_ipv6(n) for n in cfg.interfaces):
        typer.echo("note: --ipv6-ra needs an IPv6 prefix on the interface (e.g. a ULA fd00::/8 address)", err=True)
    token_file = pxe_dir / "dhcp-token"
    # Only whoever can read this file (root) can report DHCP events: the server keeps the token's hash.
    services.dhcp.issue_token(token_file)
    assert cfg.dhcp_script is not None
    _write(
        cfg.dhcp_script,
        events.hook_script(
            sys.executable, server=_server_url(settings), token_file=token_file, subnets=settings.discovery_subnets
        ),
        0o700,
    )
    conf_file = pxe_dir / "dnsmasq.conf"
    _write(conf_file, render(cfg), 0o644)
    if cfg.pid_file is not None:
        # We hold the lock, so a dnsmasq named in the pid file belongs to a `pxe run` that was killed.
        stop_stale(cfg.pid_file, str(conf_file))

    served = ", ".join(f"{fw}: {name}" for fw, name in vars(tftp.boot_files).items() if name) or "nothing"
    how = (
        f"full DHCP ({', '.join(r.render() for r in cfg.ranges)})"
        if cfg.mode is DhcpMode.FULL
        else f"proxyDHCP on {', '.join(map(str, cfg.proxy_subnets))}"
    )
    typer.echo(f"PXE on {', '.join(cfg.interfaces)}: {how}; TFTP {served}; iPXE -> {cfg.boot_url}")
    if cfg.mode is DhcpMode.PROXY:
        typer.echo(
            "proxy mode: dnsmasq hands out no leases here, so DHCP discovery needs the site's DHCP server to call "
            "`ktizo pxe dhcp-event`; machines are registered anyway when iPXE asks for their script"
        )

    stop = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    supervisor = Supervisor(
        dnsmasq_argv(binary, conf_file),
        name="dnsmasq",
        diagnose=diagnose_dnsmasq,
        logger=logging.getLogger("ktizo.pxe"),
    )
    try:
        supervisor.run(stop)
    except SupervisorError as exc:
        fail(str(exc))


def _check_tftp_access(cfg: DnsmasqConfig) -> None:
    if os.geteuid() != 0:
        return  # dnsmasq cannot change user then, and reads files as we do
    user = cfg.user or "nobody"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        fail(f"dnsmasq would run as user {user!r}, which does not exist: pass --dnsmasq-user", 2)
        return
    if entry.pw_uid == 0:
        return
    blocked = unreachable_for(cfg.tftp_root, entry.pw_uid, entry.pw_gid)
    if blocked is not None:
        fail(
            f"dnsmasq serves TFTP as user {user!r}, who cannot enter {blocked} "
            f"(mode {blocked.stat().st_mode & 0o777:o}): use a data directory others may traverse "
            f"(chmod o+x {blocked}), or --dnsmasq-user"
        )


def _write(path: Path, text: str, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(mode)
    os.replace(tmp, path)


@app.command(
    "dhcp-event",
    # Options end at the first argument: the hostname after ACTION MAC IP is the DHCP client's choice, and
    # "--server=…" there must not send the event, with the token, elsewhere.
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "allow_interspersed_args": False},
)
def dhcp_event(
    ctx: typer.Context,
    args: Annotated[list[str] | None, typer.Argument(help="ACTION MAC IP [HOSTNAME] (add, old, del)")] = None,
    server: Annotated[str | None, typer.Option(help="Ktizo's URL [default: KTIZO_PUBLIC_URL or local]")] = None,
    token_file: Annotated[Path | None, typer.Option(help="[default: <data dir>/pxe/dhcp-token]")] = None,
) -> None:
    """Report a DHCP lease to Ktizo (dnsmasq's --dhcp-script).

    Always exits 0, so that a down server never makes the DHCP server fail; the outcome is one line on stderr."""
    settings = state(ctx).settings
    line = events.handle(
        [*(args or []), *ctx.args],
        server=server or _server_url(settings),
        token_file=token_file or settings.pxe_dir / "dhcp-token",
        subnets=settings.discovery_subnets,
    )
    typer.echo(line, err=True)
