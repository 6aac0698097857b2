"""Machine configs for a cluster, as Talos's own generator (``talosctl gen config``) writes them.

The output is what ``generate.NewInput(...).Config(type)`` of Talos v1.13.9 produces for the version contract
asked for (v1.11, v1.12 or v1.13), with docs and examples off. Talos's encoding-stability fixtures for those
contracts are the reference; ``tests/talos/test_generate.py`` holds the v1.13 one as a golden test.

How the contracts differ (``pkg/machinery/config/contract.go`` at v1.13.9):

- v1.11 still writes ``machine.features.rbac/stableHostname/apidCheckExtKeyUsage``,
  ``cluster.apiServer.disablePodSecurityPolicy`` and puts the endpoint host first in
  ``cluster.apiServer.certSANs``; it has no ``install.grubUseUKICmdline`` and no ``HostnameConfig``.
- v1.11 and v1.12 write an empty ``machine.network: {}`` (a v1.13 config moved KubeSpan to its own document).
- v1.12 and later: the stable hostname is a ``HostnameConfig {auto: stable}`` document.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from ktizo.domain.errors import ValidationFailed
from ktizo.talos.secrets import CertAndKey, SecretsBundle
from ktizo.talos.versions import SUPPORTED_TALOS_VERSIONS, TalosVersion

MachineType = Literal["controlplane", "worker"]

KUBELET_IMAGE = "ghcr.io/siderolabs/kubelet"
API_SERVER_IMAGE = "registry.k8s.io/kube-apiserver"
CONTROLLER_MANAGER_IMAGE = "registry.k8s.io/kube-controller-manager"
PROXY_IMAGE = "registry.k8s.io/kube-proxy"
SCHEDULER_IMAGE = "registry.k8s.io/kube-scheduler"
KUBE_PRISM_PORT = 7445
DEFAULT_API_PORT = 6443

_K8S_VERSION = re.compile(r"v?([0-9]+\.[0-9]+\.[0-9]+)")
_DNS_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}$){_DNS_LABEL}(?:\.{_DNS_LABEL})*\.?", re.IGNORECASE)
_CERT_SAN = re.compile(rf"(?:\*\.)?{_DNS_NAME.pattern}", re.IGNORECASE)
# Talos puts the cluster name into resource names, kubeconfig contexts and discovery; a DNS label is safe.
_CLUSTER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]{0,61}[a-z0-9])?", re.IGNORECASE)
# An OCI reference: registry[:port]/path[:tag][@digest], printable and without spaces.
_IMAGE = re.compile(r"[a-z0-9][a-z0-9._/:@+-]{0,510}", re.IGNORECASE)
_DISK = re.compile(r"/[A-Za-z0-9._/:+-]{1,254}")

# Pod Security admission defaults Talos installs (pkg/machinery/config/generate/init.go).
_POD_SECURITY: dict[str, Any] = {
    "name": "PodSecurity",
    "configuration": {
        "apiVersion": "pod-security.admission.config.k8s.io/v1alpha1",
        "defaults": {
            "audit": "restricted",
            "audit-version": "latest",
            "enforce": "baseline",
            "enforce-version": "latest",
            "warn": "restricted",
            "warn-version": "latest",
        },
        "exemptions": {"namespaces": ["kube-system"], "runtimeClasses": [], "usernames": []},
        "kind": "PodSecurityConfiguration",
    },
}
# Talos's APIServerDefaultAuditPolicy.
_AUDIT_POLICY: dict[str, Any] = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "rules": [{"level": "Metadata"}],
}


@dataclass(frozen=True)
class ClusterInput:
    """What ``talosctl gen config <cluster_name> <endpoint>`` takes, plus the flags Ktizo exposes."""

    cluster_name: str
    endpoint: str  # https://host:6443
    kubernetes_version: str  # "1.28.0"; a leading "v" is accepted
    talos_version: TalosVersion  # the version contract: v1.11, v1.12 or v1.13
    install_disk: str | None = None
    install_image: str | None = None
    pod_subnets: tuple[str, ...] = ("10.244.0.0/16",)
    service_subnets: tuple[str, ...] = ("10.96.0.0/12",)
    dns_domain: str = "cluster.local"
    cert_sans: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Checked:
    """A validated, normalised ``ClusterInput``."""

    cluster_name: str
    endpoint: str
    endpoint_host: str
    kubernetes_version: str
    contract: TalosVersion
    install_disk: str | None
    install_image: str | None
    pod_subnets: list[str]
    service_subnets: list[str]
    dns_domain: str
    cert_sans: list[str]


# --- input checks ----------------------------------------------------------------------------------------


def _check_endpoint(endpoint: str) -> tuple[str, str]:
    field = "endpoint"
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise ValidationFailed("is required, e.g. https://cluster.example:6443", field)
    text = endpoint.strip()
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise ValidationFailed("must not contain spaces or control characters", field)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValidationFailed(f"is not a valid URL: {exc}", field) from None
    if parts.scheme.lower() != "https":
        raise ValidationFailed("must be an https:// URL (the Kubernetes API is served over TLS)", field)
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("must not contain user information", field)
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValidationFailed("must be just https://host:port, without a path, query or fragment", field)
    host = parts.hostname or ""
    if not host:
        raise ValidationFailed("has no host", field)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
        if not _DNS_NAME.fullmatch(host):
            raise ValidationFailed(f"host {host!r} is neither an IP address nor a DNS name", field) from None
    if port == 0:
        raise ValidationFailed("port must be between 1 and 65535", field)
    shown = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    # talosctl accepts an endpoint without a port and means the Kubernetes API port.
    return f"https://{shown}:{port or DEFAULT_API_PORT}", host


def _check_subnets(name: str, values: Sequence[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    # A bare string is a Sequence[str] too; "10.0.0.0/8" must not become ten one-character ranges.
    if isinstance(values, str) or not values:
        raise ValidationFailed("needs at least one CIDR", name)
    nets: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    for value in values:
        if not isinstance(value, str):
            raise ValidationFailed(f"{value!r} is not a CIDR string", name)
        try:
            net = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as exc:
            raise ValidationFailed(f"{value!r} is not a network CIDR: {exc}", name) from None
        if "/" not in value:
            raise ValidationFailed(f"{value!r} needs a prefix length, e.g. 10.244.0.0/16", name)
        if any(other.version == net.version for other in nets):
            # Kubernetes dual-stack takes at most one range per address family.
            raise ValidationFailed(f"has more than one IPv{net.version} range", name)
        nets.append(net)
    return nets


def _check_input(inp: ClusterInput) -> _Checked:
    contract = inp.talos_version
    if not isinstance(contract, tuple) or TalosVersion(*contract) not in SUPPORTED_TALOS_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_TALOS_VERSIONS)
        raise ValidationFailed(f"{contract} is not a supported version contract ({supported})", "talos_version")
    contract = TalosVersion(*contract)

    name = inp.cluster_name
    if not isinstance(name, str) or not _CLUSTER_NAME.fullmatch(name):
        raise ValidationFailed(
            "must be 1-63 letters, digits, '-' or '.', starting and ending with a letter or digit",
            "cluster_name",
        )

    endpoint, host = _check_endpoint(inp.endpoint)

    match = _K8S_VERSION.fullmatch(inp.kubernetes_version.strip()) if isinstance(inp.kubernetes_version, str) else None
    if match is None:
        raise ValidationFailed("must be a Kubernetes release such as 1.28.0", "kubernetes_version")

    pods = _check_subnets("pod_subnets", inp.pod_subnets)
    services = _check_subnets("service_subnets", inp.service_subnets)
    for pod in pods:
        for svc in services:
            if pod.version == svc.version and pod.overlaps(svc):
                raise ValidationFailed(f"{svc} overlaps the pod subnet {pod}", "service_subnets")

    if not isinstance(inp.dns_domain, str) or not _DNS_NAME.fullmatch(inp.dns_domain):
        raise ValidationFailed("must be a DNS domain such as cluster.local", "dns_domain")

    given: Sequence[str] = inp.cert_sans
    sans: list[str] = []
    for san in (given,) if isinstance(given, str) else given:
        if not isinstance(san, str):
            raise ValidationFailed(f"{san!r} is not a string", "cert_sans")
        try:
            ipaddress.ip_address(san)
        except ValueError:
            if not _CERT_SAN.fullmatch(san):
                raise ValidationFailed(f"{san!r} is neither an IP address nor a DNS name", "cert_sans") from None
        if san not in sans:
            sans.append(san)

    disk = inp.install_disk
    if disk is not None and not (isinstance(disk, str) and _DISK.fullmatch(disk)):
        raise ValidationFailed("must be a device path such as /dev/sda", "install_disk")
    image = inp.install_image
    if image is not None and not (isinstance(image, str) and _IMAGE.fullmatch(image)):
        raise ValidationFailed(
            "must be an image reference such as ghcr.io/siderolabs/installer:v1.13.0", "install_image"
        )

    return _Checked(
        cluster_name=name,
        endpoint=endpoint,
        endpoint_host=host,
        kubernetes_version=match.group(1),
        contract=contract,
        install_disk=disk or None,
        install_image=image or None,
        pod_subnets=[str(net) for net in pods],
        service_subnets=[str(net) for net in services],
        dns_domain=inp.dns_domain,
        cert_sans=sans,
    )


# --- documents -------------------------------------------------------------------------------------------


def _b64(pem: bytes) -> str:
    return base64.b64encode(pem).decode("ascii")


def _ca(pair: CertAndKey, *, with_key: bool) -> dict[str, str]:
    # Workers get the CA certificate only; Talos still writes the empty key field.
    return {"crt": _b64(pair.crt), "key": _b64(pair.key) if with_key else ""}


def _machine(c: _Checked, bundle: SecretsBundle, controlplane: bool) -> dict[str, Any]:
    install: dict[str, Any] = {}
    if c.install_disk:
        install["disk"] = c.install_disk
    if c.install_image:
        install["image"] = c.install_image
    install["wipe"] = False
    if c.contract >= (1, 12):
        install["grubUseUKICmdline"] = True

    features: dict[str, Any] = {}
    if c.contract < (1, 12):
        features.update(rbac=True, stableHostname=True, apidCheckExtKeyUsage=True)
    features.update(
        diskQuotaSupport=True,
        kubePrism={"enabled": True, "port": KUBE_PRISM_PORT},
        hostDNS={"enabled": True, "forwardKubeDNSToHost": True},
    )

    machine: dict[str, Any] = {
        "type": "controlplane" if controlplane else "worker",
        "token": bundle.trustd_token,
        "ca": _ca(bundle.os, with_key=controlplane),
        "certSANs": list(c.cert_sans),
        "kubelet": {
            "image": f"{KUBELET_IMAGE}:v{c.kubernetes_version}",
            "defaultRuntimeSeccompProfileEnabled": True,
            "disableManifestsDirectory": True,
        },
    }
    if c.contract < (1, 13):
        # Older Talos reads KubeSpan from machine.network and always wrote the (empty) section.
        machine["network"] = {}
    machine["install"] = install
    machine["features"] = features
    if controlplane:
        machine["nodeLabels"] = {"node.kubernetes.io/exclude-from-external-load-balancers": ""}
    return machine


def _discovery() -> dict[str, Any]:
    return {"enabled": True, "registries": {"kubernetes": {"disabled": True}, "service": {}}}


def _cluster(c: _Checked, bundle: SecretsBundle, controlplane: bool) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "id": bundle.cluster_id,
        "secret": bundle.cluster_secret,
        "controlPlane": {"endpoint": c.endpoint},
        "clusterName": c.cluster_name,
        "network": {
            "dnsDomain": c.dns_domain,
            "podSubnets": list(c.pod_subnets),
            "serviceSubnets": list(c.service_subnets),
        },
        "token": bundle.bootstrap_token,
    }
    if not controlplane:
        cluster["ca"] = _ca(bundle.k8s, with_key=False)
        cluster["discovery"] = _discovery()
        return cluster

    # A bundle from Talos <= 1.2 has only the AES-CBC key; etcd data written with it must stay readable.
    if bundle.secretbox_encryption_secret:
        cluster["secretboxEncryptionSecret"] = bundle.secretbox_encryption_secret
    if bundle.aescbc_encryption_secret:
        cluster["aescbcEncryptionSecret"] = bundle.aescbc_encryption_secret
    cluster["ca"] = _ca(bundle.k8s, with_key=True)
    cluster["aggregatorCA"] = _ca(bundle.k8s_aggregator, with_key=True)
    cluster["serviceAccount"] = {"key": _b64(bundle.k8s_service_account_key)}

    api_server: dict[str, Any] = {"image": f"{API_SERVER_IMAGE}:v{c.kubernetes_version}"}
    sans = list(c.cert_sans)
    if c.contract < (1, 12) and c.endpoint_host not in sans:
        sans.insert(0, c.endpoint_host)
    if sans:
        api_server["certSANs"] = sans
    if c.contract < (1, 12):
        api_server["disablePodSecurityPolicy"] = True
    api_server["admissionControl"] = [_copy(_POD_SECURITY)]
    api_server["auditPolicy"] = _copy(_AUDIT_POLICY)
    cluster["apiServer"] = api_server

    cluster["controllerManager"] = {"image": f"{CONTROLLER_MANAGER_IMAGE}:v{c.kubernetes_version}"}
    cluster["proxy"] = {"image": f"{PROXY_IMAGE}:v{c.kubernetes_version}"}
    cluster["scheduler"] = {"image": f"{SCHEDULER_IMAGE}:v{c.kubernetes_version}"}
    cluster["discovery"] = _discovery()
    cluster["etcd"] = {"ca": _ca(bundle.etcd, with_key=True)}
    return cluster


def _copy(value: Any) -> Any:
    # Callers may patch the documents; module-level templates must not be shared into them.
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _documents(c: _Checked, bundle: SecretsBundle, machine_type: MachineType) -> list[dict[str, Any]]:
    controlplane = machine_type == "controlplane"
    config: dict[str, Any] = {
        "version": "v1alpha1",
        "debug": False,
        # Deprecated and ignored since Talos 1.x, but Talos's generator still writes it.
        "persist": True,
        "machine": _machine(c, bundle, controlplane),
        "cluster": _cluster(c, bundle, controlplane),
    }
    docs = [config]
    if c.contract >= (1, 12):
        docs.append({"apiVersion": "v1alpha1", "kind": "HostnameConfig", "auto": "stable"})
    return docs


def generate_config(inp: ClusterInput, bundle: SecretsBundle, machine_type: MachineType) -> list[dict[str, Any]]:
    """The config documents for one machine type; raises ``ValidationFailed`` naming the bad input field."""
    if machine_type not in ("controlplane", "worker"):
        raise ValidationFailed("must be controlplane or worker", "machine_type")
    return _documents(_check_input(inp), bundle, machine_type)


def generate_configs(inp: ClusterInput, bundle: SecretsBundle) -> dict[str, list[dict[str, Any]]]:
    """``{"controlplane": docs, "worker": docs}`` as ``talosctl gen config`` writes them for ``inp``.

    Raises ``ValidationFailed`` with ``field`` set to the offending ``ClusterInput`` attribute.
    """
    checked = _check_input(inp)
    return {
        "controlplane": _documents(checked, bundle, "controlplane"),
        "worker": _documents(checked, bundle, "worker"),
    }


def validate_cluster_input(inp: ClusterInput) -> ClusterInput:
    """Check every field the way ``generate_configs`` will, and return the input normalised
    (endpoint with its port, Kubernetes version without a leading v, duplicate SANs dropped)."""
    c = _check_input(inp)
    return ClusterInput(
        cluster_name=c.cluster_name,
        endpoint=c.endpoint,
        kubernetes_version=c.kubernetes_version,
        talos_version=c.contract,
        install_disk=c.install_disk,
        install_image=c.install_image,
        pod_subnets=tuple(c.pod_subnets),
        service_subnets=tuple(c.service_subnets),
        dns_domain=c.dns_domain,
        cert_sans=tuple(c.cert_sans),
    )
