"""What a device would receive, for operators: redacted unless an admin asks to reveal it (audited)."""

from __future__ import annotations

from ktizo.db import Database
from ktizo.db.models import Device
from ktizo.domain.errors import NotFound
from ktizo.domain.users import UserRole
from ktizo.services import audit
from ktizo.services.context import Actor
from ktizo.services.render import Renderer
from ktizo.talos import dump_documents, redact


class PreviewService:
    def __init__(self, db: Database, renderer: Renderer) -> None:
        self.db = db
        self.renderer = renderer

    def config(self, actor: Actor, device_id: int, *, reveal: bool = False) -> str:
        actor.require(UserRole.ADMIN if reveal else UserRole.OPERATOR)
        with self.db.read() as s:
            device = s.get(Device, device_id)
        if device is None:
            raise NotFound(f"no device with id {device_id}")
        docs = self.renderer.documents(device, self.renderer.source.snapshot())
        if reveal:
            with self.db.write() as s:
                audit.record(s, actor, "config_reveal", device, {"revision": device.revision})
            return dump_documents(docs)
        return dump_documents(redact(docs))
