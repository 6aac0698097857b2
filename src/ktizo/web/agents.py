"""Linux hosts running ``ktizo-agent``: the page that tells an operator how to enroll one (Ktizo's CA fingerprint
and the commands to run on the host), and an agent's revoke and purge. Listing, approving and rejecting agents is
the device list's and the device page's (agents are devices of kind ``agent``)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ktizo.domain.devices import DeviceStatus
from ktizo.domain.errors import NotFound
from ktizo.domain.users import UserRole
from ktizo.web.device_forms import after_change
from ktizo.web.forms import text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

# ktizo-agent is not published on PyPI (a package of that name there would not be this one): install it from
# Ktizo's checkout, or from a wheel built once from it.
INSTALL_FROM_INDEX = "pip install ./agent"
INSTALL_FROM_CHECKOUT = "pip wheel --no-deps -w dist ./agent   # then on each host: pip install ktizo_agent-*.whl"
CA_PATH = "/api/v1/pki/ca.pem"
WAITING_LIMIT = 1000


def public_url(request: Request) -> str | None:
    settings = getattr(request.app.state, "settings", None)
    configured: str | None = settings.public_url if settings is not None else None
    return configured or None


def public_base(request: Request) -> str:
    """The URL hosts reach Ktizo at: the configured public URL, else the one this page was asked for."""
    return (public_url(request) or str(request.base_url)).rstrip("/")


def enroll_command(base: str, fingerprint: str) -> str:
    return f"ktizo-agent --enroll {base} --ca-fingerprint {fingerprint}"


@router.get("/ui/agents")
def agents_root() -> RedirectResponse:
    return RedirectResponse("/ui/agents/install", status_code=303)


@router.get("/ui/agents/install")
def agents_install(request: Request, user: CurrentUser) -> Response:
    services = services_of(request)
    base = public_base(request)
    fingerprint = services.authority.fingerprint()
    return page(
        request,
        "agents_install.html",
        user,
        nav="agents",
        fingerprint=fingerprint,
        base=base,
        public_url=bool(public_url(request)),
        ca_url=base + CA_PATH,
        install_command=INSTALL_FROM_INDEX,
        checkout_command=INSTALL_FROM_CHECKOUT,
        enroll_command=enroll_command(base, fingerprint),
        waiting=len(services.agents.list(DeviceStatus.PENDING, limit=WAITING_LIMIT)),
        waiting_limit=WAITING_LIMIT,
    )


@router.post("/ui/agents/{device_id:id}/revoke")
def agent_revoke(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    """An approved agent becomes rejected; every certificate it holds is revoked (mTLS refused, in the CRL)."""
    user.actor.require(UserRole.OPERATOR)  # a viewer is refused on the role, whatever state the agent is in
    notes = text(form, "notes", 4096)
    services_of(request).agents.revoke(user.actor, str(device_id), notes or None)
    return after_change(request, device_id, "Revoked: its certificates are refused from now on and listed in the CRL.")


@router.post("/ui/agents/{device_id:id}/purge")
def agent_purge(request: Request, device_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    """Forget the agent (record, enrollment, token; certificates revoked): back to the list, which no longer has it."""
    user.actor.require(UserRole.OPERATOR)
    services = services_of(request)
    try:
        device = services.agents.resolve(str(device_id))
    except NotFound:
        return RedirectResponse("/ui/devices", status_code=303)  # purged already (a second click, another tab)
    services.agents.purge(user.actor, str(device_id))
    response = RedirectResponse(f"/ui/devices?status={device.status}", status_code=303)
    name = device.hostname or (device.facts or {}).get("hostname") or device.machine_id or f"agent {device_id}"
    set_flash(
        response,
        f"Purged {name}: its certificates are revoked and its record is gone (the audit log keeps its history). "
        "The host may enroll again from scratch.",
    )
    return response
