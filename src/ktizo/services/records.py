"""The records the services hand to the adapters: rows read in a finished transaction, to read attributes from
(the adapters never query, nor hold a session)."""

from ktizo.db.models import AgentCertificate, AuditEvent, Device, DeviceGroup

__all__ = ["AgentCertificate", "AuditEvent", "Device", "DeviceGroup"]
