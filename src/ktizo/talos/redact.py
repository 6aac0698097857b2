"""Hiding the secrets of a Talos config before it is shown, logged or diffed.

Secrets are found two ways: by field (the CA keys, join tokens and encryption secrets Talos generates, and
the credentials operators add), and, as a second line of defence, by content: any string that holds a
PEM private key, as text or base64-encoded as Talos stores keys. Certificates stay: they are public, and
seeing them is what tells one cluster from another.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ktizo.domain.errors import ValidationFailed
from ktizo.talos.yamlio import dump_documents, load_values

__all__ = ["PRIVATE_KEY_MARKER", "REDACTED", "SECRET_DOCUMENT_FIELDS", "SECRET_FIELDS", "redact", "redact_patch"]

REDACTED = "***redacted***"

PRIVATE_KEY_MARKER = "PRIVATE KEY-----"

# Paths in the v1alpha1 document. "name[]" steps into every item of a list, "*" into every value of a
# mapping. Ordinary fields first, then those of deprecated sections Talos still reads.
SECRET_FIELDS: tuple[str, ...] = (
    "machine.token",
    "machine.ca.key",
    "machine.acceptedCAs[].key",
    "cluster.token",
    "cluster.secret",
    "cluster.secretboxEncryptionSecret",
    "cluster.aescbcEncryptionSecret",
    "cluster.ca.key",
    "cluster.aggregatorCA.key",
    "cluster.serviceAccount.key",
    "cluster.etcd.ca.key",
    "cluster.acceptedCAs[].key",
    "machine.network.interfaces[].wireguard.privateKey",
    "machine.network.interfaces[].vip.equinixMetal.apiToken",
    "machine.network.interfaces[].vip.hcloud.apiToken",
    "machine.network.interfaces[].vlans[].vip.equinixMetal.apiToken",
    "machine.network.interfaces[].vlans[].vip.hcloud.apiToken",
    "machine.registries.config.*.auth.password",
    "machine.registries.config.*.auth.auth",
    "machine.registries.config.*.auth.identityToken",
    "machine.registries.config.*.tls.clientIdentity.key",
    "machine.systemDiskEncryption.*.keys[].static.passphrase",
)

_VOLUME_SECRETS = ("encryption.keys[].static.passphrase",)

# Paths in the other documents, by kind.
SECRET_DOCUMENT_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "RegistryAuthConfig": ("password", "auth", "identityToken"),
        "RegistryTLSConfig": ("clientIdentity.key",),
        "WireguardConfig": ("privateKey", "peers[].presharedKey"),
        "HCloudVIPConfig": ("apiToken",),
        "SideroLinkConfig": ("uniqueToken",),
        "VolumeConfig": _VOLUME_SECRETS,
        "UserVolumeConfig": _VOLUME_SECRETS,
        "RawVolumeConfig": _VOLUME_SECRETS,
        "SwapVolumeConfig": _VOLUME_SECRETS,
    }
)

# SideroLink's join token travels in the API URL's query (…/join?jointoken=…).
_JOIN_TOKEN = re.compile(r"([?&]jointoken=)[^&#]*", re.IGNORECASE)

# Shorter strings cannot be base64 of a PEM key; skipping them keeps the scan cheap.
_MIN_ENCODED_KEY = 64


def _steps(path: str) -> list[str]:
    steps: list[str] = []
    for part in path.split("."):
        if part.endswith("[]"):
            steps.extend((part[:-2], "[]"))
        else:
            steps.append(part)
    return steps


def _has_value(value: Any) -> bool:
    # An empty key stays empty: a worker's `machine.ca.key: ""` says "no key here", which is worth seeing.
    return value is not None and value != "" and value != [] and value != {}


def _redact_at(node: Any, steps: list[str]) -> None:
    step, rest = steps[0], steps[1:]
    if step == "[]":
        # The schema calls acceptedCAs an object while Talos writes a list; a lone mapping is one item.
        items = node if isinstance(node, list) else [node]
        for item in items:
            if rest:
                _redact_at(item, rest)
        return
    if not isinstance(node, dict):
        return
    keys = list(node) if step == "*" else [step] if step in node else []
    for key in keys:
        if rest:
            _redact_at(node[key], rest)
        elif _has_value(node[key]):
            node[key] = REDACTED


def _holds_private_key(text: str) -> bool:
    if PRIVATE_KEY_MARKER in text:
        return True
    compact = "".join(text.split())
    if len(compact) < _MIN_ENCODED_KEY:
        return False
    # Talos writes keys in standard base64; URL-safe and unpadded forms are read too, to miss nothing.
    compact = compact.replace("-", "+").replace("_", "/")
    compact += "=" * (-len(compact) % 4)
    try:
        decoded = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return False
    return PRIVATE_KEY_MARKER.encode() in decoded


def _scrub(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _scrub(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_scrub(item) for item in value]
    if isinstance(value, str) and _holds_private_key(value):
        return REDACTED
    return value


def redact(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A copy of ``docs`` with secrets replaced by ``REDACTED``; the input is not changed.

    Replaced are the non-empty values at ``SECRET_FIELDS`` (v1alpha1 document) and ``SECRET_DOCUMENT_FIELDS``
    (other documents by kind), SideroLink join tokens in ``apiUrl``, and any string anywhere holding a PEM
    private key, as text or base64. ``cluster.id`` and certificates are kept.
    """
    result: list[dict[str, Any]] = []
    for doc in copy.deepcopy(docs):
        kind = doc.get("kind")
        paths = SECRET_FIELDS if kind is None else SECRET_DOCUMENT_FIELDS.get(str(kind), ())
        for path in paths:
            _redact_at(doc, _steps(path))
        api_url = doc.get("apiUrl")
        if kind == "SideroLinkConfig" and isinstance(api_url, str):
            doc["apiUrl"] = _JOIN_TOKEN.sub(lambda match: match.group(1) + REDACTED, api_url)
        result.append(_scrub(doc))
    return result


_SECRET_NAME = re.compile(r"(?i)(key|token|secret|password|passphrase|auth|credential)")


def redact_patch(text: str | None) -> str | None:
    """A patch as someone below admin may see it: the preview's redaction applied to its documents (a JSON 6902
    patch: every value at a path naming a secret, and every private key anywhere). Text that is not a readable
    patch is not shown at all: nobody can tell what it hides."""
    if not text:
        return text
    try:
        values = load_values(text)
    except ValidationFailed:
        return "# (patch not shown: it is not valid YAML)\n"
    if values and all(isinstance(v, dict) for v in values):
        redacted = redact(values)
        return text if redacted == values else dump_documents(redacted)  # nothing hidden: the text as written
    if len(values) == 1 and isinstance(values[0], list):  # JSON 6902: a list of operations
        operations = []
        for operation in copy.deepcopy(values[0]):
            secret = isinstance(operation, dict) and _SECRET_NAME.search(str(operation.get("path", "")))
            if secret and "value" in operation:
                operation["value"] = REDACTED
            operations.append(_scrub(operation))
        return text if operations == values[0] else dump_documents([operations])
    return "# (patch not shown)\n"
