"""Webhooks against a real local HTTP receiver: an approval arrives signed (verified with the documented recipe),
filters and the Slack format, retries with backoff while the receiver is down (on the test's clock), giving up
after 24 h, redirects not followed, the deny list, refused targets, two deliverers racing, and a delivery whose
process died after sending re-sent once, with the same id, after its lease."""

from __future__ import annotations

import datetime as dt
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from ktizo.app import build_services
from ktizo.db.models import WebhookDelivery
from ktizo.domain.errors import Conflict, PermissionDenied, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.pki.sealing import Sealer
from ktizo.services.context import Actor
from ktizo.services.queries import DeviceChanges
from ktizo.services.registry import Services
from ktizo.services.webhooks import LEASE, WebhookService, backoff, signature
from ktizo.settings import Settings
from tests.clock import ManualClock
from tests.factories import approved, next_mac, pending
from tests.webhook_receiver import Receiver, free_port, verify

SECRET = "s3cret-s3cret-s3cret"
ADMIN = Actor.system()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def hook(services: Services, url: str, *events: str, name: str = "ops", **kw: Any) -> str:
    created, secret = services.webhooks.create(ADMIN, name, url, list(events) or ["*"], secret=SECRET, **kw)
    assert created.name == name and secret == SECRET
    return name


def deliveries(services: Services) -> list[WebhookDelivery]:
    with services.db.read() as s:
        return list(s.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)))


def test_an_approval_arrives_signed_and_verifies_with_the_documented_recipe(
    services: Services, receiver: Receiver, clock: ManualClock
) -> None:
    hook(services, receiver.url, "device.approved")
    device = approved(
        services, hostname="node-01", ip_address="10.0.5.100/24", actor=Actor.user("alice", UserRole.OPERATOR)
    )
    assert services.webhooks.run() == 1
    (got,) = receiver.requests
    assert got.path == "/hook"
    assert got.headers["x-ktizo-event"] == "device.approved"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["user-agent"].startswith("ktizo/")
    assert str(uuid.UUID(got.delivery)) == got.delivery
    assert verify(SECRET, got.headers["x-ktizo-signature"], got.body, tolerance=300, now=clock.now().timestamp())
    assert not verify("another-secret-entirely", got.headers["x-ktizo-signature"], got.body)
    assert not verify(SECRET, got.headers["x-ktizo-signature"], got.body + b" ")
    t = int(got.headers["x-ktizo-signature"].split(",")[0][2:])
    assert t == int(clock.now().timestamp())
    assert got.headers["x-ktizo-signature"] == signature(SECRET, t, got.body)
    body = json.loads(got.body)
    assert body["id"] == got.delivery and body["event"] == "device.approved"
    assert body["machine"]["id"] == device.id and body["machine"]["hostname"] == "node-01"
    assert body["machine"]["mac_address"] == device.mac_address and body["machine"]["status"] == "approved"
    assert body["machine"]["ip_address"] == "10.0.5.100/24"
    assert body["actor"] == {"name": "alice", "kind": "user", "source_ip": None}
    assert dt.datetime.fromisoformat(body["at"].replace("Z", "+00:00")) == clock.now()
    assert "patch" not in body["machine"]
    (row,) = deliveries(services)
    assert (row.status, row.attempts, row.last_status, row.delivery_id) == ("delivered", 1, 200, got.delivery)
    assert row.delivered_at == clock.now() and row.claimed_until is None
    clock.advance(hours=1)
    assert services.webhooks.run() == 0 and len(receiver.requests) == 1


def test_star_and_specific_filters(services: Services, receiver: Receiver, clock: ManualClock) -> None:
    hook(services, receiver.url + "/all", "*", name="all")
    hook(services, receiver.url + "/rejected", "device.rejected", name="rejected")
    approved(services, hostname="node-01")  # device.created, device.approved
    waiting = pending(services)  # device.discovered
    services.devices.reject(ADMIN, waiting.id, "not ours")
    services.webhooks.run()
    seen = [(r.path, r.headers["x-ktizo-event"]) for r in receiver.requests]
    assert sorted(seen) == sorted(
        [
            ("/hook/all", "device.created"),
            ("/hook/all", "device.approved"),
            ("/hook/all", "device.discovered"),
            ("/hook/all", "device.rejected"),
            ("/hook/rejected", "device.rejected"),
        ]
    )
    rejected = next(r for r in receiver.requests if r.path == "/hook/rejected")
    assert json.loads(rejected.body)["details"] == {"from": "pending", "revoked": False}


