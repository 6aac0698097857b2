"""Cryptography Ktizo does for itself: certificates and keys (Talos's CAs, later its own CA and CSR signing), and
sealing secrets at rest. No storage, no framework."""
