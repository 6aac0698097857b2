"""DHCP discovery: dnsmasq's lease hook reports each lease to the Ktizo server.

dnsmasq runs its ``--dhcp-script`` once per lease change, one at a time, so the hook must be quick and must never
fail: it uses only the standard library (``python -m ktizo.pxe.events`` starts in a tenth of the time the full CLI
takes), drops events it cannot deliver with one line on stderr (dnsmasq logs it), and always exits 0.
The same code backs ``ktizo pxe dhcp-event``, which other DHCP servers' hooks can call."""

from __future__ import annotations

import argparse
import ipaddress
import json
import shlex
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ktizo.domain.errors import ValidationFailed
from ktizo.domain.identity import normalize_mac

ACTIONS = ("add", "old", "del")
EVENTS_PATH = "/api/v1/dhcp/events"
DEFAULT_SERVER = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class DhcpEvent:
    action: str
    mac: str
    ip: str
    hostname: str | None = None

    def as_json(self) -> dict[str, str | None]:
        return {"action": self.action, "mac": self.mac, "ip": self.ip, "hostname": self.hostname}


class Skip(Exception):
    """An event that is not reported; the message says why (for the log)."""


def parse_event(args: Sequence[str]) -> DhcpEvent:
    """``ACTION MAC IP [HOSTNAME]`` as dnsmasq passes them. Raises ``Skip`` for what is not a lease event
    (``tftp``, ``init``, ``arp``…) and for malformed values."""
    if not args:
        raise Skip("no action given")
    action = args[0]
    if action not in ACTIONS:
        raise Skip(f"ignoring {action!r} events")
    if len(args) < 3:
        raise Skip(f"{action}: expected MAC and IP")
    try:
        mac = normalize_mac(args[1], "mac")
    except ValidationFailed as exc:
        # dnsmasq writes non-Ethernet hardware as "<type>-<address>"; none of those PXE-boot Talos.
        raise Skip(str(exc)) from None
    try:
        ip = ipaddress.ip_address(args[2])
    except ValueError:
        raise Skip(f"{args[2][:60]!r} is not an IP address") from None
    hostname = args[3] if len(args) > 3 else ""
    # The client chooses its hostname; one that starts with "-" is not a legal hostname (RFC 952/1123), and one
    # that looks like an option must never be taken for one by whatever parses these arguments next.
    return DhcpEvent(action, mac, str(ip), hostname[:253] if hostname and not hostname.startswith("-") else None)


def in_subnets(ip: str, subnets: Sequence[str]) -> bool:
    if not subnets:
        return True
    address = ipaddress.ip_address(ip)
    return any(address in ipaddress.ip_network(s, strict=False) for s in subnets)


def report(event: DhcpEvent, server: str, token: str, timeout: float = 5.0) -> str:
    """POST the event; returns a one-line outcome. Never raises for network or HTTP trouble."""
    request = urllib.request.Request(  # noqa: S310 - the server URL is Ktizo's own setting, http(s) only
        server.rstrip("/") + EVENTS_PATH,
        data=json.dumps(event.as_json()).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return f"reported {event.action} {event.mac} {event.ip} (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            return (
                f"the server refused the DHCP event token (HTTP 401): restart `ktizo pxe run` against the "
                f"server's data directory; dropped {event.action} {event.mac}"
            )
        return f"the server answered HTTP {exc.code}; dropped {event.action} {event.mac}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return (
            f"Ktizo at {server} is not reachable ({reason}); dropped {event.action} {event.mac} {event.ip} "
            "(it will be registered when it asks for its iPXE script or config)"
        )


def handle(args: Sequence[str], *, server: str, token_file: Path, subnets: Sequence[str] = ()) -> str:
    """The whole hook: parse, filter, read the token, report. Returns the line to log."""
    try:
        event = parse_event(args)
    except Skip as exc:
        return f"dhcp-event: {exc}"
    if not in_subnets(event.ip, subnets):
        return f"dhcp-event: {event.ip} is outside the discovery subnets; {event.mac} not reported"
    try:
        token = token_file.read_text().strip()
    except OSError as exc:
        return f"dhcp-event: cannot read the token {token_file} ({exc.strerror}); is `ktizo pxe run` running?"
    return "dhcp-event: " + report(event, server, token)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktizo.pxe.events", description=__doc__)
    parser.add_argument("--server", default=DEFAULT_SERVER, help="Ktizo's URL")
    parser.add_argument("--token-file", type=Path, required=True)
    parser.add_argument("--subnet", action="append", default=[], help="only report leases in this CIDR")
    # REMAINDER: options end at the first event argument even without "--", because the 4th argument is the
    # hostname the DHCP client chose, and "--server=…" there must not redirect the event and its token.
    parser.add_argument("event", nargs=argparse.REMAINDER, help="ACTION MAC IP [HOSTNAME], as dnsmasq passes them")
    try:
        options = parser.parse_args(argv)
    except SystemExit:
        return 0  # a hook that fails makes dnsmasq log errors on every lease: say nothing more than argparse did
    event = options.event
    if event[:1] == ["--"]:  # REMAINDER keeps the "--" the hook script puts before dnsmasq's arguments
        event = event[1:]
    line = handle(event, server=options.server, token_file=options.token_file, subnets=options.subnet)
    sys.stderr.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def hook_script(python: str, *, server: str, token_file: Path, subnets: Sequence[str] = ()) -> str:
    """The executable dnsmasq's ``dhcp-script=`` points at (dnsmasq passes no arguments of our choosing, so
    ``--`` keeps every one of them, the client's hostname included, from being read as an option)."""
    words = [python, "-m", "ktizo.pxe.events", "--server", server, "--token-file", str(token_file)]
    for subnet in subnets:
        words += ["--subnet", str(ipaddress.ip_network(subnet, strict=False))]
    return (
        "#!/bin/sh\n"
        "# Written by `ktizo pxe run`: dnsmasq runs this on every DHCP lease change.\n"
        f'exec {" ".join(shlex.quote(w) for w in words)} -- "$@"\n'
    )