def test_a_subscription_gets_the_events_from_its_creation_on(services: Services, receiver: Receiver) -> None:
    approved(services)
    hook(services, receiver.url)
    assert services.webhooks.run() == 0 and receiver.requests == []


def test_a_disabled_subscription_gets_nothing(services: Services, receiver: Receiver) -> None:
    hook(services, receiver.url, enabled=False)
    approved(services)
    assert services.webhooks.run() == 0 and receiver.requests == []


def test_the_slack_format_is_one_escaped_line(services: Services, receiver: Receiver) -> None:
    hook(services, receiver.url, "device.approved", format="slack")
    device = approved(services, hostname="node-01", ip_address="10.0.5.100/24")
    with services.db.write() as s:  # what a machine reported may hold Slack's markup: it must stay text
        from ktizo.db.models import Device

        row = s.get(Device, device.id)
        assert row is not None
        row.labels = {"x": "y"}
    services.webhooks.run()
    (got,) = receiver.requests
    body = json.loads(got.body)
    assert list(body) == ["text"]
    assert body["text"] == f"[ktizo] device.approved: node-01 ({device.mac_address}, 10.0.5.100/24, approved) by system"
    assert verify(SECRET, got.headers["x-ktizo-signature"], got.body)
    from ktizo.services.webhooks import slack_text

    evil = slack_text({"event": "device.discovered", "machine": {"hostname": "<!channel>"}, "actor": {"name": "a&b"}})
    assert "<" not in evil and "&lt;!channel&gt;" in evil and "a&amp;b" in evil


def test_retries_with_backoff_while_the_receiver_is_down_then_delivers_once(
    services: Services, clock: ManualClock
) -> None:
    port = free_port()
    hook(services, f"http://127.0.0.1:{port}/hook")
    approved(services)  # two events: created, approved
    assert services.webhooks.run() == 2
    rows = deliveries(services)
    assert [(r.status, r.attempts, r.last_status) for r in rows] == [("pending", 1, None)] * 2
    assert all("refused" in (r.last_error or "").lower() for r in rows), rows[0].last_error
    first_gap = (rows[0].next_attempt_at - clock.now()).total_seconds()
    assert 16 <= first_gap <= 24  # 10 s * 2^1, ±20 %
    assert services.webhooks.run() == 0  # not due yet: nothing is attempted
    clock.advance(seconds=25)
    assert services.webhooks.run() == 2
    rows = deliveries(services)
    assert [r.attempts for r in rows] == [2, 2]
    assert 32 <= (rows[0].next_attempt_at - clock.now()).total_seconds() <= 48  # doubled
    receiver = Receiver(port)
    try:
        clock.advance(seconds=49)
        assert services.webhooks.run() == 2
        assert sorted(r.headers["x-ktizo-event"] for r in receiver.requests) == ["device.approved", "device.created"]
        assert [(r.status, r.attempts, r.last_error) for r in deliveries(services)] == [("delivered", 3, None)] * 2
        for _ in range(5):
            clock.advance(hours=1)
            services.webhooks.run()
        assert len(receiver.requests) == 2 and len(receiver.by_delivery()) == 2
    finally:
        receiver.stop()


def test_backoff_doubles_up_to_an_hour_with_jitter() -> None:
    assert backoff(1, 0.5) == 20 and backoff(2, 0.5) == 40 and backoff(3, 0.5) == 80
    assert backoff(20, 0.5) == 3600 and backoff(200, 0.5) == 3600
    assert backoff(1, 0.0) == pytest.approx(16) and backoff(1, 1.0) == pytest.approx(24)


def test_gives_up_after_24_hours(services: Services, clock: ManualClock) -> None:
    hook(services, f"http://127.0.0.1:{free_port()}/hook", "device.approved")
    approved(services)
    services.webhooks.dispatch()
    attempts = 0
    while deliveries(services)[0].status == "pending":
        services.webhooks.deliver()
        attempts += 1
        clock.advance(hours=1, seconds=30)
        assert attempts < 100
    (row,) = deliveries(services)
    assert row.status == "failed" and row.last_error and row.last_error.startswith("gave up")
    assert 10 < row.attempts < 40
    clock.advance(hours=2)
    assert services.webhooks.run() == 0


