"""Running the server: uvicorn with the limits a server on an open provisioning network needs.

Anyone there can open connections and hold them. So: the process may use every file descriptor it is allowed
(the soft limit is raised to the hard one), serves at most ``max_connections`` at once (more get 503 at once),
holds at most half of those as long polls (services.download), closes a kept-alive connection idle for
``keep_alive_seconds`` and one whose request headers have not all arrived after ``header_timeout_seconds``."""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ktizo.app.asgi import create_app
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
        timeout_keep_alive=int(max(1, settings.keep_alive_seconds)),
        # Long-polled config requests would otherwise hold a shutdown for up to KTIZO_LONG_POLL_SECONDS.
        timeout_graceful_shutdown=5,
    )


def serve(settings: Settings, services: Services, max_connections: int) -> None:
    """Run until interrupted."""
    uvicorn.Server(server_config(settings, services, max_connections)).run()
