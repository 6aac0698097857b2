"""What Linux says about a network interface: its IPv4 address and whether it has a routable IPv6 one."""

from __future__ import annotations

import fcntl
import ipaddress
import socket
import struct
from pathlib import Path

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B


class InterfaceError(RuntimeError):
    pass


def _ioctl_ipv4(ifname: str, request: int) -> ipaddress.IPv4Address:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = struct.pack("256s", ifname.encode()[:15])
        try:
            answer = fcntl.ioctl(s.fileno(), request, packed)
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                raise InterfaceError(f"there is no network interface {ifname!r}") from None
            if exc.errno == 99:  # EADDRNOTAVAIL
                raise InterfaceError(f"interface {ifname!r} has no IPv4 address") from None
            raise InterfaceError(f"cannot read the address of {ifname!r}: {exc.strerror}") from None
    return ipaddress.IPv4Address(answer[20:24])


def ipv4_interface(ifname: str) -> ipaddress.IPv4Interface:
    """The interface's (primary) IPv4 address with its prefix, e.g. 10.0.0.1/24."""
    address = _ioctl_ipv4(ifname, _SIOCGIFADDR)
    netmask = _ioctl_ipv4(ifname, _SIOCGIFNETMASK)
    return ipaddress.IPv4Interface(f"{address}/{netmask}")


def has_routable_ipv6(ifname: str, proc: Path = Path("/proc/net/if_inet6")) -> bool:
    """True if the interface has an IPv6 address that is not link-local (dnsmasq advertises its prefix)."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) == 6 and fields[5] == ifname:
            address = ipaddress.IPv6Address(int(fields[0], 16))
            if not address.is_link_local and not address.is_loopback:
                return True
    return False
