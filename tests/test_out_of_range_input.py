"""Numbers and times from outside that the database cannot hold: an id no row can have is "not found" (404), a time
that has no UTC equivalent is refused as input (422), never a 500.

SQLite refuses integers beyond 64 bits (OverflowError), PostgreSQL's INTEGER id columns anything beyond 32 bits,
and ``datetime.astimezone`` overflows for 0001-01-01T00:00+05:00 or 9999-12-31T23:59-05:00."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import BigInteger, Integer, inspect
from typer.testing import CliRunner

from ktizo.cli import app as cli_app
from ktizo.db.models import Base
from ktizo.domain.bounds import MAX_ID, as_utc, is_possible_id, parse_id
from ktizo.domain.errors import NotFound, ValidationFailed
from ktizo.domain.users import UserRole
from ktizo.services.audit import AuditQuery
from ktizo.services.context import Actor
from ktizo.services.registry import Services
from ktizo.settings import Settings
from ktizo.web.session import SESSION_COOKIE, csrf_token

ROOT = Actor.user("root", UserRole.ADMIN, "10.0.0.9")
# Just past PostgreSQL's INTEGER, just past SQLite's 64-bit INTEGER, and the security review's example.
IMPOSSIBLE_IDS = [MAX_ID + 1, 2**63, 10**20 - 1]
TOO_EARLY = "0001-01-01T00:00:00+05:00"  # before the year 1 in UTC
TOO_LATE = "9999-12-31T23:59:59-05:00"  # after 9999 in UTC
OUT_OF_RANGE = "that time is out of range: in UTC it falls before 0001-01-01 or after 9999-12-31"


def sign_in(client: TestClient, token: str) -> dict[str, str]:
    """Sign ``client`` into the UI with ``token``; returns the form fields a POST needs (the CSRF token)."""
    client.cookies.set(SESSION_COOKIE, token, path="/ui")
    return {"csrf": csrf_token(token)}


@pytest.fixture
def ui(client: TestClient, admin_token: str) -> tuple[TestClient, dict[str, str]]:
    return client, sign_in(client, admin_token)


def error_page(html: str) -> tuple[str, str]:
    """(title, message) of the UI's error page."""
    found = re.search(r"<h1>.*?</svg>\s*(.*?)</h1>\s*<p>(.*?)</p>", html, re.S)
    assert found, html
    return found.group(1).strip(), found.group(2).strip()


def field_error(html: str, field_id: str) -> str:
    found = re.search(rf'<p class="field-error" id="{field_id}-error">.*?</svg>\s*(.*?)</p>', html, re.S)
    assert found, html
    return found.group(1).strip()


# -- the UI's device pages ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device_id", IMPOSSIBLE_IDS)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [("get", ""), ("get", "/row"), ("post", "/approve"), ("post", "/reject"), ("post", "/edit"), ("post", "/unbind")],
)
def test_a_device_id_no_row_can_have_is_a_not_found_page(
    ui: tuple[TestClient, dict[str, str]], method: str, suffix: str, device_id: int
) -> None:
    client, csrf = ui
    kwargs: dict[str, Any] = {"data": csrf} if method == "post" else {}
    r = getattr(client, method)(f"/ui/devices/{device_id}{suffix}", **kwargs)
    assert r.status_code == 404
    assert error_page(r.text) == ("Not found", f"no device with id {device_id}")


def test_htmx_gets_the_not_found_message_as_text(ui: tuple[TestClient, dict[str, str]]) -> None:
    client, csrf = ui
    htmx = {"HX-Request": "true"}
    r = client.get("/ui/devices/99999999999999999999/row?editor=1", headers=htmx)
    assert (r.status_code, r.text) == (404, "no device with id 99999999999999999999")
    r = client.post("/ui/devices/99999999999999999999/approve", data={**csrf, "hostname": "w1"}, headers=htmx)
    assert (r.status_code, r.text) == (404, "no device with id 99999999999999999999")


def test_deleting_an_impossible_device_id_goes_back_to_the_list_like_any_missing_device(
    ui: tuple[TestClient, dict[str, str]],
) -> None:
    client, csrf = ui
    r = client.post("/ui/devices/99999999999999999999/delete", data=csrf, follow_redirects=False)
    assert (r.status_code, r.headers["location"]) == (303, "/ui/devices")


def test_any_signed_in_user_gets_the_404(client: TestClient, viewer_token: str) -> None:
    sign_in(client, viewer_token)
    r = client.get("/ui/devices/99999999999999999999")
    assert r.status_code == 404
    assert error_page(r.text) == ("Not found", "no device with id 99999999999999999999")


