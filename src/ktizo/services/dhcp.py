"""The discovery door: dnsmasq's lease events (through its hook, with a local token) register every new MAC as
pending and keep each machine's lease address, a second identity factor for config downloads."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
from pathlib import Path

from sqlalchemy import select

from ktizo.db import Database
from ktizo.db.models import Device, ServiceToken
from ktizo.db.types import utcnow
from ktizo.domain.devices import Source
from ktizo.domain.errors import Unauthenticated, ValidationFailed
from ktizo.domain.identity import normalize_ip, normalize_mac
from ktizo.services.context import Actor
from ktizo.services.first_contact import FirstContact, Knock
from ktizo.services.ipxe import fact

DNSMASQ = Actor(name="dnsmasq", kind="system")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class DhcpService:
    def __init__(
        self, db: Database, first_contact: FirstContact, *, discovery_subnets: list[str] | None = None
    ) -> None:
        self.db = db
        self.first_contact = first_contact
        self.discovery_subnets = [ipaddress.ip_network(n, strict=False) for n in discovery_subnets or []]

    def issue_token(self, path: Path) -> str:
        """A fresh token for the local dnsmasq's event hook: its hash in the database, the token in ``path``."""
        token = "ktzdhcp_" + secrets.token_urlsafe(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)  # an existing file keeps its old mode through O_TRUNC
            f.write(token + "\n")
        with self.db.write() as s:
            row = s.get(ServiceToken, "dhcp")
            if row is None:
                s.add(ServiceToken(name="dhcp", token_hash=_sha(token)))
            else:
                row.token_hash, row.created_at = _sha(token), utcnow()
        return token

    def check_token(self, token: str | None) -> None:
        with self.db.read() as s:
            row = s.get(ServiceToken, "dhcp")
        if not token or row is None or not hmac.compare_digest(row.token_hash, _sha(token)):
            raise Unauthenticated("not the DHCP event token of this Ktizo's dnsmasq")

    def event(self, action: str, mac: str, ip: str, hostname: str | None) -> str:
        """Record a lease: an unknown MAC becomes a pending device (source dhcp). Returns what was done."""
        if action not in ("add", "old", "del"):
            raise ValidationFailed("action is add, old or del", "action")
        mac = normalize_mac(mac, "mac")
        address = ipaddress.ip_address(normalize_ip(ip, "ip"))
        if self.discovery_subnets and not any(address in net for net in self.discovery_subnets):
            return "ignored: outside the discovery subnets"
        with self.db.write() as s:
            if action == "del":
                device = s.scalar(select(Device).where(Device.mac_address == mac).with_for_update())
                if device is None:
                    return "ignored: unknown MAC released its lease"
                if device.lease_ip == str(address):
                    device.lease_ip = None
                return "lease released"
            facts = {"lease_ip": str(address)}
            if hostname and fact(hostname):
                facts["dhcp_hostname"] = hostname
            knock = Knock(
                door=Source.DHCP,
                mac=mac,
                source_ip=str(address),
                facts=facts,
                lease_ip=str(address),
                actor=DNSMASQ,
            )
            # The hook is a local helper with a token, not a stranger: no new-machine budget for what DHCP saw.
            arrival = self.first_contact.arrive(s, knock, budget=False)
        return "registered" if arrival.created else "updated"
