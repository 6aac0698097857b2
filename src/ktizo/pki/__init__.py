"""Cryptography Ktizo does for itself: sealing secrets at rest (and, later, its CA and CSR signing)."""