def test_the_largest_possible_id_is_queried_and_simply_missing(ui: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = ui
    r = client.get(f"/ui/devices/{MAX_ID}")
    assert r.status_code == 404
    assert error_page(r.text) == ("Not found", f"no device with id {MAX_ID}")


def test_an_absurdly_long_number_in_a_ui_path_is_a_404_even_before_sign_in(
    client: TestClient, services: Services
) -> None:
    # Starlette's {id:int} would call int() on it while routing (over 4300 digits: ValueError), for anyone.
    for digits in ("9" * 101, "9" * 5000):
        for path in (f"/ui/devices/{digits}", f"/ui/devices/{digits}/row", f"/ui/tokens/{digits}/revoke"):
            r = client.request("POST" if path.endswith("revoke") else "GET", path)
            # A plain 404 page in the UI's look: no route matched, nothing was parsed.
            assert r.status_code == 404 and "There is no such page" in r.text, path
            assert r.headers["content-type"].startswith("text/html")


def test_leading_zeros_still_name_the_device(ui: tuple[TestClient, dict[str, str]], services: Services) -> None:
    client, _ = ui
    device, _ = services.devices.register("52:54:00:00:00:01", "10.0.0.1")
    r = client.get(f"/ui/devices/{'0' * 99}{device.id}")  # 100 digits: the most a UI path takes
    assert r.status_code == 200 and "52:54:00:00:00:01" in r.text


# -- the UI's Users page ------------------------------------------------------------------------------------


@pytest.mark.parametrize("token_id", IMPOSSIBLE_IDS)
def test_revoking_a_token_id_no_row_can_have_is_not_found(ui: tuple[TestClient, dict[str, str]], token_id: int) -> None:
    client, csrf = ui
    r = client.post(f"/ui/tokens/{token_id}/revoke", data=csrf)
    assert r.status_code == 404
    assert error_page(r.text) == ("Not found", f"no token with id {token_id}")


# -- the UI's audit log ------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["99999999999999999999", str(MAX_ID + 1), str(2**63)])
def test_audit_filter_by_an_impossible_device_id_says_there_is_no_such_device(
    ui: tuple[TestClient, dict[str, str]], device: str
) -> None:
    client, _ = ui
    r = client.get("/ui/audit", params={"device": device})
    assert r.status_code == 422
    assert field_error(r.text, "f-device") == f"no device with id {device}"
    assert "No events match these filters" in r.text


@pytest.mark.parametrize(("name", "value"), [("since", TOO_LATE), ("until", TOO_EARLY), ("since", TOO_EARLY)])
def test_audit_filter_by_a_time_utc_cannot_hold_is_a_form_error(
    ui: tuple[TestClient, dict[str, str]], name: str, value: str
) -> None:
    client, _ = ui
    r = client.get("/ui/audit", params={name: value})
    assert r.status_code == 422
    assert field_error(r.text, f"f-{name}") == OUT_OF_RANGE
    assert f'value="{value}"' in r.text  # what was typed stays in the field


def test_audit_filter_by_the_extreme_times_utc_can_hold_works(ui: tuple[TestClient, dict[str, str]]) -> None:
    client, _ = ui
    r = client.get("/ui/audit", params={"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59Z"})
    assert r.status_code == 200 and "field-error" not in r.text


# -- the device list's poller ---------------------------------------------------------------------------------


def poll_since(html: str) -> dt.datetime:
    found = re.search(r'id="poll-since" name="since" value="([^"]+)"', html)
    assert found, html
    return dt.datetime.fromisoformat(found.group(1))


@pytest.mark.parametrize("since", [TOO_EARLY, TOO_LATE])
def test_a_poll_watermark_utc_cannot_hold_starts_again_from_now(
    ui: tuple[TestClient, dict[str, str]], services: Services, since: str
) -> None:
    client, _ = ui
    services.devices.register("52:54:00:00:00:01", "10.0.0.1")
    before = dt.datetime.now(dt.UTC)
    r = client.get("/ui/devices/poll", params={"since": since}, headers={"HX-Request": "true"})
    # Like a mangled watermark: nothing is taken for new, and the next poll carries a sane one.
    assert r.status_code == 200
    assert "52:54:00:00:00:01" not in r.text
    assert poll_since(r.text) >= before - dt.timedelta(seconds=1)


def test_the_earliest_watermark_utc_can_hold_still_finds_new_devices(
    ui: tuple[TestClient, dict[str, str]], services: Services
) -> None:
    client, _ = ui
    device, _ = services.devices.register("52:54:00:00:00:01", "10.0.0.1")
    r = client.get("/ui/devices/poll", params={"since": "0001-01-01T00:00:00Z"}, headers={"HX-Request": "true"})
    assert r.status_code == 200 and "52:54:00:00:00:01" in r.text
    assert poll_since(r.text) == device.first_seen


# -- the API ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ref", ["99999999999999999999", str(MAX_ID + 1), str(2**63), "9" * 63])
def test_api_group_by_an_impossible_id_is_404(client: TestClient, admin: dict[str, str], ref: str) -> None:
    expected = (404, {"detail": f"no device group {ref}"})
    r = client.get(f"/api/v1/groups/{ref}", headers=admin)
    assert (r.status_code, r.json()) == expected
    r = client.put(f"/api/v1/groups/{ref}", headers=admin, json={"description": "x"})
    assert (r.status_code, r.json()) == expected
    r = client.post(f"/api/v1/groups/{ref}/members", headers=admin, json={"add": [1]})
    assert (r.status_code, r.json()) == expected
    r = client.delete(f"/api/v1/groups/{ref}", headers=admin)
    assert (r.status_code, r.json()) == expected


def test_api_group_by_the_largest_possible_id_is_queried_and_missing(client: TestClient, admin: dict[str, str]) -> None:
    r = client.get(f"/api/v1/groups/{MAX_ID}", headers=admin)
    assert (r.status_code, r.json()) == (404, {"detail": f"no device group {MAX_ID}"})


def test_api_group_members_beyond_the_id_range_are_refused_as_input(client: TestClient, admin: dict[str, str]) -> None:
    assert client.post("/api/v1/groups", headers=admin, json={"name": "rack1"}).status_code == 201
    r = client.post("/api/v1/groups/rack1/members", headers=admin, json={"add": [MAX_ID + 1]})
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["body", "add", 0]
    assert r.json()["detail"][0]["msg"] == f"Input should be less than or equal to {MAX_ID}"


@pytest.mark.parametrize(("name", "value"), [("since", TOO_LATE), ("until", TOO_EARLY)])
def test_api_audit_time_utc_cannot_hold_is_422_at_that_parameter(
    client: TestClient, admin: dict[str, str], name: str, value: str
) -> None:
    r = client.get("/api/v1/audit", headers=admin, params={name: value})
    assert r.status_code == 422
    [error] = r.json()["detail"]
    assert error["loc"] == ["query", name]
    assert error["msg"] == f"Value error, {OUT_OF_RANGE}"


def test_api_audit_extreme_times_utc_can_hold_work(client: TestClient, admin: dict[str, str]) -> None:
    params = {"since": "0001-01-01T00:00:00Z", "until": "9999-12-31T23:59:59.999999Z"}
    r = client.get("/api/v1/audit", headers=admin, params=params)
    assert r.status_code == 200 and r.json()["total"] >= 1  # the token's creation, at least


def test_api_device_and_audit_ids_keep_their_documented_range(client: TestClient, admin: dict[str, str]) -> None:
    # The schema says maximum 2**31-1 for these; beyond it is a 422 from validation, within it a plain miss.
    for path in (f"/api/v1/devices/{MAX_ID + 1}", f"/api/v1/audit?device_id={MAX_ID + 1}"):
        r = client.get(path, headers=admin)
        assert r.status_code == 422
        assert r.json()["detail"][0]["msg"] == f"Input should be less than or equal to {MAX_ID}"
    r = client.get(f"/api/v1/devices/{MAX_ID}", headers=admin)
    assert (r.status_code, r.json()) == (404, {"detail": f"no device with id {MAX_ID}"})
    r = client.get("/api/v1/audit", headers=admin, params={"device_id": MAX_ID})
    assert (r.status_code, r.json()["total"]) == (200, 0)


# -- the services, which the API, the UI and the CLI all go through --------------------------------------------


@pytest.mark.parametrize("device_id", [0, -1, *IMPOSSIBLE_IDS])
def test_services_treat_an_impossible_id_as_missing(services: Services, device_id: int) -> None:
    with pytest.raises(NotFound, match=r"^no device with id"):
        services.devices.get(device_id)
    with pytest.raises(NotFound, match=r"^no device with id"):
        services.devices.unbind(ROOT, device_id)
    with pytest.raises(NotFound, match=r"^no device group"):
        services.groups.get(device_id)
    with pytest.raises(NotFound, match=r"^no token with id"):
        services.users.revoke_token_id(ROOT, device_id)
    assert services.audit.list(AuditQuery(device_id=device_id)) == ([], 0)


@pytest.mark.parametrize("ref", ["99999999999999999999", str(MAX_ID + 1), "9" * 5000, "0" * 5000])
def test_services_resolve_an_impossible_id_reference_as_missing(services: Services, ref: str) -> None:
    with pytest.raises(NotFound) as caught:
        services.devices.resolve(ref)
    assert caught.value.message == f"no device with id {ref}"
    with pytest.raises(NotFound) as caught:
        services.groups.get(ref)
    assert caught.value.message == f"no device group {ref}"


def test_group_members_beyond_the_id_range_are_missing_devices(services: Services) -> None:
    services.groups.create(ROOT, {"name": "rack1"})
    device, _ = services.devices.register("52:54:00:00:00:01", "10.0.0.1")
    with pytest.raises(NotFound) as caught:
        services.groups.set_members(ROOT, "rack1", [device.id, 2**63], [])
    assert caught.value.message == f"no device with id {2**63}"
    assert services.groups.get("rack1")[1] == []  # nothing half-done


@pytest.mark.parametrize(("name", "value"), [("since", TOO_EARLY), ("until", TOO_LATE)])
def test_audit_service_refuses_a_time_utc_cannot_hold(services: Services, name: str, value: str) -> None:
    with pytest.raises(ValidationFailed) as caught:
        services.audit.list(AuditQuery(**{name: dt.datetime.fromisoformat(value)}))
    assert caught.value.field == name


# -- the CLI ---------------------------------------------------------------------------------------------


@pytest.fixture
def cli(settings: Settings, services: Services) -> Callable[..., Any]:
    runner = CliRunner()
    env = {"KTIZO_DATA_DIR": str(settings.data_dir), "KTIZO_DATABASE_URL": settings.effective_database_url}
    return lambda *args: runner.invoke(cli_app, list(args), env=env)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("devices", "show", "99999999999999999999"), "no device with id 99999999999999999999"),
        (("devices", "unbind", str(MAX_ID + 1)), f"no device with id {MAX_ID + 1}"),
        (("audit", "list", "--device", "99999999999999999999"), "no device with id 99999999999999999999"),
        (("groups", "delete", "99999999999999999999"), "no device group 99999999999999999999"),
        (("groups", "members", "99999999999999999999"), "no device group 99999999999999999999"),
    ],
)
def test_cli_reports_an_impossible_id_as_not_found(
    cli: Callable[..., Any], args: tuple[str, ...], message: str
) -> None:
    result = cli(*args)
    assert result.exit_code == 1, result.output
    assert result.output.strip() == f"error: {message}"


