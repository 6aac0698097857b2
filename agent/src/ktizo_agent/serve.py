"""``ktizo-agent serve``: the agent's own mTLS listener, the check-in loop and the renewal timer.

Only Ktizo may call. The TLS handshake demands a client certificate from Ktizo's CA (ca.pem is the only trust
root); then the peer's address must be in the whitelist and its certificate must carry Ktizo's manager identity,
the URI SAN ``urn:ktizo:manager``, which Ktizo never puts in an agent's certificate. Everything is bounded: the
handshake and the request head have deadlines, the head a size, the server a number of open connections."""

from __future__ import annotations

import contextlib
import datetime as dt
import http.server
import io
import json
import logging
import random
import socket
import socketserver
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from ktizo_agent import agent, config, facts, identity, install, pki
from ktizo_agent.config import Paths
from ktizo_agent.errors import AgentError, Gone, Rejected, Throttled, UsageError
from ktizo_agent.stop import Stopper
from ktizo_agent.whitelist import Allowlist

log = logging.getLogger(__name__)

MANAGER_URI = "urn:ktizo:manager"
DEFAULT_LISTEN = "0.0.0.0:8443"  # Ktizo calls in from another host; the whitelist and mTLS guard the door
MAX_HEAD = 8 * 1024  # the only request is a bare GET: a few hundred bytes
HANDSHAKE_TIMEOUT = 10.0
REQUEST_DEADLINE = 10.0  # for the whole request head, not per read: a trickling client cannot hold a thread
MAX_CONNECTIONS = 32
DEFAULT_CHECKIN_INTERVAL = 300.0
_rng = random.SystemRandom()


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT``; port 0 picks a free one."""
    value = text.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = value.rpartition(":")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise UsageError(f"--listen wants HOST:PORT (for example {DEFAULT_LISTEN}), not {text!r}")
    return host, int(port_text)


def server_context(paths: Paths) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(paths.ca))
    context.load_cert_chain(str(paths.server_cert), str(paths.server_key))
    return context


class TlsFiles:
    """The listener's SSLContext, rebuilt when the certificate files change on disk, whoever changed them (this
    process's renewal timer or a `ktizo-agent renew` run by hand). New connections get the new context;
    connections already open finish with the old one."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._lock = threading.Lock()
        self._stamp = self._stamp_now()
        try:
            self._context = server_context(paths)
        except (OSError, ssl.SSLError) as exc:
            raise AgentError(
                f"cannot load the listener's certificate, key and CA from {paths.cert_dir}: {exc}",
                hint="enroll again, or restore the files from their .prev copies",
            ) from None

    def _stamp_now(self) -> tuple[object, ...]:
        return tuple(config.file_stamp(p) for p in (self.paths.ca, self.paths.server_cert, self.paths.server_key))

    def current(self) -> ssl.SSLContext:
        stamp = self._stamp_now()
        with self._lock:
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._context = server_context(self.paths)
                except (OSError, ssl.SSLError) as exc:
                    # Mid-install the key may be new and the certificate not yet: keep serving the old pair; the
                    # install's next file lands a moment later and changes the stamp again.
                    log.warning("the certificate files changed but do not load together (%s): keeping the old", exc)
                else:
                    log.info("the listener now presents %s", _describe(self.paths))
            return self._context


def _describe(paths: Paths) -> str:
    try:
        cert = pki.load_certificate_file(paths.server_cert)
    except AgentError:
        return str(paths.server_cert)
    return f"certificate serial {cert.serial_number:x}, valid until {pki.iso(cert.not_valid_after_utc)}"


class _HeadTooLarge(Exception):
    pass


def _read_head(sock: socket.socket, limit: int, seconds: float) -> bytes:
    """The request line and headers, read under one deadline for all of them."""
    deadline = time.monotonic() + seconds
    data = bytearray()
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request head took too long")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            return b""
        data += chunk
        if len(data) > limit:
            raise _HeadTooLarge
    return bytes(data)


class AgentServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(
        self,
        address: tuple[str, int],
        *,
        tls: TlsFiles,
        allowlist: Allowlist,
        facts: Callable[[], dict[str, Any]],
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.tls = tls
        self.allowlist = allowlist
        self.facts = facts
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's version resolves our own name: a DNS wait for nothing
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("refused a connection from %s: %d already open", client_address[0], self.max_connections)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake happens here, in the connection's own thread, so a slow one never stalls accept().
        request.settimeout(HANDSHAKE_TIMEOUT)
        try:
            tls = self.tls.current().wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused the TLS handshake from %s: %s", client_address[0], getattr(exc, "reason", None) or exc)
            return
        try:
            _Handler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("error serving %s: %s", client_address[0], sys.exc_info()[1])
        log.debug("details", exc_info=True)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: AgentServer
    connection: ssl.SSLSocket
    protocol_version = "HTTP/1.0"  # one request per connection: nothing to hold open
    server_version = "ktizo-agent"
    sys_version = ""
    timeout = REQUEST_DEADLINE
    wbufsize = 64 * 1024  # headers and body leave together: two small writes would wait on Nagle and delayed ACKs

    def handle(self) -> None:
        self.close_connection = True
        self.request_version, self.command, self.requestline = "HTTP/1.0", "", ""
        try:
            head = _read_head(self.connection, MAX_HEAD, REQUEST_DEADLINE)
        except _HeadTooLarge:
            self.send_error(431, f"the request head is over {MAX_HEAD} bytes")
            return
        except (OSError, ssl.SSLError) as exc:
            log.debug("dropped %s: %s", self.client_address[0], exc)
            return
        if not head:
            return
        self.connection.settimeout(REQUEST_DEADLINE)
        self.rfile = io.BytesIO(head)
        self.raw_requestline = self.rfile.readline(MAX_HEAD + 1)
        if self.parse_request():
            self._dispatch()

    def _dispatch(self) -> None:
        peer = self.client_address[0]
        path = urllib.parse.urlsplit(self.path).path
        refusal = self._refusal(peer)
        if refusal:
            log.warning("refused %s %s from %s: %s", self.command, path[:100], peer, refusal)
            self._json(403, {"detail": f"forbidden: {refusal}"})
            return
        if self.command in ("GET", "HEAD") and path == "/v1/facts":
            try:
                body = self.server.facts()
            except AgentError as exc:
                log.error("could not collect facts: %s", exc.message)
                self._json(500, {"detail": "the agent could not collect its facts"})
                return
            log.info("served facts to %s", peer)
            self._json(200, body)
            return
        self._json(404, {"detail": "not found"})

    def _refusal(self, peer: str) -> str | None:
        if not self.server.allowlist.allows(peer):
            return f"{peer} is not in the whitelist {self.server.allowlist.path}"
        der = self.connection.getpeercert(binary_form=True)
        if not der:
            return "no client certificate"
        try:
            sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = sans.value.get_values_for_type(x509.UniformResourceIdentifier)
        except (ValueError, x509.ExtensionNotFound):
            uris = []
        if MANAGER_URI not in uris:
            return f"the client certificate does not carry Ktizo's manager identity ({MANAGER_URI})"
        return None

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        self.close_connection = True
        self._json(code, {"detail": message or self.responses.get(code, ("error",))[0]})

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.client_address[0], format % args)


@dataclass
class _Hint:
    serial: int
    renew_after: dt.datetime


