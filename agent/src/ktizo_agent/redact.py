"""Keeping secrets out of sight: the site's ``cek_`` enrollment key and the agent's own ``cak_`` API key.

A secret travels as a ``Secret``, whose ``str`` and ``repr`` never show it, and is revealed only where it is put
into a request. Everything the agent prints or logs also goes through ``redact``, which masks anything shaped
like either key and every secret value the agent has read, in case one turns up somewhere nobody planned for
(a server echoing a key in an error, a mistyped option argparse repeats back)."""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from typing import Any

MASK = "…(redacted)"
_SHAPES = re.compile(r"\b(?P<prefix>cek_|cak_(?:[0-9]+_)?)[A-Za-z0-9_\-]{4,}")
_known: set[str] = set()
_lock = threading.Lock()


def register(value: str) -> None:
    """Mask ``value`` wherever it appears from now on, whatever its shape."""
    if len(value) >= 8:
        with _lock:
            _known.add(value)


def redact(text: str) -> str:
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in text:
            text = text.replace(value, MASK)
    return _SHAPES.sub(lambda m: m["prefix"] + MASK, text)


def redact_value(value: Any) -> Any:
    """A copy of a JSON-like value with every string redacted (for logging a request body)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_value(v) for v in value]
    return value


class Secret:
    """A secret string that does not show itself: ``str``, ``repr`` and f-strings give a mask."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value
        register(value)

    def reveal(self) -> str:
        return self._value

    @property
    def fingerprint(self) -> str:
        """What Ktizo shows for a site key, ``vN (XXXX)``'s XXXX: the first four hex digits of its SHA-256, upper case.
        Sixteen bits of a hash of 256 random bits: enough to tell keys apart, nothing to guess one with."""
        return hashlib.sha256(self._value.encode()).hexdigest()[:4].upper()

    def __repr__(self) -> str:
        return f"Secret({MASK})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> Any:  # no pickling a secret into somewhere it outlives the process
        raise TypeError("a Secret cannot be pickled")


class Filter(logging.Filter):
    """Masks secrets in a log record's message, arguments and exception text before any handler sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = redact(formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True
