"""Secrets at rest: sealed with a key the operator holds (``KTIZO_SECRET_KEY`` or ``KTIZO_SECRET_KEY_FILE``).

Values are stored as ``fernet:<token>`` (AES-128-CBC + HMAC-SHA256, cryptography's Fernet) or, without a key,
``plain:<text>``. Several keys may be given, newest first: the first seals, all open, which is how a key is
rotated (``ktizo secrets rekey`` then re-seals everything with the first)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ktizo.domain.errors import NotReady

if TYPE_CHECKING:  # cryptography loads once a key is in play: without one, nothing here needs it
    from cryptography.fernet import MultiFernet

_FERNET = "fernet:"
_PLAIN = "plain:"


class SealingError(NotReady):
    """A sealed value cannot be opened: the key is missing or wrong (a server misconfiguration, so 503)."""


def generate_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def parse_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.replace("\n", ",").split(",") if k.strip()]
    if keys:
        from cryptography.fernet import Fernet
    for key in keys:
        try:
            Fernet(key)
        except (ValueError, TypeError):
            raise SealingError(
                "KTIZO_SECRET_KEY must be one or more comma-separated keys from `ktizo secrets generate-key` "
                "(32 url-safe base64 bytes)"
            ) from None
    return keys


class Sealer:
    def __init__(self, keys: list[str] | None = None, *, seal: bool = True) -> None:
        self.keys = keys or []
        self._fernet: MultiFernet | None = None
        if self.keys:
            from cryptography.fernet import Fernet, MultiFernet

            self._fernet = MultiFernet([Fernet(k) for k in self.keys])
        self._seals = seal and self._fernet is not None

    def unsealing(self) -> Sealer:
        """A sealer that opens with these keys but stores plaintext: the way back from sealed storage."""
        return Sealer(self.keys, seal=False)

    @property
    def enabled(self) -> bool:
        return self._seals

    def seal(self, plaintext: str) -> str:
        if not self._seals or self._fernet is None:
            return _PLAIN + plaintext
        return _FERNET + self._fernet.encrypt(plaintext.encode()).decode()

    def open(self, stored: str) -> str:
        if stored.startswith(_PLAIN):
            return stored[len(_PLAIN) :]
        if not stored.startswith(_FERNET):
            raise SealingError("stored secret has an unknown format")
        if self._fernet is None:
            raise SealingError(
                "the cluster secrets are sealed, but no key is configured: set KTIZO_SECRET_KEY or "
                "KTIZO_SECRET_KEY_FILE to the key they were sealed with"
            )
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(stored[len(_FERNET) :].encode()).decode()
        except InvalidToken:
            raise SealingError(
                "cannot open the sealed cluster secrets with the configured key(s): list the old key after the "
                "new one in KTIZO_SECRET_KEY while rotating"
            ) from None

    def needs_reseal(self, stored: str) -> bool:
        """True when ``stored`` is not sealed with the current first key (or not sealed while a key is set)."""
        if not self._seals or self._fernet is None:
            return not stored.startswith(_PLAIN)
        if stored.startswith(_PLAIN):
            return True
        from cryptography.fernet import Fernet, InvalidToken

        token = stored[len(_FERNET) :].encode()
        try:
            Fernet(self.keys[0]).decrypt(token)
        except InvalidToken:
            return True
        return False
