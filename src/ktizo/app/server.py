"""Running the server: uvicorn with the limits a server on an open provisioning network needs.

Anyone there can open connections and hold them. So: the process may use every file descriptor it is allowed
(the soft limit is raised to the hard one), serves at most ``max_connections`` at once (more get 503 at once),
holds at most half of those as long polls (services.download), closes a kept-alive connection idle for
``keep_alive_seconds`` and one whose request headers have not all arrived after ``header_timeout_seconds``."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import logging
import resource
import socket
import ssl
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import uvicorn
from cryptography import x509
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ktizo.app.asgi import create_app
from ktizo.app.workers import LISTEN_BACKLOG
from ktizo.services.authority import LISTENER_DAYS, TlsFiles, listener_names
from ktizo.services.registry import Services
from ktizo.settings import Settings

log = logging.getLogger("ktizo")

# File descriptors kept for everything but client connections: the database, log files, dnsmasq's pipes.
RESERVED_FDS = 128
DEFAULT_MAX_CONNECTIONS = 10_000


def raise_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # a container may forbid it: live with the soft limit
            log.warning("could not raise the open-file limit from %d to %d", soft, hard)
    return soft


def connection_limit(settings: Settings, file_limit: int) -> int:
    """Connections served at once: the setting, or what the file limit leaves room for (at most 10,000)."""
    room = max(64, file_limit - RESERVED_FDS)
    return min(settings.max_connections, room) if settings.max_connections else min(DEFAULT_MAX_CONNECTIONS, room)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus a deadline for the request headers: a client that connects and sends
    nothing, or sends its headers a byte at a time, is disconnected instead of holding a connection forever."""

    header_timeout = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._disarm()  # from here the keep-alive timeout watches the connection

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


def server_config(settings: Settings, services: Services, max_connections: int) -> uvicorn.Config:
    protocol = type("KtizoHttpProtocol", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout_seconds})
    return uvicorn.Config(
        create_app(settings, services),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log,
        proxy_headers=False,  # KTIZO_TRUSTED_PROXIES decides whose forwarding headers count
        http=protocol,
        limit_concurrency=max_connections,
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=int(max(1, settings.keep_alive_seconds)),
        # Long-polled config requests would otherwise hold a shutdown for up to KTIZO_LONG_POLL_SECONDS.
        timeout_graceful_shutdown=5,
    )


class MtlsProtocol(HeaderTimeoutProtocol):
    """The protocol of Ktizo's mTLS listener: the client certificate the handshake verified goes into every
    request's scope (``extensions.tls.client_cert_der``), where the agent door reads it."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ssl_object = transport.get_extra_info("ssl_object")
        self._client_cert: bytes | None = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        super().connection_made(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": {"client_cert_der": self._client_cert}}


class ListenerError(Exception):
    """The mTLS listener cannot start (its port is taken, say): the message says what to do."""


def bind_mtls(settings: Settings) -> socket.socket | None:
    """The mTLS listener's socket, bound before anything starts so that a port in use is a clear error."""
    if not settings.mtls_port:
        return None
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.mtls_port))
    except OSError as exc:
        sock.close()
        raise ListenerError(
            f"cannot open the mTLS listener on {settings.host}:{settings.mtls_port}: {exc.strerror or exc}. "
            "Pick another port with --mtls-port (or KTIZO_MTLS_PORT), or turn it off with --mtls-port 0."
        ) from None
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


def mtls_context(files: TlsFiles) -> ssl.SSLContext:
    """TLS 1.2 or newer, a client certificate from the agent CA required in the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(files.cert), str(files.key))
    context.load_verify_locations(cafile=str(files.ca))
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def mtls_config(
    settings: Settings, app: Any, files: TlsFiles, max_connections: int, context: ssl.SSLContext | None = None
) -> uvicorn.Config:
    protocol = type("KtizoMtlsProtocol", (MtlsProtocol,), {"header_timeout": settings.header_timeout_seconds})
    context = context or mtls_context(files)
    return uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=settings.access_log,
        proxy_headers=False,
        http=protocol,
        lifespan="off",  # the main listener runs the jobs
        limit_concurrency=max_connections,
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=int(max(1, settings.keep_alive_seconds)),
        timeout_graceful_shutdown=5,
        ssl_certfile=str(files.cert),  # uvicorn wants one to call the factory; the factory builds the context
        ssl_context_factory=lambda _config, _default: context,
    )


def mtls_listener_files(settings: Settings, services: Services) -> TlsFiles:
    """The mTLS listener's certificate, made afresh (workers share the one their supervisor made)."""
    names = listener_names(settings.host, settings.public_url, settings.mtls_names)
    log.info("mTLS listener on %s:%d for %s", settings.host, settings.mtls_port, ", ".join(names[:6]))
    return services.authority.listener_files(settings.data_dir / "tls", names)


