"""Talking to Ktizo over HTTP: its public door (before the host has a certificate) and its mTLS door (after).

This layer only moves bytes and reads the reply; what each status means is decided by the flows that call it."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from ktizo_agent import __version__
from ktizo_agent.config import Paths
from ktizo_agent.errors import AgentError, UsageError

USER_AGENT = f"ktizo-agent/{__version__}"
MAX_REPLY_BYTES = 1024 * 1024  # a bundle is a few KiB; anything this big is not Ktizo talking
TIMEOUT = httpx.Timeout(15.0, connect=10.0)
MAX_RETRY_AFTER = 3600.0


class Unreachable(AgentError):
    """No HTTP answer at all: connection refused, TLS failure, timeout, or a reply too large to be Ktizo's.
    ``transient`` is False when trying again cannot help (the server's certificate does not verify)."""

    def __init__(self, message: str, hint: str | None = None, *, transient: bool = True) -> None:
        super().__init__(message, hint)
        self.transient = transient


@dataclass(frozen=True)
class Reply:
    status: int
    content: bytes
    headers: httpx.Headers

    def json(self) -> Any:
        try:
            return json.loads(self.content)
        except ValueError:
            return None

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    @property
    def detail(self) -> str:
        """Ktizo's ``{"detail": ...}``: a message, or (422) a list of field errors, flattened to one line."""
        body = self.json()
        detail = body.get("detail") if isinstance(body, dict) else None
        if isinstance(detail, str):
            return detail
        if isinstance(detail, list):
            return "; ".join(_field_error(item) for item in detail)
        text = self.text.strip()
        return text[:200] if text else f"HTTP {self.status}"

    @property
    def retry_after(self) -> float | None:
        """Retry-After in seconds (either delta-seconds or an HTTP date), capped so a typo cannot park us for days."""
        value = self.headers.get("retry-after")
        if not value:
            return None
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            seconds = (when - dt.datetime.now(dt.UTC)).total_seconds()
        return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _field_error(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(p) for p in item.get("loc") or [] if p != "body"]
    msg = str(item.get("msg") or item)
    return f"{'.'.join(loc)}: {msg}" if loc else msg


def check_manager_url(text: str) -> str:
    """``MANAGER_URL`` as the base for ``/api/v1/...``: http(s), a host, no query or fragment."""
    parts = urllib.parse.urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"MANAGER_URL must be an http:// or https:// URL of the Ktizo server, not {text!r}")
    if parts.query or parts.fragment:
        raise UsageError("MANAGER_URL takes no query or fragment: give the server's base URL")
    return text.strip().rstrip("/")


class Door:
    """One base URL, one connection pool, bounded replies."""

    def __init__(self, base_url: str, verify: ssl.SSLContext | bool, *, trust_env: bool = True) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(
            verify=verify,
            timeout=TIMEOUT,
            trust_env=trust_env,
            follow_redirects=False,  # a redirect would carry the token somewhere nobody pinned
            headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
        )

    def __enter__(self) -> Door:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, body: Any = None, *, headers: dict[str, str] | None = None) -> Reply:
        url = self.base_url + path
        try:
            with self._client.stream(method, url, json=body, headers=headers) as response:
                content = bytearray()
                for chunk in response.iter_bytes():
                    content += chunk
                    if len(content) > MAX_REPLY_BYTES:
                        raise Unreachable(f"{self.base_url} sent a reply larger than {MAX_REPLY_BYTES} bytes")
                return Reply(response.status_code, bytes(content), response.headers)
        except httpx.HTTPError as exc:
            if _cert_rejected(exc):
                raise Unreachable(
                    f"{self.base_url}: its TLS certificate does not verify ({_describe(exc)})",
                    hint="for a server with a private CA pass --manager-ca FILE",
                    transient=False,
                ) from None
            raise Unreachable(f"{self.base_url}: {_describe(exc)}") from None


def _cert_rejected(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore, which wraps ssl
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe(exc: httpx.HTTPError) -> str:
    # httpx's messages name the failure, not the URL, so the polling token in a status path never shows here.
    return str(exc).strip() or type(exc).__name__


def public_door(manager_url: str, *, insecure: bool, manager_ca: Path | None) -> Door:
    """Ktizo's public URL: system trust (or ``--manager-ca``), since it may sit behind a proxy with a public
    certificate; ``--insecure`` turns verification off, as the seed's ``--enroll-insecure`` does."""
    verify: ssl.SSLContext | bool
    if insecure:
        verify = False
    elif manager_ca is not None:
        try:
            verify = ssl.create_default_context(cafile=str(manager_ca))
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"--manager-ca {manager_ca}: cannot load it as a CA bundle ({exc})") from None
    elif urllib.parse.urlsplit(manager_url).scheme == "http":
        verify = False  # no TLS to verify: spare loading the system's trust store for nothing
    else:
        verify = ssl.create_default_context()
    return Door(manager_url, verify)


def client_context(paths: Paths) -> ssl.SSLContext:
    """The agent's mTLS client: Ktizo's CA as the only trust root, our certificate presented, hostnames checked
    (Ktizo's listener certificate names the mtls_url host)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(paths.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(paths.server_cert), str(paths.server_key))
    return context


def mtls_door(mtls_url: str, paths: Paths) -> Door:
    try:
        context = client_context(paths)
    except (OSError, ssl.SSLError) as exc:
        raise AgentError(
            f"cannot load the agent's certificate and key from {paths.cert_dir}: {exc}",
            hint="check the files, or enroll again",
        ) from None
    # No proxies from the environment: a proxy in between would end the mutual TLS.
    return Door(mtls_url, context, trust_env=False)
