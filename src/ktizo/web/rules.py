"""Auto-approval rules in the UI: the list in the order they are tried, a rule's page with its dry run (which pending
machines it would take now and what each would get), and for operators an "edit as YAML" form and delete.

The form takes one ``kind: Rule`` document, exactly as ``ktizo apply -f`` reads it, and applies it through the same
declarative apply (one transaction, audited, errors naming the document and the field). It carries the revision of
the rule it was drawn from: a rule someone changed (or made) since is not silently overwritten; the refusal keeps
what the operator typed, and a second submit replaces it knowingly. Everyone signed in reads; viewers get no form."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.datastructures import FormData

from ktizo.domain.errors import KtizoError, NotFound, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services.declarative import document, dump, parse
from ktizo.services.rules import check_name, spec_of
from ktizo.web.forms import Errors, text
from ktizo.web.routing import WebRoute
from ktizo.web.session import CheckedForm, CurrentUser, WebUser, services_of
from ktizo.web.templating import page, set_flash

router = APIRouter(route_class=WebRoute, include_in_schema=False)

DOCUMENT_MAX = 64 * 1024
DRY_RUN_SHOWN = 500  # machines listed on a rule's page; `ktizo rules dry-run` and the API give up to 1,000
SOURCE = "form"  # what parse errors call the text: "form: document 1 (Rule 'x'): spec.action: …"

# The "new rule" template: a rule to start from, disabled until its dry run looks right.
NEW_RULE = """\
apiVersion: ktizo.dev/v1
kind: Rule
metadata:
  name: rack-a-workers
spec:
  priority: 100             # lowest first, then by name; the first rule that matches and can act decides
  enabled: false            # look at its dry run first, then set true
  match:                    # every condition must hold; a list is any of its values
    macPrefix: "52:54:00"
    sourceSubnet: 10.0.5.0/24
  action: approve           # or reject
  role: worker
  hostnamePattern: "worker-{n:02d}"
  ipRange: 10.0.5.100-10.0.5.150/24
  labels: {rack: a}
  maxCount: 40
"""

DOORS = {
    "config": "Talos config fetch",
    "ipxe": "iPXE boot",
    "dhcp": "DHCP lease",
    "register": "register call",
    "device_code": "console code",
    "agent": "agent enrollment",
    "site": "zero-touch site enrollment",
    "manual": "pre-registration",
}


def _any(values: Iterable[str]) -> str:
    items = list(values)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def match_words(match: Mapping[str, Any] | None) -> list[str]:
    """What a rule matches, condition by condition, as a person reads it."""
    match = match or {}
    words = []
    if match.get("macPrefix"):
        words.append(f"MAC starts with {_any(match['macPrefix'])}")
    if match.get("sourceSubnet"):
        words.append(f"knocks from {_any(match['sourceSubnet'])}")
    if match.get("leaseSubnet"):
        words.append(f"DHCP lease in {_any(match['leaseSubnet'])}")
    if match.get("door"):
        words.append(f"arrives by {_any(DOORS.get(d, d) for d in match['door'])}")
    if match.get("kind"):
        words.append(f"is {_any('a Talos machine' if k == 'talos' else 'an agent' for k in match['kind'])}")
    for key, wanted in (match.get("facts") or {}).items():
        how = "matches the regular expression" if key == "serial" else "is like"
        words.append(f"{key} {how} {wanted}")
    if match.get("site"):
        words.append(f"enrolls at site {_any(match['site'])}")
    return words or ["any pending machine"]


def settings_words(rule: Any) -> list[str]:
    """What a rule gives the machines it takes."""
    settings = rule.settings or {}
    words = []
    if rule.action == "reject":
        words.append("rejects them")
    if settings.get("role"):
        words.append(f"role {settings['role']}")
    if settings.get("hostnamePattern"):
        words.append(f"hostname {settings['hostnamePattern']}")
    if settings.get("ipRange"):
        words.append(f"address from {settings['ipRange']}")
    if settings.get("labels"):
        words.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(settings["labels"].items())))
    if settings.get("notes"):
        words.append(f"notes: {settings['notes']}")
    return words or ["approves them as they are"]


def rule_document(rule: Any) -> str:
    return dump([document("Rule", rule.name, spec_of(rule))])


def _require_operator(user: WebUser) -> None:
    user.actor.require(UserRole.OPERATOR)


def _done(url: str, message: str) -> Response:
    response = RedirectResponse(url, status_code=303)
    set_flash(response, message)
    return response


def _form_values(rule: Any | None, origin: str = "list") -> dict[str, str]:
    """The YAML form: a rule's document and the revision it was drawn from, or the new-rule template."""
    if rule is None:
        return {"document": NEW_RULE, "editing": "", "revision": "", "origin": origin}
    return {"document": rule_document(rule), "editing": rule.name, "revision": str(rule.revision), "origin": origin}


