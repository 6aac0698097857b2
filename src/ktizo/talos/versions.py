"""Talos minor versions Ktizo can generate configuration for, and parsing of version strings."""

from __future__ import annotations

import re
from typing import NamedTuple

from ktizo.domain.errors import ValidationFailed

# Patch releases never change the config format, so a full "v1.13.9" is accepted and reduced to its minor.
_VERSION = re.compile(r"v?(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))?")


class TalosVersion(NamedTuple):
    """A Talos minor version; the config format (the "version contract") only changes between minors."""

    major: int
    minor: int

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}"

    @property
    def multidoc_network(self) -> bool:
        """True when hostname, links and resolvers belong in their own documents (Talos 1.12 and later)."""
        return self >= (1, 12)


SUPPORTED_TALOS_VERSIONS: tuple[TalosVersion, ...] = (
    TalosVersion(1, 11),
    TalosVersion(1, 12),
    TalosVersion(1, 13),
)
DEFAULT_TALOS_VERSION = TalosVersion(1, 13)


def _supported_list() -> str:
    return ", ".join(str(v) for v in SUPPORTED_TALOS_VERSIONS)


def parse_talos_version(text: str) -> TalosVersion:
    """Parse "v1.13", "1.13", "v1.13.9" or "1.12.0" into a supported ``TalosVersion``."""
    match = _VERSION.fullmatch(text.strip())
    if match is None:
        raise ValidationFailed(
            f"{text[:40]!r} is not a Talos version such as v1.13; supported: {_supported_list()}",
            "talos_version",
        )
    version = TalosVersion(int(match.group(1)), int(match.group(2)))
    # A newer minor may load configs Ktizo writes, but older ones reject unknown documents and a newer
    # contract moves fields again (1.14 does), so only versions whose format Ktizo knows are accepted.
    if version not in SUPPORTED_TALOS_VERSIONS:
        raise ValidationFailed(f"Talos {version} is not supported; supported: {_supported_list()}", "talos_version")
    return version
