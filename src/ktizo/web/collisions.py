"""The collision gate: zero-touch claims on a machine_uid an agent already holds, made without proof of that
agent's credentials. Nothing was minted for them; an operator decides each: approve the claimant as a new machine,
let it replace the existing agent, or reject it (its poll gets 403)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse

from ktizo.domain.errors import KtizoError, NotFound
from ktizo.domain.users import UserRole
from ktizo.services.zero_touch import Collision
from ktizo.web import device_forms as _device_forms  # noqa: F401 - registers the {name:id} path convertor
from ktizo.web.forms import Errors, note_error, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

ACTIONS = ("new", "replace", "reject")
MAX_ID = 2**31 - 1
MAX_LISTED = 16


def _text(value: object, limit: int = 255) -> str:
    return value[:limit] if isinstance(value, str) else ""


@dataclass(frozen=True)
class Claim:
    """What the claimant reported, read defensively: it is whatever a host sent."""

    hostname: str
    fqdn: str
    addresses: list[str]
    os: str
    kernel: str
    source_ip: str
    site: str
    key_version: int | None

    @classmethod
    def of(cls, claim: dict[str, Any]) -> Claim:
        raw_os = claim.get("os")
        os_info: dict[str, Any] = raw_os if isinstance(raw_os, dict) else {}
        addresses = claim.get("ip_addresses")
        version = claim.get("key_version")
        return cls(
            hostname=_text(claim.get("hostname")),
            fqdn=_text(claim.get("fqdn")),
            addresses=[_text(a, 64) for a in addresses[:MAX_LISTED]] if isinstance(addresses, list) else [],
            os=" ".join(p for p in (_text(os_info.get("id")), _text(os_info.get("version"))) if p),
            kernel=_text(os_info.get("kernel")),
            source_ip=_text(claim.get("source_ip"), 64),
            site=_text(claim.get("site"), 64),
            key_version=version if isinstance(version, int) and not isinstance(version, bool) else None,
        )


def collisions_page(request: Request, user: WebUser, *, status_code: int = 200, **extra: Any) -> Response:
    services = services_of(request)
    waiting: list[Collision] = services.zero_touch.collisions()
    sites = {site.id: site.site_code for site in services.sites.list()}
    context: dict[str, Any] = {
        "collisions": [(c, Claim.of(c.claim)) for c in waiting],
        "site_codes": sites,
        "errors": {},  # enrollment id -> field errors of its "new machine" form
        "values": {},  # enrollment id -> the hostname typed
    }
    context.update(extra)
    return page(request, "collisions.html", user, nav="collisions", status_code=status_code, **context)


@router.get("/ui/collisions")
def collisions(request: Request, user: CurrentUser) -> Response:
    return collisions_page(request, user)


@router.post("/ui/collisions/{enrollment_id:id}/resolve")
def resolve(request: Request, enrollment_id: int, user: CurrentUser, form: CheckedForm) -> Response:
    user.actor.require(UserRole.OPERATOR)  # a viewer is refused on the role, before anything is looked up
    action = text(form, "action", 16)
    hostname = text(form, "hostname", 253) if action == "new" else ""
    services = services_of(request)
    errors: Errors = {}
    if action not in ACTIONS:
        errors["_"] = "choose: approve as a new machine, replace the existing one, or reject"
    else:
        waiting = {c.enrollment_id: c for c in services.zero_touch.collisions()} if enrollment_id <= MAX_ID else {}
        held = waiting.get(enrollment_id)
        if held is None:
            response = RedirectResponse("/ui/collisions", status_code=303)
            set_flash(response, f"No claim {enrollment_id} waits at the collision gate any more: decided already?")
            return response
        existing = held.device.hostname or f"agent {held.device.id}"
        claimed = Claim.of(held.claim).hostname or "the claimant"
        try:
            device = services.zero_touch.resolve(user.actor, enrollment_id, action, hostname or None)
        except NotFound:
            response = RedirectResponse("/ui/collisions", status_code=303)
            set_flash(response, f"No claim {enrollment_id} waits at the collision gate any more: decided already?")
            return response
        except KtizoError as exc:
            # Only the new-machine form has a field; a refusal of the others goes above the forms.
            note_error(errors, exc, ("hostname",) if action == "new" else ())
        else:
            if action == "reject":
                message = (
                    f"Rejected the claim of {claimed} on {existing}: its poll is refused. {existing} is untouched."
                )
            elif action == "replace":
                message = (
                    f"{device.hostname or 'The claimant'} replaced {existing} (agent {device.id}): the old "
                    "credentials are revoked; the host collects its certificate on its next poll."
                )
            else:
                message = (
                    f"Approved {device.hostname or claimed} as a new machine (agent {device.id}); {existing} is "
                    "untouched. The host collects its certificate on its next poll."
                )
            response = RedirectResponse("/ui/collisions", status_code=303)
            set_flash(response, message)
            return response
    return collisions_page(
        request,
        user,
        status_code=422,
        errors={enrollment_id: errors},
        values={enrollment_id: hostname},
    )