# -- the list ----------------------------------------------------------------------------------------------


def rules_page(request: Request, user: WebUser, *, status_code: int = 200, **extra: Any) -> Response:
    services = services_of(request)
    rows = [{"rule": r, "matches": match_words(r.match), "sets": settings_words(r)} for r in services.rules.list()]
    form_values = _form_values(None)
    editing = (request.query_params.get("edit") or "").strip()[:63]
    if editing and user.can_operate:
        with contextlib.suppress(NotFound):  # deleted meanwhile: the new-rule template instead
            form_values = _form_values(services.rules.get(editing))
    context: dict[str, Any] = {
        "rows": rows,
        "form_values": form_values,
        "form_errors": {},
        "form_open": bool(editing) or not rows,
    }
    context.update(extra)
    return page(request, "rules/list.html", user, nav="rules", status_code=status_code, **context)


@router.get("/ui/rules")
def rules(request: Request, user: CurrentUser) -> Response:
    return rules_page(request, user)


def _posted(form: FormData) -> dict[str, str]:
    raw = form.get("document")
    return {
        "document": raw[: DOCUMENT_MAX + 1] if isinstance(raw, str) else "",
        "editing": text(form, "editing", 63).lower(),
        "revision": text(form, "revision", 12),
        "origin": "detail" if text(form, "origin", 8) == "detail" else "list",
    }


def _seen_check(services: Any, name: str, values: dict[str, str]) -> str | None:
    """Refuse to overwrite a rule changed (or made, or deleted) since the form was drawn. Returns the message, and
    sets the form's revision to what is there now so that submitting again replaces it knowingly."""
    seen = int(values["revision"]) if values["editing"] == name and values["revision"].isdecimal() else None
    try:
        current = services.rules.get(name)
    except NotFound:
        current = None
    if current is None:
        if seen is None:
            return None
        values.update(editing="", revision="")
        return f"rule {name} was deleted since this form was opened: submit again to create it anew"
    if seen == current.revision:
        return None
    values.update(editing=name, revision=str(current.revision))
    if seen is None:
        return (
            f"a rule named {name} exists already (revision {current.revision}, by {current.author}): "
            "submit again to replace it with this text, or open it to edit it"
        )
    return (
        f"rule {name} was changed since this form was opened (revision {seen}; now {current.revision}, "
        f"by {current.author}): submit again to replace it with this text, or open it to start from the current one"
    )


def _outcome_message(change: Any, notes: list[str], enabled: bool) -> str:
    message = f"Rule {change.name} {change.result}"
    if change.diff:
        message += ": " + "; ".join(change.diff)
    message += "."
    if change.result != "unchanged":
        message += (
            " It decides machines from their next knock; its dry run shows which pending ones it would take."
            if enabled
            else " It is disabled: it decides nothing until enabled."
        )
    return message + "".join(f" {n}." for n in notes)


