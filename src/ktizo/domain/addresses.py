"""Who is really calling: the client's address behind reverse proxies Ktizo was told to trust.

Behind a proxy every request comes from the proxy's address, so the throttles, the new-machine budget, the lease
check and the audit would all see one client. The proxy's ``X-Forwarded-For`` header (or, failing that,
``Forwarded``, RFC 7239) names the client, but anyone can send those headers: they are read only from a trusted
peer, and walked from the right, so a client cannot put an address of its choosing in front of the one the proxy
appended."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_FOR = re.compile(r'(?i)(?:^|;)\s*for\s*=\s*("[^"]*"|[^;,\s]*)')


def parse_networks(cidrs: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c.strip(), strict=False) for c in cidrs)


def _address(token: str) -> str | None:
    """``192.0.2.1``, ``192.0.2.1:4711``, ``[2001:db8::1]:4711`` or ``"[2001:db8::1]"`` as a bare address."""
    text = token.strip().strip('"')
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # IPv4 with a port; a bare IPv6 address has several colons
        text = text.split(":")[0]
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None  # "unknown", an obfuscated identifier, or garbage


def _chain(forwarded: str | None, x_forwarded_for: str | None) -> list[str | None]:
    # X-Forwarded-For first: it is what nginx and HAProxy append by default, and they pass a client's own
    # Forwarded header through untouched, which would otherwise let the client pick its address.
    if x_forwarded_for:
        return [_address(part) for part in x_forwarded_for.split(",")]
    if forwarded:
        hops: list[str | None] = []
        for element in forwarded.split(","):
            match = _FOR.search(element)
            hops.append(_address(match.group(1)) if match else None)
        return hops
    return []


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    return _trusted(address, networks)


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    ip = ipaddress.ip_address(address)
    return any(ip in net for net in networks)


def client_address(
    peer: str | None, forwarded: str | None, x_forwarded_for: str | None, trusted: Sequence[Network]
) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the rightmost address of the
    forwarding chain that is not itself a trusted proxy (from ``X-Forwarded-For``, or ``Forwarded`` when a proxy
    sends only that)."""
    if not trusted or peer is None or _address(peer) is None or not _trusted(peer, trusted):
        return peer
    current = peer
    for hop in reversed(_chain(forwarded, x_forwarded_for)):
        if hop is None:
            return current  # a hop nobody can attribute: the last proxy that handed it on is all we know
        current = hop
        if not _trusted(hop, trusted):
            return hop
    return current
