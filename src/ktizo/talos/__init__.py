"""Talos machine configuration: generate, parse, validate against Talos's schema, patch, customize per device."""

from ktizo.talos.customize import Customization, Nic, customize, render
from ktizo.talos.generate import ClusterInput, generate_configs, validate_cluster_input
from ktizo.talos.patch import Patch, apply_patches, check_patch_result, load_patch
from ktizo.talos.redact import redact, redact_patch
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
