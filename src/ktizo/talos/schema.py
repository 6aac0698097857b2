"""Validation of Talos config documents against Talos's own JSON schema, and rules the schema cannot state.

The packaged schema (Talos v1.13.9, unchanged) omits deprecated fields that Talos still accepts, so it is
loaded with an in-memory *overlay* that adds them back. Each document is validated against the one
definition its ``kind`` selects: the schema's top-level ``oneOf`` would only say "matches none of 44".
"""

from __future__ import annotations

import copy
import difflib
import functools
import json
import re
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # jsonschema loads with the first validation, not with everything that imports Ktizo's talos
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import ValidationError

from ktizo.domain.errors import ValidationFailed

CONFIG_DEF = "v1alpha1.Config"
CONFIG_LABEL = "v1alpha1"

_MAX_MESSAGE = 300

_BOOL: dict[str, Any] = {"type": "boolean"}
_INT: dict[str, Any] = {"type": "integer"}
_STR: dict[str, Any] = {"type": "string"}
_STR_LIST: dict[str, Any] = {"type": "array", "items": _STR}
_STR_MAP: dict[str, Any] = {"type": "object", "patternProperties": {".*": _STR}}
_OBJECT: dict[str, Any] = {"type": "object"}
_OBJECT_LIST: dict[str, Any] = {"type": "array", "items": _OBJECT}


