"""Jinja2 for the UI: one environment, autoescaping always on, and the filters the pages share."""

from __future__ import annotations

import datetime as dt
import urllib.parse
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, PackageLoader, StrictUndefined

from ktizo import __version__
from ktizo.domain.clock import now as utcnow
from ktizo.domain.devices import DeviceStatus, Source
from ktizo.web.session import CSRF_FIELD, CSRF_HEADER, WebUser

FLASH_COOKIE = "ktizo_flash"

STATUS_LABEL = {
    DeviceStatus.PENDING.value: "Pending",
    DeviceStatus.APPROVED.value: "Approved",
    DeviceStatus.REJECTED.value: "Rejected",
}
SOURCE_LABEL = {
    Source.CONFIG_FETCH.value: "Talos config fetch",
    Source.REGISTER.value: "Register call",
    Source.MANUAL.value: "Pre-registered",
    Source.DHCP.value: "DHCP lease",
    Source.IPXE.value: "iPXE boot",
    Source.DEVICE_CODE.value: "Console code",
    Source.ENROLL.value: "Agent enrollment",
}


def ago(value: dt.datetime | None, now: dt.datetime | None = None) -> str:
    """'3 min ago', '2 h ago', 'in 5 min': short enough for a table cell; the exact time goes in a title."""
    if value is None:
        return "never"
    seconds = int(((now or utcnow()) - value).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    if seconds < 45:
        text = "just now" if not future else "in a moment"
        return text
    for limit, unit, size in ((3600, "min", 60), (86400, "h", 3600), (86400 * 60, "d", 86400)):
        if seconds < limit:
            n = max(1, round(seconds / size))
            return f"in {n} {unit}" if future else f"{n} {unit} ago"
    return value.strftime("%Y-%m-%d")


def exact(value: dt.datetime | None) -> str:
    if value is None:
        return ""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(value: dt.datetime | None) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if value else ""


def stamp(value: dt.datetime) -> str:
    """Full precision, for values the browser sends back (the poller's watermark)."""
    return value.astimezone(dt.UTC).isoformat()


def detail(value: Any) -> str:
    """An audit detail value as a person reads it: a change as "old → new", lists comma-separated."""
    if isinstance(value, dict) and set(value) == {"from", "to"}:
        return f"{detail(value['from'])} → {detail(value['to'])}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={detail(v)}" for k, v in value.items()) or "{}"
    if isinstance(value, list):
        return ", ".join(detail(v) for v in value) or "[]"
    if value is None:
        return "—"
    if value is True or value is False:
        return "yes" if value else "no"
    return str(value)


def number(value: int) -> str:
    return f"{value:,}"


def size(value: int | None) -> str:
    """Bytes as a person reads them (binary units, as ``free -h`` and ``lsblk`` print them): '15.5 GiB'."""
    if value is None:
        return "?"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if amount < 1024 or unit == "TiB":
            break
        amount /= 1024
    if unit == "B":
        return f"{int(amount)} B"
    return f"{amount:.1f} {unit}" if amount < 10 else f"{amount:.0f} {unit}"


def short_id(value: str | None, keep: int = 12) -> str:
    """A long identifier (an agent's machine-id) cut for a table cell; the full value goes in a title."""
    text = value or ""
    return text if len(text) <= keep + 1 else text[:keep] + "…"


def _query(base: dict[str, Any], **changes: Any) -> str:
    merged = {**base, **changes}
    return urllib.parse.urlencode({k: v for k, v in merged.items() if v not in (None, "")})


env = Environment(
    loader=PackageLoader("ktizo.web", "templates"),
    autoescape=True,  # every value from a machine or an operator is text, never markup
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
env.filters.update(
    ago=ago, exact=exact, iso=iso, stamp=stamp, number=number, detail=detail, size=size, short_id=short_id
)
env.globals.update(
    STATUS_LABEL=STATUS_LABEL,
    SOURCE_LABEL=SOURCE_LABEL,
    CSRF_FIELD=CSRF_FIELD,
    CSRF_HEADER=CSRF_HEADER,
    version=__version__,
    query=_query,
)


def render(template: str, **context: Any) -> str:
    return env.get_template(template).render(**context)


def page(
    request: Request,
    template: str,
    user: WebUser | None,
    *,
    status_code: int = 200,
    nav: str = "",
    **context: Any,
) -> HTMLResponse:
    flash = request.cookies.get(FLASH_COOKIE)
    html = render(
        template,
        user=user,
        nav=nav,
        flash=urllib.parse.unquote(flash)[:300] if flash else None,
        path=request.url.path,
        **context,
    )
    response = HTMLResponse(html, status_code=status_code)
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/ui")
    return response


def fragment(template: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(render(template, **context), status_code=status_code)


def set_flash(response: Any, message: str) -> None:
    response.set_cookie(FLASH_COOKIE, urllib.parse.quote(message[:300]), max_age=60, path="/ui", httponly=True)
