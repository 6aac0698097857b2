"""Talos machine configuration: generate, parse, validate against Talos's schema, patch, customize per device.

The names below load their module on first use (PEP 562): config generation needs cryptography and validation
jsonschema, and a CLI command that uses neither should not wait for them."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Two names are also the names of their modules: importing the module (anyone may) would rebind the package's
# attribute to the module. Bound here, after their modules, they stay the functions. Both modules are light.
from ktizo.talos.customize import customize
from ktizo.talos.redact import redact

if TYPE_CHECKING:
    from ktizo.talos.customize import Customization, Nic, render
    from ktizo.talos.generate import ClusterInput, generate_configs, validate_cluster_input
    from ktizo.talos.patch import Patch, apply_patches, check_patch_result, load_patch
    from ktizo.talos.redact import redact_patch
    from ktizo.talos.schema import check_unique, document_key, machine_type, validate_documents
    from ktizo.talos.secrets import SecretsBundle, dump_secrets, generate_secrets, load_secrets
    from ktizo.talos.talosconfig import make_talosconfig
    from ktizo.talos.versions import (
        DEFAULT_TALOS_VERSION,
        SUPPORTED_TALOS_VERSIONS,
        TalosVersion,
        parse_talos_version,
    )
    from ktizo.talos.yamlio import dump_documents, load_documents

_WHERE = {
    "Customization": "customize",
    "Nic": "customize",
    "customize": "customize",
    "render": "customize",
    "ClusterInput": "generate",
    "generate_configs": "generate",
    "validate_cluster_input": "generate",
    "Patch": "patch",
    "apply_patches": "patch",
    "check_patch_result": "patch",
    "load_patch": "patch",
    "redact": "redact",
    "redact_patch": "redact",
    "check_unique": "schema",
    "document_key": "schema",
    "machine_type": "schema",
    "validate_documents": "schema",
    "SecretsBundle": "secrets",
    "dump_secrets": "secrets",
    "generate_secrets": "secrets",
    "load_secrets": "secrets",
    "make_talosconfig": "talosconfig",
    "DEFAULT_TALOS_VERSION": "versions",
    "SUPPORTED_TALOS_VERSIONS": "versions",
    "TalosVersion": "versions",
    "parse_talos_version": "versions",
    "dump_documents": "yamlio",
    "load_documents": "yamlio",
}

__all__ = [
    "DEFAULT_TALOS_VERSION",
    "SUPPORTED_TALOS_VERSIONS",
    "ClusterInput",
    "Customization",
    "Nic",
    "Patch",
    "SecretsBundle",
    "TalosVersion",
    "apply_patches",
    "check_patch_result",
    "check_unique",
    "customize",
    "document_key",
    "dump_documents",
    "dump_secrets",
    "generate_configs",
    "generate_secrets",
    "load_documents",
    "load_patch",
    "load_secrets",
    "machine_type",
    "make_talosconfig",
    "parse_talos_version",
    "redact",
    "redact_patch",
    "render",
    "validate_cluster_input",
    "validate_documents",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ktizo.talos' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"ktizo.talos.{module}"), name)
    globals()[name] = value
    return value