@pytest.mark.parametrize("code", [301, 302, 307, 308])
def test_a_redirect_is_not_followed(services: Services, code: int, clock: ManualClock) -> None:
    elsewhere = Receiver()
    redirecting = Receiver(status=code, location=elsewhere.url + "/stolen")
    try:
        hook(services, redirecting.url, "device.approved")
        approved(services)
        services.webhooks.run()
        assert len(redirecting.requests) == 1 and elsewhere.requests == []
        (row,) = deliveries(services)
        assert (row.status, row.last_status) == ("pending", code)
        assert row.last_error == f"HTTP {code}: a redirect, not followed"
    finally:
        redirecting.stop()
        elsewhere.stop()


def test_an_error_status_is_retried_with_what_the_receiver_said(
    services: Services, receiver: Receiver, clock: ManualClock
) -> None:
    receiver.status = 503
    hook(services, receiver.url, "device.approved")
    approved(services)
    services.webhooks.run()
    (row,) = deliveries(services)
    assert (row.status, row.last_status, row.last_error) == ("pending", 503, "HTTP 503: ok")
    receiver.status = 204
    clock.advance(minutes=1)
    services.webhooks.run()
    (row,) = deliveries(services)
    assert (row.status, row.last_status, row.attempts) == ("delivered", 204, 2)
    assert len(receiver.by_delivery()) == 1 and len(receiver.requests) == 2


def test_the_deny_list_refuses_targets_in_its_networks(
    services: Services, receiver: Receiver, clock: ManualClock
) -> None:
    denied = WebhookService(services.db, Sealer(), deny=["10.0.0.0/8", "127.0.0.0/8"])
    hook(services, receiver.url, "device.approved")
    hook(services, f"http://localhost:{receiver.port}/hook", "device.approved", name="by-name")
    approved(services)
    assert denied.run() == 2
    assert receiver.requests == []
    errors = sorted(r.last_error or "" for r in deliveries(services))
    assert errors[0] == "refused by KTIZO_WEBHOOK_DENY: 127.0.0.1 is 127.0.0.1, in 127.0.0.0/8"
    assert errors[1].startswith("refused by KTIZO_WEBHOOK_DENY: localhost is ") and "127.0.0.0/8" in errors[1]
    assert denied.test("ops").error == errors[0]
    # A deny list that does not hold the target: delivered, to the address that was checked, with its own Host.
    allowed = WebhookService(services.db, Sealer(), deny=["169.254.0.0/16"])
    clock.advance(minutes=1)
    allowed.deliver()
    assert f"127.0.0.1:{receiver.port}" in [r.headers["host"] for r in receiver.requests]
    assert any(r.status == "delivered" for r in deliveries(services))


def test_the_deny_setting_takes_cidrs_separated_by_commas(tmp_path: Any) -> None:
    settings = Settings(data_dir=tmp_path, webhook_deny="169.254.0.0/16, fd00::/8")  # type: ignore[arg-type]
    assert settings.webhook_deny == ["169.254.0.0/16", "fd00::/8"]
    with pytest.raises(ValueError, match="webhook_deny"):
        Settings(data_dir=tmp_path, webhook_deny="not-a-network")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://example.com/hook", "only http:// and https://"),
        ("file:///etc/passwd", "only http:// and https://"),
        ("gopher://127.0.0.1:70/", "only http:// and https://"),
        ("javascript:alert(1)", "only http:// and https://"),
        ("http://", "no host"),
        ("https:///path", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com/a b", "no spaces"),
        ("http://example.com:99999/", "not a URL"),
        ("", "required"),
    ],
)
def test_only_http_targets_with_a_host_are_accepted(services: Services, url: str, why: str) -> None:
    with pytest.raises(ValidationFailed, match=why) as refused:
        services.webhooks.create(ADMIN, "x", url, ["*"], secret=SECRET)
    assert refused.value.field == "url"
    assert services.webhooks.list() == []


