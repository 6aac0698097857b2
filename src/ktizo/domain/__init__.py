"""Pure types and rules of Ktizo (identities, machine states, roles, errors): no framework, no I/O."""
