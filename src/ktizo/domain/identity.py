"""Normalisation and validation of what machines claim to be: MAC, SMBIOS UUID, serial, hostname, IP."""

from __future__ import annotations

import ipaddress
import re
import uuid as _uuid
from urllib.parse import unquote

from ktizo.domain.errors import ValidationFailed

_HEX12 = re.compile(r"[0-9a-f]{12}")
_PLACEHOLDER = re.compile(r"\$\{[^}]*\}")
_HOST_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_SERIAL_OK = re.compile(r"[\x20-\x7e]{1,128}")


# SMBIOS UUIDs that firmware vendors ship on many boards at once: they identify nothing.
MEANINGLESS_UUIDS = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "03000200-0400-0500-0006-000700080009",
    }
)


def identifying_uuid(value: str | None) -> str | None:
    """``value`` if it can tell one machine from another, else None."""
    return value if value and value not in MEANINGLESS_UUIDS else None


_MACHINE_ID = re.compile(r"[0-9a-f]{32}")


def normalize_machine_id(value: str, field: str = "machine_id") -> str:
    """A systemd machine-id (``/etc/machine-id``): 32 lower-case hex digits, not all zero."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if not _MACHINE_ID.fullmatch(text) or text == "0" * 32:
        raise ValidationFailed("machine_id must be 32 hex digits, as in /etc/machine-id", field)
    return text


def is_placeholder(value: str | None) -> bool:
    """True for values Talos or iPXE sent unexpanded (``${uuid}``), or sent empty: both mean "not known"."""
    if value is None:
        return True
    text = value.strip()
    return not text or bool(_PLACEHOLDER.fullmatch(text)) or bool(_PLACEHOLDER.fullmatch(unquote(text)))


def normalize_mac(value: str, field: str = "mac_address") -> str:
    """Return the canonical ``aa:bb:cc:dd:ee:ff`` form of a unicast MAC given in any common spelling.

    Accepted: colon or dash separated pairs, Cisco dotted quads, bare hex, any case, percent-encoded.
    """
    if not isinstance(value, str):
        raise ValidationFailed("MAC address must be a string", field)
    text = unquote(value).strip().lower()
    if re.fullmatch(r"[0-9a-f]{2}([:-])[0-9a-f]{2}(\1[0-9a-f]{2}){4}", text):
        digits = text.replace(text[2], "")
    elif re.fullmatch(r"[0-9a-f]{4}\.[0-9a-f]{4}\.[0-9a-f]{4}", text):
        digits = text.replace(".", "")
    elif _HEX12.fullmatch(text):
        digits = text
    else:
        raise ValidationFailed(f"{value[:40]!r} is not a MAC address; use a form like aa:bb:cc:dd:ee:ff", field)
    if int(digits[:2], 16) & 1:
        raise ValidationFailed(f"{value!r} is a multicast MAC address; a NIC has a unicast one", field)
    if digits == "000000000000":
        raise ValidationFailed("00:00:00:00:00:00 is not a usable MAC address", field)
    return ":".join(digits[i : i + 2] for i in range(0, 12, 2))


def normalize_uuid(value: str, field: str = "uuid") -> str:
    """Return the lower-case 8-4-4-4-12 form Talos prints (``google/uuid``), whatever the input spelling."""
    text = unquote(value).strip()
    try:
        return str(_uuid.UUID(text))
    except (ValueError, AttributeError):
        raise ValidationFailed(f"{value[:60]!r} is not an SMBIOS UUID", field) from None


def normalize_serial(value: str, field: str = "serial") -> str:
    """Return a serial number as reported, trimmed; printable ASCII only, at most 128 characters."""
    text = unquote(value).strip()
    if not _SERIAL_OK.fullmatch(text):
        raise ValidationFailed("serial must be 1-128 printable ASCII characters", field)
    return text


def normalize_hostname(value: str, field: str = "hostname") -> str:
    """Return an RFC 1123 hostname (or FQDN) in lower case: labels of 1-63 ``[a-z0-9-]``, at most 253 in all."""
    text = value.strip().lower().rstrip(".")
    if not text:
        raise ValidationFailed("hostname must not be empty", field)
    if len(text) > 253:
        raise ValidationFailed("hostname is longer than 253 characters", field)
    for label in text.split("."):
        if not _HOST_LABEL.fullmatch(label):
            raise ValidationFailed(
                f"{value[:80]!r} is not an RFC 1123 hostname: labels are 1-63 letters, digits or "
                "hyphens, not starting or ending with a hyphen",
                field,
            )
    if text.split(".")[-1].isdigit():
        raise ValidationFailed(f"{value!r} looks like an IP address, not a hostname", field)
    return text


def normalize_interface_address(value: str, field: str = "ip_address") -> str:
    """Return a static address in CIDR form (``10.0.5.100/24``), checked to be usable as a host address."""
    text = value.strip()
    if "/" not in text:
        raise ValidationFailed(
            f"{value[:60]!r} has no prefix length; give the address in CIDR form, e.g. 10.0.5.100/24", field
        )
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise ValidationFailed(f"{value[:60]!r} is not an IP address in CIDR form", field) from None
    ip, net = iface.ip, iface.network
    if ip.is_multicast or ip.is_unspecified or ip.is_loopback or ip.is_link_local:
        raise ValidationFailed(f"{ip} cannot be a machine's static address", field)
    if net.num_addresses > 2 and ip in (net.network_address, getattr(net, "broadcast_address", None)):
        what = "network" if ip == net.network_address else "broadcast"
        raise ValidationFailed(f"{ip} is the {what} address of {net}; pick a host address", field)
    if net.prefixlen == 0:
        raise ValidationFailed("a /0 prefix is not a network a machine can live in", field)
    return f"{ip}/{net.prefixlen}"


def normalize_ip(value: str, field: str = "ip") -> str:
    """Return a bare IP address (no prefix), as seen on a lease or a request."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        raise ValidationFailed(f"{value[:60]!r} is not an IP address", field) from None