class ListenerCertificate:
    """Keeps the mTLS listener's certificate fresh in a server that runs for months: it is valid LISTENER_DAYS
    (30) from its start, so once half of that has gone by a new one is issued (by ``renew``: the process that owns
    the files, the only one with ``--workers``) and every process loads the files again when they change. New
    handshakes get the new certificate; connections already open keep theirs."""

    CHECK_SECONDS = 3600.0

    def __init__(self, context: ssl.SSLContext, files: TlsFiles, renew: Callable[[], TlsFiles] | None) -> None:
        self.context, self.files, self.renew = context, files, renew
        self._loaded = self._stamp()

    def _stamp(self) -> int:
        try:
            return self.files.cert.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def check(self, now: dt.datetime | None = None) -> None:
        now = now or dt.datetime.now(dt.UTC)
        try:
            cert = x509.load_pem_x509_certificate(self.files.cert.read_bytes())
            remaining = cert.not_valid_after_utc - now
            if self.renew is not None and remaining < dt.timedelta(days=LISTENER_DAYS / 2):
                log.info("the mTLS listener's certificate expires in %s: issuing a new one", remaining)
                self.files = self.renew()
            stamp = self._stamp()
            if stamp != self._loaded:
                self.context.load_cert_chain(str(self.files.cert), str(self.files.key))
                self._loaded = stamp
                log.info("the mTLS listener now presents the certificate in %s", self.files.cert)
        except (OSError, ValueError, ssl.SSLError):  # caught mid-write (the key before the certificate): next round
            log.warning("could not refresh the mTLS listener's certificate; trying again later", exc_info=True)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.CHECK_SECONDS)
            await asyncio.to_thread(self.check)


class _Companion(uvicorn.Server):
    """A second server in the same loop: the main one owns the signals and tells this one to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve(
    settings: Settings,
    services: Services,
    max_connections: int,
    mtls_socket: socket.socket | None = None,
    main_socket: socket.socket | None = None,
    tls_files: TlsFiles | None = None,
) -> None:
    """Run until interrupted: the HTTP listener (on ``main_socket`` if given, else on settings' host and port)
    and, with ``mtls_socket``, Ktizo's mTLS listener beside it."""
    main = uvicorn.Server(server_config(settings, services, max_connections))
    # What start-up made (modules, the app, SQLAlchemy's and pydantic's machinery) lives as long as the process:
    # out of the collector's sight, since each full collection scanned all of it, a 40-130 ms pause every few
    # seconds in the middle of a boot storm (measured: bench/storm.py's p99).
    gc.collect()
    gc.freeze()
    main_sockets = [main_socket] if main_socket is not None else None
    if mtls_socket is None:
        main.run(sockets=main_sockets)
        return
    files = tls_files or mtls_listener_files(settings, services)
    context = mtls_context(files)
    # Workers share their supervisor's files: the one that runs the jobs renews them, the others reload.
    owner = tls_files is None or settings.run_jobs
    keeper = ListenerCertificate(context, files, partial(mtls_listener_files, settings, services) if owner else None)
    companion = _Companion(mtls_config(settings, main.config.app, files, max_connections, context))

    async def both() -> None:
        task = asyncio.create_task(companion.serve(sockets=[mtls_socket]))
        refresh = asyncio.create_task(keeper.run())
        try:
            await main.serve(sockets=main_sockets)
        finally:
            refresh.cancel()
            companion.should_exit = True
            await task

    with asyncio.Runner(loop_factory=main.config.get_loop_factory()) as runner:
        runner.run(both())
