"""Ktizo: the provisioning front door where every new machine waits for approval."""

__version__ = "0.1.0"