@router.post("/ui/rules")
def rule_apply(request: Request, user: CurrentUser, form: CheckedForm) -> Response:
    """One ``kind: Rule`` document from the textarea, applied as ``ktizo apply`` would."""
    _require_operator(user)
    services = services_of(request)
    values = _posted(form)
    errors: Errors = {}
    name = None
    if len(values["document"]) > DOCUMENT_MAX:
        errors["document"] = f"at most {DOCUMENT_MAX:,} characters; `ktizo apply -f` takes larger files"
    elif not values["document"].strip():
        errors["document"] = "paste or type a Rule document (the new-rule template is one to start from)"
    else:
        try:
            docs = parse(values["document"], SOURCE)
            if not docs:
                raise ValidationFailed(f"{SOURCE}: holds no document", "document")
            if len(docs) > 1:
                raise ValidationFailed(
                    f"{SOURCE}: holds {len(docs)} documents; this form takes one Rule (`ktizo apply -f` takes many)",
                    "document",
                )
            doc = docs[0]
            if doc.kind != "Rule":
                raise ValidationFailed(
                    f"{doc.where}: this form takes a Rule document only (kind: Rule); "
                    f"apply a {doc.kind} with `ktizo apply -f`",
                    "kind",
                )
            try:
                name = check_name(doc.name)
            except ValidationFailed:
                name = None  # the apply names the document and the field
            conflict = _seen_check(services, name, values) if name else None
            if conflict:
                errors["document"] = conflict
            else:
                report = services.declarative.apply(user.actor, docs)
                change = report.changes[0]
                rule = services.rules.get(change.name)
                message = _outcome_message(change, report.notes, rule.enabled)
                url = f"/ui/rules/{rule.name}" if values["origin"] == "detail" else f"/ui/rules#rule-{rule.name}"
                return _done(url, message)
        except KtizoError as exc:
            # A refusal of the text (a control-plane rule by an operator too) goes next to it, keeping what was typed.
            errors["document"] = exc.message
    if values["origin"] == "detail" and values["editing"]:
        try:
            rule = services.rules.get(values["editing"])
        except NotFound:
            pass
        else:
            return rule_page(request, user, rule, status_code=422, form_values=values, form_errors=errors)
    return rules_page(request, user, status_code=422, form_values=values, form_errors=errors, form_open=True)


# -- one rule ----------------------------------------------------------------------------------------------


def _machine(device: Any) -> str:
    return device.mac_address or device.machine_id or device.uuid or f"device {device.id}"


def rule_page(request: Request, user: WebUser, rule: Any, *, status_code: int = 200, **extra: Any) -> Response:
    services = services_of(request)
    rule, outcomes, passed_over = services.rules.dry_run(rule.name, limit=DRY_RUN_SHOWN + 1)
    rows = []
    for outcome in outcomes[:DRY_RUN_SHOWN]:
        try:
            device = services.devices.get(outcome.device_id)
        except NotFound:
            continue  # deleted since the dry run read it
        labels = sorted((outcome.labels or {}).items())
        rows.append({"outcome": outcome, "device": device, "machine": _machine(device), "labels": labels})
    taking = sum(1 for o in outcomes[:DRY_RUN_SHOWN] if o.error is None)
    context: dict[str, Any] = {
        "rule": rule,
        "matches": match_words(rule.match),
        "sets": settings_words(rule),
        "rows": rows,
        "more": len(outcomes) > DRY_RUN_SHOWN,
        "taking": taking,
        "passed_over": passed_over,
        "room": None if rule.max_count is None else max(0, rule.max_count - rule.matched),
        "yaml": rule_document(rule),
        "form_values": _form_values(rule, "detail"),
        "form_errors": {},
    }
    context.update(extra)
    return page(request, "rules/detail.html", user, nav="rules", status_code=status_code, **context)


@router.get("/ui/rules/{name}")
def rule_detail(request: Request, name: str, user: CurrentUser) -> Response:
    return rule_page(request, user, services_of(request).rules.get(name[:63]))


@router.post("/ui/rules/{name}/delete")
def rule_delete(request: Request, name: str, user: CurrentUser, form: CheckedForm) -> Response:
    _require_operator(user)
    services = services_of(request)
    try:
        rule = services.rules.get(name[:63])
    except NotFound:
        return RedirectResponse("/ui/rules", status_code=303)  # deleted already (a second click, another tab)
    services.rules.delete(user.actor, rule.name)
    decided = f" The {rule.matched} machine(s) it decided stay decided." if rule.matched else ""
    return _done("/ui/rules", f"Deleted rule {rule.name}: it decides nothing from now on.{decided}")