# -- the bounds themselves -----------------------------------------------------------------------------------


def test_max_id_is_the_range_of_the_id_columns_in_the_migrated_schema(services: Services) -> None:
    # If an id column ever becomes BIGINT, MAX_ID (domain/bounds.py) must follow it.
    schema = inspect(services.db.read_engine)
    checked = 0
    for table in Base.metadata.tables.values():
        reflected = {c["name"]: c["type"] for c in schema.get_columns(table.name)}
        for column in table.columns:
            if isinstance(column.type, Integer) and (column.primary_key or column.foreign_keys):
                for kind in (column.type, reflected[column.name]):
                    assert isinstance(kind, Integer) and not isinstance(kind, BigInteger), (table.name, column.name)
                checked += 1
    assert checked >= 10  # devices, users, tokens, audit events, groups and their members, codes, …
    assert MAX_ID == 2**31 - 1


def test_parse_id() -> None:
    assert parse_id("1") == 1
    assert parse_id("007") == 7
    assert parse_id(str(MAX_ID)) == MAX_ID
    assert parse_id("0" * 5000 + "42") == 42
    for text in ("0", str(MAX_ID + 1), "9" * 5000, "", "-1", "+1", " 1", "1.0", "١٢", "²"):
        assert parse_id(text) is None, text
    assert is_possible_id(1) and is_possible_id(MAX_ID)
    assert not is_possible_id(0) and not is_possible_id(MAX_ID + 1) and not is_possible_id(-1)


def test_as_utc() -> None:
    plus5 = dt.timezone(dt.timedelta(hours=5))
    assert as_utc(dt.datetime(2026, 1, 1, 12), "t") == dt.datetime(2026, 1, 1, 12, tzinfo=dt.UTC)
    assert as_utc(dt.datetime(2026, 1, 1, 12, tzinfo=plus5), "t") == dt.datetime(2026, 1, 1, 7, tzinfo=dt.UTC)
    assert as_utc(dt.datetime(1, 1, 1, 5, tzinfo=plus5), "t") == dt.datetime.min.replace(tzinfo=dt.UTC)
    for value in (TOO_EARLY, TOO_LATE):
        with pytest.raises(ValidationFailed) as caught:
            as_utc(dt.datetime.fromisoformat(value), "since")
        assert caught.value.field == "since"
        assert caught.value.message == OUT_OF_RANGE