def _strict(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/$defs/{name}"}


# The legacy machine.network (deprecated in Talos 1.12, the only way to configure networking in 1.11),
# written from the Go types in pkg/machinery/config/types/v1alpha1/v1alpha1_types.go. Strict where Ktizo
# writes (interfaces, selectors, routes) so typos there are caught; loose objects where it never does.
_LEGACY_DEFS: dict[str, dict[str, Any]] = {
    "ktizo.legacy.NetworkConfig": _strict(
        {
            "hostname": _STR,
            "interfaces": {"type": "array", "items": _ref("ktizo.legacy.Device")},
            "nameservers": _STR_LIST,
            "searchDomains": _STR_LIST,
            "extraHostEntries": {
                "type": "array",
                "items": _strict({"ip": _STR, "aliases": _STR_LIST}),
            },
            "kubespan": _OBJECT,
            "disableSearchDomain": _BOOL,
        }
    ),
    "ktizo.legacy.Device": _strict(
        {
            "interface": _STR,
            "deviceSelector": _ref("ktizo.legacy.DeviceSelector"),
            "addresses": _STR_LIST,
            "cidr": _STR,
            "routes": {"type": "array", "items": _ref("ktizo.legacy.Route")},
            "bond": _OBJECT,
            "bridge": _OBJECT,
            "bridgePort": _OBJECT,
            "vlans": _OBJECT_LIST,
            "mtu": _INT,
            "dhcp": _BOOL,
            "ignore": _BOOL,
            "dummy": _BOOL,
            "dhcpOptions": _OBJECT,
            "wireguard": _OBJECT,
            "vip": _OBJECT,
        }
    ),
    "ktizo.legacy.DeviceSelector": _strict(
        {
            "busPath": _STR,
            "hardwareAddr": _STR,
            "permanentAddr": _STR,
            "pciID": _STR,
            "driver": _STR,
            "physical": _BOOL,
        }
    ),
    "ktizo.legacy.Route": _strict({"network": _STR, "gateway": _STR, "source": _STR, "metric": _INT, "mtu": _INT}),
}

# Deprecated (docgen:nodoc) fields Talos v1.13 still decodes, by the $defs entry that lacks them.
_DEPRECATED_FIELDS: dict[str, dict[str, Any]] = {
    "v1alpha1.Config": {"persist": _BOOL, "version": {"enum": ["v1alpha1"]}, "debug": _BOOL},
    "v1alpha1.MachineConfig": {
        "network": _ref("ktizo.legacy.NetworkConfig"),
        "env": _STR_MAP,
        "time": _OBJECT,
        "registries": _OBJECT,
        "disks": _OBJECT_LIST,
        "systemDiskEncryption": _OBJECT,
    },
    "v1alpha1.FeaturesConfig": {"rbac": _BOOL, "stableHostname": _BOOL, "apidCheckExtKeyUsage": _BOOL},
    "v1alpha1.InstallConfig": {
        "extraKernelArgs": _STR_LIST,
        "extensions": {"type": "array", "items": _strict({"image": _STR})},
        "bootloader": _BOOL,
    },
    "v1alpha1.ClusterConfig": {"allowSchedulingOnMasters": _BOOL},
    "v1alpha1.EtcdConfig": {"subnet": _STR},
    "v1alpha1.APIServerConfig": {"disablePodSecurityPolicy": _BOOL},
}


def _load_packaged_schema() -> dict[str, Any]:
    text = (resources.files("ktizo.talos") / "data" / "config.schema.json").read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _apply_overlay(schema: dict[str, Any]) -> dict[str, Any]:
    overlay = copy.deepcopy(schema)
    defs: dict[str, Any] = overlay["$defs"]
    for name, definition in _LEGACY_DEFS.items():
        defs[name] = copy.deepcopy(definition)
    for name, fields in _DEPRECATED_FIELDS.items():
        properties = defs[name].setdefault("properties", {})
        for field, field_schema in fields.items():
            # setdefault: should a later schema define the field itself, its definition wins.
            properties.setdefault(field, copy.deepcopy(field_schema))
    return overlay


@functools.cache
def overlay_schema() -> dict[str, Any]:
    """The packaged Talos schema with the deprecated-but-accepted fields added (built once)."""
    return _apply_overlay(_load_packaged_schema())


@functools.cache
def _kind_map() -> dict[str, str]:
    kinds: dict[str, str] = {}
    for name, definition in overlay_schema()["$defs"].items():
        kind = definition.get("properties", {}).get("kind", {})
        for value in kind.get("enum", ()):
            kinds[value] = name
    return kinds


def known_kinds() -> frozenset[str]:
    """Document kinds the packaged schema defines (the v1alpha1 document has none)."""
    return frozenset(_kind_map())


@functools.cache
def _validator(def_name: str) -> Draft202012Validator:
    from jsonschema import Draft202012Validator

    schema = overlay_schema()
    root = {
        "$schema": schema["$schema"],
        "$id": schema["$id"],
        "$defs": schema["$defs"],
        "$ref": f"#/$defs/{def_name}",
    }
    return Draft202012Validator(root)


def document_key(doc: dict[str, Any]) -> tuple[str, str, str]:
    """Talos's identity of a document: (apiVersion, kind, name); the v1alpha1 document is all "v1alpha1"."""

    def text(key: str, default: str) -> str:
        value = doc.get(key)
        return default if value is None else str(value)

    return text("apiVersion", CONFIG_LABEL), text("kind", CONFIG_LABEL), text("name", "")


def _describe(key: tuple[str, str, str]) -> str:
    _api, kind, name = key
    if kind == CONFIG_LABEL:
        return "the v1alpha1 machine config (the document without kind)"
    return f"{kind} {name!r}" if name else kind


def check_unique(docs: Sequence[dict[str, Any]]) -> None:
    """Refuse two documents with the same (apiVersion, kind, name): Talos's loader rejects such configs."""
    seen: dict[tuple[str, str, str], int] = {}
    for number, doc in enumerate(docs, start=1):
        key = document_key(doc)
        if key in seen:
            raise ValidationFailed(
                f"documents {seen[key]} and {number} are both {_describe(key)}; Talos refuses duplicate documents",
                "kind",
            )
        seen[key] = number


def _config_documents(docs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc.get("kind") is None]


def machine_type(docs: Sequence[dict[str, Any]]) -> str | None:
    """``machine.type`` of the v1alpha1 document ("controlplane", "worker"), or None when absent."""
    for doc in _config_documents(docs):
        machine = doc.get("machine")
        if isinstance(machine, dict):
            value = machine.get("type")
            if isinstance(value, str):
                return value
    return None


def _format_path(parts: Iterable[Any]) -> str:
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _shorten(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


def _explain(error: ValidationError) -> tuple[str, str]:
    """Turn a jsonschema error into (dotted path, message a person can act on)."""
    path = list(error.absolute_path)
    instance = error.instance
    schema = error.schema if isinstance(error.schema, dict) else {}
    if error.validator == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        patterns = list(schema.get("patternProperties", {}))
        extras = [
            key for key in instance if key not in allowed and not any(re.search(pattern, key) for pattern in patterns)
        ]
        if extras:
            # Point at the unknown field itself: "machine.instal", not its parent "machine".
            key = extras[0]
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            others = f"; also unknown: {', '.join(map(repr, extras[1:]))}" if len(extras) > 1 else ""
            return _format_path([*path, key]), f"unknown field {key!r}{hint}{others}"
    if error.validator == "required" and isinstance(instance, dict):
        required = error.validator_value if isinstance(error.validator_value, list) else []
        missing = [key for key in required if key not in instance]
        if missing:
            return _format_path([*path, missing[0]]), f"required field {missing[0]!r} is missing"
    message = _shorten(error.message)
    if isinstance(instance, bool) and error.validator in ("type", "enum", "pattern"):
        # YAML 1.1 reads unquoted yes/no/on/off as booleans, Go YAML reads them as strings.
        message += " (unquoted yes/no/on/off/true/false is a boolean in YAML; quote it to mean a string)"
    return _format_path(path), message


def _kind_label(doc: dict[str, Any]) -> str:
    kind = doc.get("kind")
    return CONFIG_LABEL if kind is None else str(kind)


def _validate_one(number: int, doc: dict[str, Any]) -> None:
    if not isinstance(doc, dict):
        raise ValidationFailed(f"document {number} is a {type(doc).__name__}, not a mapping")
    kind = doc.get("kind")
    if kind is None:
        def_name = CONFIG_DEF
    else:
        found = _kind_map().get(kind) if isinstance(kind, str) else None
        if found is None:
            close = difflib.get_close_matches(str(kind), sorted(_kind_map()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValidationFailed(
                f"document {number}: unknown kind {kind!r}{hint}; Talos rejects documents of unknown kinds",
                "kind",
            )
        def_name = found
    from jsonschema.exceptions import best_match

    error = best_match(_validator(def_name).iter_errors(doc))
    if error is not None:
        path, message = _explain(error)
        shown = path or "(document)"
        raise ValidationFailed(f"document {number} ({_kind_label(doc)}): {shown}: {message}", path or None)


def _child(parent: dict[str, Any], key: str) -> dict[str, Any]:
    value = parent.get(key)
    return value if isinstance(value, dict) else {}


def _check_hostname_documents(docs: Sequence[dict[str, Any]]) -> None:
    # Rules of HostnameConfig.Validate and V1Alpha1ConflictValidate (types/network/hostname.go), which the
    # schema cannot express; a config breaking them is refused by Talos at boot, over and over.
    machine = _child(next(iter(_config_documents(docs)), {}), "machine")
    network, features = _child(machine, "network"), _child(machine, "features")
    for number, doc in enumerate(docs, start=1):
        if doc.get("kind") != "HostnameConfig":
            continue
        where = f"document {number} (HostnameConfig)"
        hostname, auto = doc.get("hostname"), doc.get("auto")
        if not hostname and auto is None:
            raise ValidationFailed(f"{where}: either 'auto' or 'hostname' must be set", "hostname")
        if hostname and auto not in (None, "off"):
            raise ValidationFailed(
                f"{where}: 'hostname' and 'auto: {auto}' cannot be set together; use auto: \"off\"", "auto"
            )
        if isinstance(hostname, str) and hostname:
            first_label = hostname.split(".", 1)[0]
            if len(hostname) > 253 or not 1 <= len(first_label) <= 63:
                raise ValidationFailed(f"{where}: hostname {hostname[:80]!r} is too long", "hostname")
        if network.get("hostname"):
            raise ValidationFailed(
                f"{where}: machine.network.hostname is also set in the v1alpha1 document; keep one",
                "machine.network.hostname",
            )
        if features.get("stableHostname"):
            raise ValidationFailed(
                f"{where}: machine.features.stableHostname is also set in the v1alpha1 document; keep one",
                "machine.features.stableHostname",
            )


def _check_resolver_documents(docs: Sequence[dict[str, Any]]) -> None:
    # ResolverConfig.V1Alpha1ConflictValidate (types/network/resolver.go): legacy resolver fields and the
    # ResolverConfig document exclude each other.
    if not any(doc.get("kind") == "ResolverConfig" for doc in docs):
        return
    network = _child(_child(next(iter(_config_documents(docs)), {}), "machine"), "network")
    for field in ("nameservers", "searchDomains", "disableSearchDomain"):
        if network.get(field) is not None and network.get(field) is not False:
            raise ValidationFailed(
                f"machine.network.{field} is set in the v1alpha1 document and a ResolverConfig document "
                "exists; Talos refuses both together",
                f"machine.network.{field}",
            )


def validate_documents(docs: list[dict[str, Any]]) -> None:
    """Validate a whole config: each document against its schema definition, then across documents.

    Raises ``ValidationFailed`` naming the document (1-based), its kind and the dotted path of the first
    problem; also for duplicate documents, and unless there is exactly one v1alpha1 document.
    """
    if not docs:
        raise ValidationFailed("config holds no document")
    for number, doc in enumerate(docs, start=1):
        _validate_one(number, doc)
    check_unique(docs)
    configs = len(_config_documents(docs))
    if configs != 1:
        raise ValidationFailed(
            f"config needs exactly one v1alpha1 machine config document (the one without kind); found {configs}",
            "kind",
        )
    _check_hostname_documents(docs)
    _check_resolver_documents(docs)
