"""Approve by console code: the operator types the code a Talos console shows and approves exactly that machine.

Wrong codes are counted per operator (guessing codes would be guessing which machine gets a config); the approval
and the code's state change in one transaction, through the one approval transition."""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import CursorResult

from ktizo.db import Database
from ktizo.db.engine import keep_on_refusal
from ktizo.db.models import Device, DeviceCode
from ktizo.db.types import utcnow
from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import NotFound, PermissionDenied
from ktizo.domain.users import UserRole
from ktizo.services import refusals
from ktizo.services.context import Actor
from ktizo.services.device_flow import normalize_user_code
from ktizo.services.devices import DeviceChanges, DeviceService

# Wrong console codes an operator may type before being locked out for a while.
CODE_MISSES_ALLOWED = 10
CODE_MISS_WINDOW = dt.timedelta(minutes=15)


class ConsoleCodeService:
    def __init__(self, db: Database, devices: DeviceService) -> None:
        self.db = db
        self.devices = devices

    def _code_row(self, actor: Actor, code: str) -> DeviceCode:
        user_code = normalize_user_code(code)
        with self.db.read() as s:
            misses, _ = refusals.count(s, "device_code_miss", utcnow() - CODE_MISS_WINDOW, subject=actor.name)
            if misses >= CODE_MISSES_ALLOWED:
                raise PermissionDenied(
                    f"too many wrong console codes ({misses} in {int(CODE_MISS_WINDOW.total_seconds() // 60)} "
                    "minutes); wait before trying again"
                )
            row = s.scalar(select(DeviceCode).where(DeviceCode.user_code == user_code))
        if row is None or row.status != "pending" or row.expires_at <= utcnow():
            with self.db.write() as s:
                refusals.refuse(s, actor, "device_code_miss", actor.name, None, {"user_code": user_code})
            keep_on_refusal()  # the miss is what the lockout counts
            raise NotFound(f"no machine is waiting with console code {user_code}")
        return row

    def lookup(self, actor: Actor, code: str) -> Device:
        actor.require(UserRole.OPERATOR)
        row = self._code_row(actor, code)
        return self.devices.get(row.device_id)

    def approve(self, actor: Actor, code: str, changes: DeviceChanges) -> Device:
        """Approve the machine showing ``code``: the code and the device change in one transaction, so a token
        poll can never see one without the other."""
        actor.require(UserRole.OPERATOR)
        row = self._code_row(actor, code)
        with self.db.write() as s:
            result = s.execute(
                update(DeviceCode)
                .where(DeviceCode.id == row.id, DeviceCode.status == "pending")
                .values(status="approved", approved_by=actor.name)
            )
            claimed = cast("CursorResult[Any]", result).rowcount
            if not claimed:
                raise NotFound(f"no machine is waiting with console code {row.user_code}")
            device = s.scalar(select(Device).where(Device.id == row.device_id).with_for_update())
            if device is None:
                raise NotFound(f"no machine is waiting with console code {row.user_code}")
            if device.status != DeviceStatus.APPROVED.value or changes.items():
                # Approving an approved device with new fields is the same 409 as a direct approval.
                device = self.devices.approve_in(s, actor, device, changes, details={"user_code": row.user_code})
        return device
