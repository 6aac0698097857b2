"""The mTLS listener's certificate in a server that runs for months: valid 30 days from the start, renewed once
half of that has gone by, and presented to new handshakes at once (a real TLS handshake before and after)."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

from cryptography import x509

from ktizo.app.server import ListenerCertificate, mtls_context
from ktizo.services.registry import Services


def presented(context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a client is shown by a server using ``context``."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def accept() -> None:
        conn, _ = server.accept()
        try:
            with context.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port)) as raw, client.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    thread.join(5)
    server.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_listener_certificate_is_renewed_and_presented_before_it_expires(
    services: Services, tmp_path: Path
) -> None:
    directory = tmp_path / "tls"
    names = ["ktizo.example.com", "127.0.0.1"]
    files = services.authority.listener_files(directory, names)
    context = mtls_context(files)
    context.verify_mode = ssl.CERT_NONE  # this test is about the server's certificate, not the client's
    renewed: list[int] = []

    def renew():  # type: ignore[no-untyped-def]
        renewed.append(1)
        return services.authority.listener_files(directory, names)

    keeper = ListenerCertificate(context, files, renew)
    first = presented(context)
    now = dt.datetime.now(dt.UTC)

    keeper.check(now + dt.timedelta(days=1))  # plenty of time left: nothing to do
    assert renewed == [] and presented(context).serial_number == first.serial_number

    keeper.check(now + dt.timedelta(days=16))  # past half of its 30 days
    assert renewed == [1]
    second = presented(context)
    assert second.serial_number != first.serial_number
    assert second.not_valid_after_utc >= first.not_valid_after_utc  # issued now: the clock here is the real one
    assert {n.value for n in second.extensions.get_extension_for_class(x509.SubjectAlternativeName).value} >= {
        "ktizo.example.com"
    }

    # A worker that does not own the files loads them again when the owner has renewed them.
    other = mtls_context(files)
    other.verify_mode = ssl.CERT_NONE
    follower = ListenerCertificate(other, keeper.files, None)
    assert presented(other).serial_number == second.serial_number
    services.authority.listener_files(directory, names)  # the owner renews
    follower.check(now + dt.timedelta(days=16))
    assert presented(other).serial_number not in (first.serial_number, second.serial_number)