class _Loops:
    """The check-in loop and the renewal timer, each in its own thread. A 403 from Ktizo to either ends both:
    the agent was revoked, rejected or purged, and asking again would only fill Ktizo's log."""

    def __init__(
        self,
        paths: Paths,
        sources: identity.Sources,
        collect: Callable[[], dict[str, Any]],
        listen_port: int,
        stopper: Stopper,
        tls: TlsFiles,
        retry_base: float,
    ) -> None:
        self.paths = paths
        self.sources = sources
        self.collect = collect
        self.listen_port = listen_port
        self.stopper = stopper
        self.tls = tls
        self.retry_base = retry_base
        self.refused = threading.Event()
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._hint: _Hint | None = None
        self._jitter: dict[int, dt.timedelta] = {}

    def _backoff(self, failures: int, cap: float) -> float:
        return float(min(cap, self.retry_base * 2 ** max(0, failures - 1)))

    def _refuse(self, what: str, exc: AgentError) -> None:
        log.error("Ktizo refused the %s: %s. No more check-ins or renewals; the listener keeps serving.", what, exc)
        self.refused.set()
        self.wake.set()

    def checkin_loop(self) -> None:
        interval, failures, announced = DEFAULT_CHECKIN_INTERVAL, 0, False
        while not self.stopper.stopped and not self.refused.is_set():
            try:
                member = agent.membership(self.paths)
                answer = agent.checkin(self.paths, member, self.collect(), self.listen_port)
            except (Rejected, Gone) as exc:
                self._refuse("check-in", exc)
                return
            except Throttled as exc:
                delay = exc.retry_after if exc.retry_after is not None else interval
            except AgentError as exc:
                failures += 1
                delay = self._backoff(failures, interval)
                log.warning("check-in failed: %s; trying again in %.0fs", exc.message, delay)
            except Exception:
                failures += 1
                delay = self._backoff(failures, interval)
                log.exception("check-in failed unexpectedly; trying again in %.0fs", delay)
            else:
                failures = 0
                interval = answer.interval or interval
                delay = interval
                if answer.renew_after is not None:
                    with self._lock:
                        self._hint = _Hint(answer.serial, answer.renew_after)
                    self.wake.set()
                if not announced:
                    log.info("checked in with Ktizo at %s; again every %gs", member.mtls_url, interval)
                    announced = True
            if self.stopper.wait(delay):
                return

    def _due(self, cert: x509.Certificate) -> dt.datetime:
        """2/3 into the lifetime, a little earlier at random so a fleet approved together does not renew together;
        earlier still if Ktizo's check-in answer said so for this very certificate."""
        lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
        jitter = self._jitter.setdefault(
            cert.serial_number, dt.timedelta(seconds=_rng.uniform(0, min(lifetime.total_seconds() * 0.05, 3600)))
        )
        due = pki.renewal_due(cert) - jitter
        with self._lock:
            hint = self._hint
        if hint is not None and hint.serial == cert.serial_number and hint.renew_after < due:
            due = hint.renew_after
        return due

    def renewal_loop(self) -> None:
        failures = 0
        while not self.stopper.stopped and not self.refused.is_set():
            self.wake.clear()
            try:
                cert = pki.load_certificate_file(self.paths.server_cert)
            except AgentError as exc:
                failures += 1
                log.error("renewal timer: %s", exc.message)
                self.wake.wait(self._backoff(failures, 3600))
                continue
            left = (self._due(cert) - dt.datetime.now(dt.UTC)).total_seconds()
            if left > 0:
                self.wake.wait(min(left, 3600))  # re-evaluated at least hourly: clocks jump, files change
                continue
            try:
                done = agent.renew(self.paths, agent.membership(self.paths), self.sources)
            except (Rejected, Gone) as exc:
                self._refuse("renewal", exc)
                return
            except Throttled as exc:
                self.wake.wait(exc.retry_after if exc.retry_after is not None else 60)
                continue
            except Exception as exc:
                failures += 1
                delay = self._backoff(failures, 3600)
                log.warning("renewal failed: %s; trying again in %.0fs", getattr(exc, "message", exc), delay)
                log.debug("details", exc_info=True)
                self.wake.wait(delay)
                continue
            failures = 0
            with self._lock:
                self._hint = None
            log.info("renewed: new certificate valid until %s", pki.iso(done.cert.not_valid_after_utc))
            self.tls.current()


def serve(
    paths: Paths,
    sources: identity.Sources,
    roots: facts.Roots,
    listen: tuple[str, int],
    stopper: Stopper,
    *,
    on_listening: Callable[[str, int], None] | None = None,
    max_connections: int = MAX_CONNECTIONS,
    retry_base: float = 5.0,
    poll_interval: float = 0.5,
) -> None:
    """Serve until ``stopper`` stops. ``poll_interval`` is how often the listener looks for a stop request."""
    install.resume(paths)
    agent.membership(paths)
    identity.collect(sources)  # a missing machine-id is a startup error, not a 500 on every request
    tls = TlsFiles(paths)
    allowlist = Allowlist(paths.whitelist)
    if not paths.whitelist.exists():
        log.warning("the whitelist %s does not exist: every caller will be refused", paths.whitelist)

    def collect() -> dict[str, Any]:
        return facts.collect(identity.collect(sources), roots)

    try:
        server = AgentServer(listen, tls=tls, allowlist=allowlist, facts=collect, max_connections=max_connections)
    except OSError as exc:
        raise AgentError(f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}") from None
    host, port = str(server.server_address[0]), int(server.server_address[1])
    loops = _Loops(paths, sources, collect, port, stopper, tls, retry_base)
    threads = [
        threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": poll_interval}, name="listener", daemon=True
        ),
        threading.Thread(target=loops.checkin_loop, name="checkin", daemon=True),
        threading.Thread(target=loops.renewal_loop, name="renewal", daemon=True),
    ]
    for thread in threads:
        thread.start()
    (on_listening or (lambda h, p: log.info("listening on %s:%d", h, p)))(host, port)
    try:
        stopper.wait(None)
    finally:
        loops.wake.set()
        server.shutdown()
        server.server_close()
        for thread in threads[1:]:
            thread.join(timeout=30)  # a renewal mid-install finishes rather than dies with the process
