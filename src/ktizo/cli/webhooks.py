"""``ktizo webhooks …``: subscriptions to events (device.approved, …), a test send, and the delivery log."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from ktizo.cli.common import print_json, print_table, reports_errors, safe, state
from ktizo.services.context import Actor

app = typer.Typer(
    help="Webhooks: events (device.approved, cert.issued, … or *) POSTed, signed, to an http(s) receiver.",
    no_args_is_help=True,
)

Name = Annotated[str, typer.Argument(metavar="NAME", help="The webhook's name")]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of text")]


def _when(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else ""


def _next_or_done(d: Any) -> str:
    if d.status == "delivered":
        return _when(d.delivered_at)
    return _when(d.next_attempt_at) if d.status == "pending" else ""


def _hook_json(hook: Any, counts: dict[str, dict[str, int]]) -> dict[str, Any]:
    return {
        "name": hook.name,
        "url": hook.url,
        "events": list(hook.events),
        "format": hook.format,
        "enabled": hook.enabled,
        "created_at": hook.created_at.isoformat(),
        "created_by": hook.created_by,
        "revision": hook.revision,
        "deliveries": {s: counts.get(hook.name, {}).get(s, 0) for s in ("pending", "delivered", "failed")},
    }


@app.command("create")
@reports_errors
def create_webhook(
    ctx: typer.Context,
    name: Name,
    url: Annotated[str, typer.Option("--url", metavar="URL", help="http:// or https:// receiver")],
    event: Annotated[
        list[str],
        typer.Option("--event", metavar="EVENT", help="An event to send (repeatable): device.approved, …, or *"),
    ],
    secret: Annotated[
        str | None,
        typer.Option("--secret", metavar="SECRET", help="Signing secret, at least 16 characters [default: made]"),
    ] = None,
    fmt: Annotated[
        str, typer.Option("--format", metavar="json|slack", help='The event as JSON, or Slack\'s {"text": …}')
    ] = "json",
) -> None:
    """Subscribe URL to events. The signing secret is printed once when Ktizo makes it."""
    hook, made = state(ctx).services().webhooks.create(Actor.cli(), name, url, event, format=fmt, secret=secret)
    typer.echo(f"created webhook {hook.name}: {', '.join(hook.events)} -> {safe(hook.url)} ({hook.format})")
    if secret is None:
        typer.echo(f"secret (shown once): {made}")


@app.command("list")
@reports_errors
def list_webhooks(ctx: typer.Context, as_json: Json = False) -> None:
    """Every webhook, with its deliveries by status."""
    services = state(ctx).services()
    hooks = services.webhooks.list()
    counts = services.webhooks.counts()
    if as_json:
        print_json([_hook_json(h, counts) for h in hooks])
        return
    if not hooks:
        typer.echo("No webhooks. Make one: ktizo webhooks create NAME --url URL --event device.approved")
        return
    print_table(
        ["name", "url", "events", "format", "enabled", "pending", "delivered", "failed"],
        [
            (
                h.name,
                h.url,
                ",".join(h.events),
                h.format,
                "yes" if h.enabled else "no",
                *(counts.get(h.name, {}).get(s, 0) for s in ("pending", "delivered", "failed")),
            )
            for h in hooks
        ],
    )


@app.command("show")
@reports_errors
def show_webhook(ctx: typer.Context, name: Name, as_json: Json = False) -> None:
    """One webhook (never its secret)."""
    services = state(ctx).services()
    hook = services.webhooks.get(name)
    data = _hook_json(hook, services.webhooks.counts())
    if as_json:
        print_json(data)
        return
    for key in ("name", "url", "events", "format", "enabled", "created_at", "created_by", "revision", "deliveries"):
        value = data[key]
        if isinstance(value, list):
            value = ", ".join(value)
        elif isinstance(value, dict):
            value = ", ".join(f"{n} {k}" for k, n in value.items())
        typer.echo(f"{key:<11} {safe(value)}")


@app.command("delete")
@reports_errors
def delete_webhook(ctx: typer.Context, name: Name) -> None:
    """Delete a webhook and its delivery log (what is pending is not sent)."""
    state(ctx).services().webhooks.delete(Actor.cli(), name)
    typer.echo(f"deleted webhook {name.strip().lower()}")


@app.command("test")
@reports_errors
def test_webhook(ctx: typer.Context, name: Name) -> None:
    """Send a signed webhook.test event now and show how the receiver answered (exit 1 if it did not take it)."""
    result = state(ctx).services().webhooks.test(name)
    if result.ok:
        typer.echo(f"delivered: HTTP {result.status} (X-Ktizo-Delivery {result.delivery_id})")
        return
    typer.secho(f"error: not delivered: {safe(result.error)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@app.command("deliveries")
@reports_errors
def list_deliveries(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(metavar="[NAME]", help="Only this webhook's")] = None,
    status: Annotated[
        str | None, typer.Option("--status", metavar="pending|delivered|failed", help="Only these")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many, newest first")] = 50,
    as_json: Json = False,
) -> None:
    """The delivery log, newest first: status, attempts, the receiver's last answer."""
    rows = state(ctx).services().webhooks.deliveries(name, status=status, limit=limit)
    if as_json:
        print_json(
            [
                {
                    "delivery_id": d.delivery_id,
                    "webhook": d.webhook,
                    "event_id": d.event_id,
                    "event": d.event,
                    "status": d.status,
                    "attempts": d.attempts,
                    "created_at": d.created_at.isoformat(),
                    "next_attempt_at": d.next_attempt_at.isoformat(),
                    "delivered_at": d.delivered_at.isoformat() if d.delivered_at else None,
                    "last_status": d.last_status,
                    "last_error": d.last_error,
                }
                for d in rows
            ]
        )
        return
    if not rows:
        typer.echo("No deliveries.")
        return
    print_table(
        ["delivery", "webhook", "event", "status", "attempts", "created", "next/delivered", "last"],
        [
            (
                d.delivery_id,
                d.webhook,
                d.event,
                d.status,
                d.attempts,
                _when(d.created_at),
                _next_or_done(d),
                d.last_error or (f"HTTP {d.last_status}" if d.last_status else ""),
            )
            for d in rows
        ],
    )
