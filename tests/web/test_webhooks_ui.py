"""Webhooks in the UI, without a browser: an admin creates one through the form (a refused value comes back next to
its field; a made secret is shown once, in that answer), sends a test, reads the delivery log and deletes it;
operators read (without the target's path), viewers get 403, nobody but an admin changes anything."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from ktizo.services.context import Actor
from ktizo.services.registry import Services
from tests.factories import approved
from tests.web.test_agents_web import sign_in
from tests.webhook_receiver import Receiver, free_port, verify

SECRET = "s3cret-s3cret-s3cret"


@pytest.fixture
def ui(client: TestClient, people: dict[str, str]) -> TestClient:
    return client


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_an_admin_creates_a_webhook_and_sees_its_secret_once(ui: TestClient, receiver: Receiver) -> None:
    csrf = sign_in(ui, "alice")
    page = ui.get("/ui/webhooks").text
    assert 'href="/ui/webhooks" aria-current="page"' in page and "No webhook yet" in page
    form = {
        "csrf": csrf,
        "name": "chat",
        "url": receiver.url,
        "events": "device.approved, cert.issued",
        "format": "json",
    }
    r = ui.post("/ui/webhooks", data={**form, "url": "ftp://x/"})
    assert r.status_code == 422
    assert re.search(r'field-error" id="webhook-url-error">.*only http:// and https://', r.text)
    r = ui.post("/ui/webhooks", data={**form, "events": "device.exploded"})
    assert r.status_code == 422 and "unknown event" in r.text
    r = ui.post("/ui/webhooks", data=form)
    assert r.status_code == 200 and r.headers["cache-control"] == "no-store"
    secret = re.search(r'id="secret-value" class="mono secret" readonly value="(whsec_[^"]+)"', r.text)
    assert secret and "Shown once" in r.text
    assert 'href="/ui/webhooks/chat">chat</a>' in r.text and "cert.issued, device.approved" in r.text
    again = ui.get("/ui/webhooks").text
    assert secret.group(1) not in again and receiver.url in again
    given = ui.post("/ui/webhooks", data={**form, "name": "mine", "secret": SECRET})
    assert SECRET not in given.text and "signs with the secret you gave" in given.text


def test_the_delivery_log_test_send_and_delete(ui: TestClient, services: Services, receiver: Receiver) -> None:
    services.webhooks.create(Actor.system(), "chat", receiver.url, ["device.approved"], secret=SECRET)
    services.webhooks.create(
        Actor.system(), "down", f"http://127.0.0.1:{free_port()}/x", ["device.approved"], secret=SECRET
    )
    approved(services, hostname="node-01")
    services.webhooks.run()
    csrf = sign_in(ui, "alice")
    page = ui.get("/ui/webhooks/chat").text
    (delivery,) = receiver.by_delivery()
    assert delivery in page and "device.approved" in page and "HTTP 200" in page and ">delivered<" in page
    down = ui.get("/ui/webhooks/down").text
    assert ">pending<" in down and "refused" in down.lower() and "in a moment" in down  # the next attempt: 20 s
    assert ui.get("/ui/webhooks/chat?status=failed").text.count('class="delivery-') == 0
    r = ui.post("/ui/webhooks/chat/test", data={"csrf": csrf})
    assert r.status_code == 200 and "the receiver answered HTTP 200" in r.text  # after the redirect
    assert receiver.requests[-1].headers["x-ktizo-event"] == "webhook.test"
    assert verify(SECRET, receiver.requests[-1].headers["x-ktizo-signature"], receiver.requests[-1].body)
    r = ui.post("/ui/webhooks/down/test", data={"csrf": csrf})
    assert "Test to down not delivered" in r.text
    assert ui.post("/ui/webhooks/chat/test", data={}).status_code == 403  # no CSRF token
    r = ui.post("/ui/webhooks/chat/delete", data={"csrf": csrf})
    assert "Deleted webhook chat" in r.text and [h.name for h in services.webhooks.list()] == ["down"]
    assert ui.get("/ui/webhooks/chat").status_code == 404


def test_operators_read_viewers_do_not(ui: TestClient, services: Services) -> None:
    services.webhooks.create(Actor.system(), "chat", "https://hooks.example.com/T000/B000/tok", ["*"], secret=SECRET)
    csrf = sign_in(ui, "oscar")
    page = ui.get("/ui/webhooks").text
    assert "https://hooks.example.com/…" in page and "T000" not in page and "New webhook" not in page
    detail = ui.get("/ui/webhooks/chat").text
    assert "T000" not in detail and "Send a test event" not in detail
    for path in ("/ui/webhooks", "/ui/webhooks/chat/test", "/ui/webhooks/chat/delete"):
        assert ui.post(path, data={"csrf": csrf, "name": "x", "url": "http://x/", "events": "*"}).status_code == 403
    assert services.webhooks.list()[0].name == "chat"
    sign_in(ui, "vera")
    assert 'href="/ui/webhooks"' not in ui.get("/ui/devices").text
    assert ui.get("/ui/webhooks").status_code == 403
    assert ui.get("/ui/webhooks/chat").status_code == 403


def test_what_a_machine_reported_is_shown_as_text(ui: TestClient, services: Services) -> None:
    services.webhooks.create(Actor.system(), "chat", "http://127.0.0.1:9/<script>", ["*"], secret=SECRET)
    sign_in(ui, "alice")
    page = ui.get("/ui/webhooks").text
    assert "<script>" not in page and "&lt;script&gt;" in page
