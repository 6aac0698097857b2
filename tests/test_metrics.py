"""``GET /metrics`` as Prometheus reads it (parsed by prometheus-client's own parser): the numbers move when an
operator approves, a machine downloads, an agent enrolls; latency is labelled by route template, never by a MAC;
off means 404, a token means 401 without it. And the Grafana dashboard asks only for metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from ktizo.services.context import Actor
from ktizo.services.devices import DeviceChanges
from ktizo.services.registry import Services
from ktizo.services.transactions import transaction
from tests.agents.support import body
from tests.support import TALOS_HEADERS, talos_url

DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-dashboard.json"
MAC = "52:54:00:aa:bb:cc"
UUID = "4c4c4544-0042-3510-8051-b4c04f4e3132"


def scrape(client: TestClient, **headers: str) -> tuple[str, list[Sample]]:
    client.app.state.metrics.state.cache_seconds = 0  # type: ignore[attr-defined]  # every scrape reads afresh
    r = client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples = [s for family in text_string_to_metric_families(r.text) for s in family.samples]
    return r.text, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]


def register(client: TestClient, mac: str = MAC) -> None:
    r = client.get(talos_url(mac=mac, uuid=UUID), headers=TALOS_HEADERS)
    assert r.status_code == 403  # pending: registered, refused


def device_id(client: TestClient, ops: dict[str, str], mac: str = MAC) -> int:
    listed = client.get("/api/v1/devices", headers=ops).json()
    return int(next(d["id"] for d in listed if d["mac_address"] == mac))


def test_an_approval_moves_the_counter_and_the_machines_gauge(client: TestClient, ops: dict[str, str]) -> None:
    register(client)
    _, before = scrape(client)
    assert value(before, "ktizo_machines", kind="talos", status="pending") == 1
    assert value(before, "ktizo_machines", kind="talos", status="approved") == 0
    assert value(before, "ktizo_approvals_total", actor_kind="user") == 0

    r = client.post(f"/api/v1/devices/{device_id(client, ops)}/approve", json={"hostname": "node-01"}, headers=ops)
    assert r.status_code == 200, r.text

    _, after = scrape(client)
    assert value(after, "ktizo_approvals_total", actor_kind="user") == 1
    assert value(after, "ktizo_approvals_total", actor_kind="rule") == 0
    assert value(after, "ktizo_machines", kind="talos", status="approved") == 1
    assert value(after, "ktizo_machines", kind="talos", status="pending") == 0

    client.post(f"/api/v1/devices/{device_id(client, ops)}/reject", json={}, headers=ops)
    _, revoked = scrape(client)
    assert value(revoked, "ktizo_rejections_total", actor_kind="user") == 1
    assert value(revoked, "ktizo_machines", kind="talos", status="rejected") == 1


def test_an_approval_that_rolls_back_is_not_counted(client: TestClient, services: Services) -> None:
    register(client)
    device = services.devices.resolve(MAC)

    def failing_request() -> None:
        with transaction():
            services.devices.approve(Actor.cli(), device.id, DeviceChanges())
            raise RuntimeError("the request failed after the approval")

    with pytest.raises(RuntimeError):
        failing_request()
    _, samples = scrape(client)
    assert value(samples, "ktizo_approvals_total", actor_kind="user") == 0
    assert value(samples, "ktizo_machines", kind="talos", status="pending") == 1


def test_a_config_download_is_counted(client: TestClient, ops: dict[str, str], bases: Path) -> None:
    register(client)
    client.post(f"/api/v1/devices/{device_id(client, ops)}/approve", json={}, headers=ops)
    _, before = scrape(client)
    assert value(before, "ktizo_config_downloads_total") == 0
    r = client.get(talos_url(mac=MAC, uuid=UUID), headers=TALOS_HEADERS)
    assert r.status_code == 200
    _, after = scrape(client)
    assert value(after, "ktizo_config_downloads_total") == 1


def test_an_identity_mismatch_is_counted(client: TestClient, ops: dict[str, str], bases: Path) -> None:
    register(client)
    client.post(f"/api/v1/devices/{device_id(client, ops)}/approve", json={}, headers=ops)
    other = "00000000-0000-0000-0000-000000000001"
    assert client.get(talos_url(mac=MAC, uuid=other), headers=TALOS_HEADERS).status_code == 403
    _, samples = scrape(client)
    assert value(samples, "ktizo_identity_mismatches_total") == 1


def test_latency_is_labelled_by_route_template_never_by_mac(client: TestClient, ops: dict[str, str]) -> None:
    register(client)
    status = client.get(f"/api/v1/devices/{MAC}", headers=ops).status_code  # ids are numbers: a MAC is refused
    assert client.get("/no/such/page/52:54:00:aa:bb:cc").status_code == 404
    text, samples = scrape(client)
    name = "ktizo_http_request_duration_seconds_count"
    assert (
        value(samples, name, method="GET", route="/api/v1/devices/{device_id}", status_class=f"{status // 100}xx") == 1
    )
    assert value(samples, name, method="GET", route="/api/v1/config/download", status_class="4xx") == 1
    assert value(samples, name, method="GET", route="unmatched", status_class="4xx") == 1
    buckets = [s for s in samples if s.name == "ktizo_http_request_duration_seconds_bucket"]
    assert {s.labels["le"] for s in buckets} >= {"0.1", "60.0", "+Inf"}
    for needle in (MAC, MAC.replace(":", "-"), MAC.replace(":", ""), "%3A", UUID):
        assert needle not in text


def test_an_agent_enrollment_is_counted_by_result(client: TestClient, services: Services) -> None:
    payload = body()
    assert client.post("/api/v1/enroll", json=payload).status_code == 202
    assert client.post("/api/v1/enroll", json=payload).status_code == 409  # a live enrollment: refused
    _, samples = scrape(client)
    assert value(samples, "ktizo_enrollments_total", result="pending") == 1
    assert value(samples, "ktizo_enrollments_total", result="refused") == 1
    assert value(samples, "ktizo_enrollments_total", result="active") == 0
    assert value(samples, "ktizo_machines", kind="agent", status="pending") == 1

    services.agents.approve(Actor.cli(), payload["machine_id"])
    _, approved = scrape(client)
    assert value(approved, "ktizo_approvals_total", actor_kind="user") == 1
    assert value(approved, "ktizo_machines", kind="agent", status="approved") == 1


def test_a_zero_touch_enrollment_is_active_and_approved_by_its_site(make_client: Any) -> None:
    client, services = make_client(new_devices_per_minute=0)
    services.sites.create(Actor.cli(), "fra1", name="FRA1")
    key = services.sites.rotate_key(Actor.cli(), "fra1")[0]
    request = body()
    request.pop("machine_id")
    request.update(site_code="fra1", enrollment_key=key, machine_uid="ab" * 32)
    assert client.post("/api/enroll", json=request).status_code == 201
    wrong = {**request, "enrollment_key": "x" * len(key), "machine_uid": "cd" * 32}
    assert client.post("/api/enroll", json=wrong).status_code == 401
    _, samples = scrape(client)
    assert value(samples, "ktizo_enrollments_total", result="active") == 1
    assert value(samples, "ktizo_enrollments_total", result="refused") == 1
    assert value(samples, "ktizo_approvals_total", actor_kind="site") == 1


def test_state_gauges_and_their_zeroes(client: TestClient, services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    _, samples = scrape(client)
    assert value(samples, "ktizo_webhook_queue_oldest_seconds") == 0
    assert value(samples, "ktizo_webhook_deliveries", status="pending") == 0
    assert value(samples, "ktizo_gitops_pending_events") == 0
    assert value(samples, "ktizo_gitops_lag_seconds") == 0
    assert value(samples, "ktizo_held_long_polls") == 0
    assert value(samples, "ktizo_database_up") == 1
    assert value(samples, "ktizo_webhook_deliveries_total", outcome="delivered") == 0
    from ktizo import __version__

    assert value(samples, "ktizo_build_info", version=__version__) == 1

    register(client)  # without a GitOps repository, nobody takes GitOps events: no backlog
    monkeypatch.setattr(services.download, "_held", 2)
    _, later = scrape(client)
    assert value(later, "ktizo_gitops_pending_events") == 0
    assert value(later, "ktizo_held_long_polls") == 2


def test_the_gitops_backlog_is_reported_when_a_repository_is_set(make_client: Any, tmp_path: Path) -> None:
    gitops_client, _ = make_client(gitops_repo=tmp_path / "repo")
    register(gitops_client)  # a discovered machine is an event the GitOps writer has not written yet
    _, samples = scrape(gitops_client)
    assert value(samples, "ktizo_gitops_pending_events") == 1
    assert value(samples, "ktizo_gitops_lag_seconds") >= 0


def test_webhook_deliveries_are_counted_by_outcome(client: TestClient, services: Services) -> None:
    from ktizo.services import metrics

    metrics.observe_delivery("delivered", services.db)
    metrics.observe_delivery("retry", services.db)
    metrics.observe_delivery("retry", services.db)
    metrics.observe_delivery("nonsense", services.db)
    _, samples = scrape(client)
    assert value(samples, "ktizo_webhook_deliveries_total", outcome="delivered") == 1
    assert value(samples, "ktizo_webhook_deliveries_total", outcome="retry") == 2
    assert value(samples, "ktizo_webhook_deliveries_total", outcome="other") == 1


def test_the_database_part_is_cached_between_close_scrapes(client: TestClient) -> None:
    client.app.state.metrics.state.cache_seconds = 60  # type: ignore[attr-defined]
    first = client.get("/metrics").text
    register(client)
    assert "ktizo_machines" in first
    cached = [s for f in text_string_to_metric_families(client.get("/metrics").text) for s in f.samples]
    assert value(cached, "ktizo_machines", kind="talos", status="pending") == 0  # the snapshot of the first scrape


def test_metrics_off_is_404(make_client: Any) -> None:
    client, _ = make_client(metrics_enabled=False)
    assert client.get("/metrics").status_code == 404


def test_a_metrics_token_is_required_when_set(make_client: Any) -> None:
    client, _ = make_client(metrics_token="s3cret-scraper")
    r = client.get("/metrics")
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    scrape(client, Authorization="Bearer s3cret-scraper")


def test_metrics_are_not_in_the_api_schema(client: TestClient) -> None:
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_the_grafana_dashboard_asks_only_for_metrics_that_exist(client: TestClient) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["__inputs"][0]["name"] == "DS_PROMETHEUS"
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    exprs += [v["definition"] for v in dashboard["templating"]["list"]]
    client.get("/healthz")  # one request timed, so the histogram has series
    _, samples = scrape(client)
    exposed = {s.name for s in samples}
    asked = {name for e in exprs for name in re.findall(r"\bktizo_[a-z_]+\b", e)}
    assert asked, "the dashboard names no metric"
    assert asked <= exposed, f"the dashboard asks for metrics /metrics does not have: {sorted(asked - exposed)}"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
