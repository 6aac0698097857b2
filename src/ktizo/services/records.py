"""The records the services hand to the adapters: rows read in a finished transaction, to read attributes from
(the adapters never query, nor hold a session)."""

from ktizo.db.models import AuditEvent, Device, DeviceGroup

__all__ = ["AuditEvent", "Device", "DeviceGroup"]
