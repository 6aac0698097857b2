"""The agent door behind a TLS-terminating proxy: the ``Client-Cert`` header a trusted proxy sends, in RFC 9440's form
(``:base64 DER:``, HAProxy) or as the URL-encoded PEM nginx's ``$ssl_client_escaped_cert`` yields; anything else is
a 403 that says which forms count, and from anyone but a trusted proxy the header counts for nothing."""

from __future__ import annotations

import base64
import urllib.parse
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from fastapi.testclient import TestClient

from ktizo.services.context import Actor
from tests.agents.support import body, key

CHECKIN = "/api/v1/agent/checkin"


def approved_agent_pem(client: TestClient, services: Any) -> str:
    """Enroll through the door, approve, and pick up the certificate (PEM)."""
    payload = body(private_key=key())
    r = client.post("/api/v1/enroll", json=payload)
    assert r.status_code == 202, r.text
    services.agents.approve(Actor.cli(), payload["machine_id"])
    r = client.get(f"/api/v1/enroll/status/{r.json()['polling_token']}")
    assert r.status_code == 200, r.text
    return str(r.json()["server_crt"])


def rfc9440(pem: str) -> str:
    der = x509.load_pem_x509_certificate(pem.encode()).public_bytes(serialization.Encoding.DER)
    return ":" + base64.b64encode(der).decode() + ":"


def escaped(pem: str) -> str:
    """What nginx's $ssl_client_escaped_cert is: the PEM with everything but letters, digits and -._~ %-encoded."""
    return urllib.parse.quote(pem, safe="-._~")


@pytest.fixture
def proxied(make_client: Any) -> tuple[TestClient, str]:
    client, services = make_client(trusted_proxies=["10.0.0.0/24"])
    return client, approved_agent_pem(client, services)


@pytest.mark.parametrize("form", [rfc9440, escaped], ids=["rfc9440", "nginx-escaped-pem"])
def test_both_forms_from_a_trusted_proxy_check_the_agent_in(proxied: tuple[TestClient, str], form: Any) -> None:
    client, pem = proxied
    header = form(pem)
    assert "\n" not in header  # a header value: one line
    r = client.post(CHECKIN, json={"facts": {"cpu": {"logical_cpus": 2}}}, headers={"Client-Cert": header})
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "approved"


def test_the_escaped_pem_counts_for_nothing_from_an_untrusted_peer(proxied: tuple[TestClient, str]) -> None:
    client, pem = proxied
    untrusted = TestClient(client.app, client=("192.0.2.7", 5000))
    r = untrusted.post(CHECKIN, json={"facts": {}}, headers={"Client-Cert": escaped(pem)})
    assert r.status_code == 403
    assert "client certificate" in r.json()["detail"]


def test_garbage_is_a_403_naming_the_forms(proxied: tuple[TestClient, str]) -> None:
    client, pem = proxied
    refused = {
        "hello": "RFC 9440 byte sequence (:base64 DER:) or a URL-encoded PEM certificate",
        "MIIBszCCAVmgAwIBAgIU": "RFC 9440 byte sequence",  # base64 without the colons
        ":not base64!:": "not base64",
        escaped(pem).replace("MII", "M%21I", 1): "not base64",
        escaped(pem + pem): "one URL-encoded PEM certificate",  # a chain
        escaped(pem).split("-----END")[0]: "one URL-encoded PEM certificate",  # cut short
        escaped(pem.replace("CERTIFICATE", "PRIVATE KEY")): "one URL-encoded PEM certificate",
        ":" + base64.b64encode(b"not a certificate").decode() + ":": "could not be read",
    }
    for value, detail in refused.items():
        r = client.post(CHECKIN, json={"facts": {}}, headers={"Client-Cert": value})
        assert r.status_code == 403, (value, r.text)
        assert detail in r.json()["detail"], (value, r.json())


def test_a_certificate_not_from_the_agent_ca_is_refused_in_either_form(
    proxied: tuple[TestClient, str], tmp_path: Any
) -> None:
    from tests.agents.test_mtls import foreign_client

    client, _pem = proxied
    cert, _key = foreign_client(tmp_path)
    for form in (rfc9440, escaped):
        r = client.post(CHECKIN, json={"facts": {}}, headers={"Client-Cert": form(cert.read_text())})
        assert r.status_code == 403
        assert "not from Ktizo's agent CA" in r.json()["detail"]