def test_create_validates_and_makes_a_secret(services: Services) -> None:
    hook_, secret = services.webhooks.create(ADMIN, "Made", "https://example.com/h", ["device.approved"])
    assert hook_.name == "made" and secret.startswith("whsec_") and len(secret) > 40
    assert services.webhooks.export(include_secrets=True) == [
        ("made", {"url": "https://example.com/h", "events": ["device.approved"], "format": "json", "secret": secret})
    ]
    with pytest.raises(Conflict):
        services.webhooks.create(ADMIN, "made", "https://example.com/h", ["*"])
    for kwargs, field in (
        ({"name": "-bad"}, "name"),
        ({"name": "a" * 64}, "name"),
        ({"event_names": ["device.exploded"]}, "events"),
        ({"event_names": []}, "events"),
        ({"format": "xml"}, "format"),
        ({"secret": "short"}, "secret"),
    ):
        args: dict[str, Any] = {"name": "other", "url": "https://example.com/", "event_names": ["*"], **kwargs}
        with pytest.raises(ValidationFailed) as refused:
            services.webhooks.create(ADMIN, **args)
        assert refused.value.field == field
    with pytest.raises(PermissionDenied):
        services.webhooks.create(Actor.user("ops", UserRole.OPERATOR), "x", "https://example.com/", ["*"])


def test_apply_in_and_export_round_trip(services: Services) -> None:
    w = services.webhooks
    with services.db.write() as s:
        assert w.apply_in(s, ADMIN, "gitops", {"url": "http://10.0.0.5/h", "events": ["*"], "secret": SECRET}) == (
            "created"
        )
    exported = w.export()
    assert exported == [("gitops", {"url": "http://10.0.0.5/h", "events": ["*"], "format": "json"})]
    with services.db.write() as s:
        assert w.apply_in(s, ADMIN, "gitops", exported[0][1]) == "unchanged"  # no secret: the current one stays
        assert w.apply_in(s, ADMIN, "gitops", {**exported[0][1], "secret": SECRET}) == "unchanged"
        assert w.apply_in(s, ADMIN, "gitops", {**exported[0][1], "secret": SECRET + "!"}) == "configured"
        assert w.apply_in(s, ADMIN, "gitops", {**exported[0][1], "format": "slack"}) == "configured"
        for spec, field in (
            ({"url": "http://x/"}, "secret"),
            ({"url": "ftp://x/", "secret": SECRET}, "url"),
            ({"url": "http://x/", "events": ["nope"], "secret": SECRET}, "events"),
            ({"url": "http://x/", "events": ["*"], "secret": SECRET, "colour": "red"}, "colour"),
            ({"url": "http://x/", "events": ["*"], "secret": SECRET, "enabled": "yes"}, "enabled"),
        ):
            with pytest.raises(ValidationFailed) as refused:
                w.apply_in(s, ADMIN, "new-one", {"events": ["*"], **spec})
            assert refused.value.field == field
    assert w.export(include_secrets=True)[0][1]["secret"] == SECRET + "!"
    assert w.get("gitops").revision == 3
    with services.db.write() as s:
        assert w.delete_in(s, ADMIN, "gitops") is True
        assert w.delete_in(s, ADMIN, "gitops") is False
    assert w.list() == []


def test_secrets_are_sealed_at_rest_and_resealed_by_rekey(settings: Settings) -> None:
    from ktizo.pki.sealing import generate_key

    key = generate_key()
    sealed = build_services(settings.model_copy(update={"secret_key": key}))
    try:
        sealed.webhooks.create(ADMIN, "ops", "https://example.com/", ["*"], secret=SECRET)
        stored = sealed.webhooks.get("ops").secret_sealed
        assert stored.startswith("fernet:") and SECRET not in stored
        new = generate_key()
        rotated = build_services(settings.model_copy(update={"secret_key": f"{new},{key}"}))
        try:
            assert rotated.cluster.reseal(ADMIN) >= 1
            assert rotated.webhooks.get("ops").secret_sealed != stored
            only_new = build_services(settings.model_copy(update={"secret_key": new}))
            assert only_new.webhooks.export(include_secrets=True)[0][1]["secret"] == SECRET
            only_new.db.dispose()
        finally:
            rotated.db.dispose()
    finally:
        sealed.db.dispose()


