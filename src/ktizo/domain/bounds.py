"""What the database can hold, for values that arrive from outside: row ids and points in time.

A value outside these ranges names nothing that is stored, but handed to the database driver it fails as an error
(OverflowError on SQLite, "integer out of range" on PostgreSQL, OverflowError converting to UTC) rather than as a
miss. Services check ids here before querying; adapters check times where they parse them."""

from __future__ import annotations

import datetime as dt

from ktizo.domain.errors import ValidationFailed

# Every id column is SQL INTEGER (db/models.py and the migrations): 32-bit signed on PostgreSQL, which refuses a
# larger parameter. SQLite would store up to 2**63-1, but the schema, and so the range, is the same on both.
# Ids are handed out from 1.
MAX_ID = 2**31 - 1
_MAX_ID_DIGITS = len(str(MAX_ID))


def is_possible_id(value: int) -> bool:
    """True if some row could have this id."""
    return 1 <= value <= MAX_ID


def parse_id(text: str) -> int | None:
    """The id a string of ASCII digits names, or None when it is not such a string or no row can have that id.

    The length is checked before ``int``: Python refuses to parse more than 4300 digits (ValueError)."""
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0")
    if len(digits) > _MAX_ID_DIGITS:
        return None
    value = int(digits or "0")
    return value if is_possible_id(value) else None


def as_utc(value: dt.datetime, field: str) -> dt.datetime:
    """``value`` in UTC; a time without a zone is taken as UTC. ValidationFailed (naming ``field``) when UTC has no
    such time: a zone offset moves 0001-01-01T00:00+05:00 before the year 1, and 9999-12-31T23:00-05:00 past 9999,
    and ``datetime`` cannot represent either."""
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    try:
        return value.astimezone(dt.UTC)
    except OverflowError:
        raise ValidationFailed(
            "that time is out of range: in UTC it falls before 0001-01-01 or after 9999-12-31", field
        ) from None