def test_test_sends_a_signed_test_event_now(services: Services, receiver: Receiver) -> None:
    hook(services, receiver.url, "device.approved")
    result = services.webhooks.test("ops")
    assert result.ok and result.status == 200 and result.error is None
    (got,) = receiver.requests
    assert got.headers["x-ktizo-event"] == "webhook.test" and got.delivery == result.delivery_id
    assert verify(SECRET, got.headers["x-ktizo-signature"], got.body)
    assert json.loads(got.body)["event"] == "webhook.test"
    assert deliveries(services) == []  # not queued
    down = services.webhooks.update(ADMIN, "ops", url=f"http://127.0.0.1:{free_port()}/")
    assert down.revision == 2
    failed = services.webhooks.test("ops")
    assert not failed.ok and failed.status is None and "refused" in (failed.error or "").lower()


def test_two_deliverers_racing_send_each_delivery_once(
    settings: Settings, services: Services, receiver: Receiver
) -> None:
    """Two process-like deliverers (each its own services and database engines) over one database."""
    hook(services, receiver.url)
    for _ in range(40):
        services.devices.create(ADMIN, DeviceChanges(mac_address=next_mac()))
    others = [build_services(settings) for _ in range(2)]
    stop = threading.Event()
    failures: list[BaseException] = []

    def work(svc: Services) -> None:
        try:
            while not stop.is_set():
                svc.webhooks.run()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(svc,)) for svc in others]
    for t in threads:
        t.start()
    try:
        receiver.wait_for(40)
        for _ in range(10):  # a few more rounds each: nothing more may arrive
            services.webhooks.run()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for svc in others:
            svc.db.dispose()
    assert not failures, failures
    counts = receiver.by_delivery()
    assert len(counts) == 40 and set(counts.values()) == {1}
    assert {r.status for r in deliveries(services)} == {"delivered"}


def test_a_delivery_claimed_by_a_process_that_died_is_sent_again_after_its_lease_with_the_same_id(
    services: Services, receiver: Receiver, clock: ManualClock
) -> None:
    hook(services, receiver.url, "device.approved")
    approved(services)
    services.webhooks.dispatch()
    # The process claims the delivery and sends it; the receiver has it; the process dies before recording.
    (claimed,) = services.webhooks._claim(10)
    services.webhooks._send_claimed(claimed)
    assert len(receiver.requests) == 1
    (row,) = deliveries(services)
    assert row.status == "pending" and row.attempts == 0 and row.claimed_until == clock.now() + LEASE
    # Another replica (or this one restarted) leaves it alone while the lease holds…
    clock.advance(seconds=LEASE.total_seconds() - 1)
    assert services.webhooks.deliver() == 0 and len(receiver.requests) == 1
    # …and sends it once more when it has run out: the same X-Ktizo-Delivery, for the receiver to deduplicate.
    clock.advance(seconds=2)
    assert services.webhooks.deliver() == 1
    first, second = receiver.requests
    assert first.delivery == second.delivery == claimed.delivery_id and first.body == second.body
    (row,) = deliveries(services)
    assert (row.status, row.attempts) == ("delivered", 1)
    clock.advance(hours=2)
    assert services.webhooks.deliver() == 0 and len(receiver.requests) == 2


def test_a_late_outcome_never_undoes_a_delivered_one(
    services: Services, receiver: Receiver, clock: ManualClock
) -> None:
    from ktizo.services.webhooks import SendResult

    hook(services, receiver.url, "device.approved")
    approved(services)
    services.webhooks.dispatch()
    (stale,) = services.webhooks._claim(10)
    clock.advance(seconds=LEASE.total_seconds() + 1)
    assert services.webhooks.deliver() == 1
    services.webhooks._record(stale, SendResult(stale.delivery_id, False, None, "timed out"))
    (row,) = deliveries(services)
    assert row.status == "delivered" and row.last_error is None


def test_deliver_refuses_to_run_inside_a_transaction(services: Services) -> None:
    from ktizo.services.transactions import transaction

    with transaction(), pytest.raises(RuntimeError, match="outside a transaction"):
        services.webhooks.deliver()
