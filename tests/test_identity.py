"""The domain's normalisers: every common spelling in, one canonical form out, clear errors otherwise."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktizo.domain.devices import DeviceStatus, check_transition
from ktizo.domain.errors import InvalidTransition, ValidationFailed
from ktizo.domain.identity import (
    is_placeholder,
    normalize_hostname,
    normalize_interface_address,
    normalize_mac,
    normalize_uuid,
)


@pytest.mark.parametrize(
    "spelling",
    [
        "aa:bb:cc:dd:ee:f0",
        "AA-BB-CC-DD-EE-F0",
        "aabb.ccdd.eef0",
        "aabbccddeef0",
        "AABBCCDDEEF0",
        "aa%3Abb%3Acc%3Add%3Aee%3Af0",
        " Aa:Bb:cC:dd:EE:f0 ",
    ],
)
def test_every_common_mac_spelling_becomes_one_canonical_form(spelling: str) -> None:
    assert normalize_mac(spelling) == "aa:bb:cc:dd:ee:f0"


@given(st.binary(min_size=6, max_size=6).filter(lambda b: not b[0] & 1 and any(b)))
def test_canonical_mac_round_trips_through_all_spellings(raw: bytes) -> None:
    canonical = ":".join(f"{b:02x}" for b in raw)
    bare = raw.hex()
    for spelling in (
        canonical.upper(),
        canonical.replace(":", "-"),
        bare,
        f"{bare[0:4]}.{bare[4:8]}.{bare[8:12]}",
    ):
        assert normalize_mac(spelling) == canonical


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("01:00:5e:00:00:01", "multicast"),
        ("ff:ff:ff:ff:ff:ff", "multicast"),
        ("aa:bb:cc:dd:ee", "not a MAC"),
        ("aa:bb-cc:dd:ee:ff", "not a MAC"),
        ("gg:bb:cc:dd:ee:ff", "not a MAC"),
        ("", "not a MAC"),
        ("00:00:00:00:00:00", "not a usable"),
    ],
)
def test_bad_macs_are_refused_with_the_reason(value: str, why: str) -> None:
    with pytest.raises(ValidationFailed, match=why) as info:
        normalize_mac(value)
    assert info.value.field == "mac_address"


@pytest.mark.parametrize("value", ["${mac}", "%24%7Bmac%7D", "", "  ", None, "${uuid}"])
def test_unexpanded_talos_variables_mean_unknown(value: str | None) -> None:
    assert is_placeholder(value)


def test_uuid_is_lower_case_dashed() -> None:
    assert normalize_uuid("4C4C4544-0042-3510-8051-B4C04F4E3132") == "4c4c4544-0042-3510-8051-b4c04f4e3132"
    assert normalize_uuid("4c4c4544004235108051b4c04f4e3132") == "4c4c4544-0042-3510-8051-b4c04f4e3132"
    with pytest.raises(ValidationFailed):
        normalize_uuid("not-a-uuid")


@pytest.mark.parametrize("name", ["node-01", "Node-01.Rack3.example.com", "a", "x" * 63])
def test_rfc1123_hostnames_are_accepted_in_lower_case(name: str) -> None:
    assert normalize_hostname(name) == name.lower()


@pytest.mark.parametrize(
    "name",
    ["-node", "node-", "no_de", "node 1", "x" * 64, "a..b", "<script>", "node;reboot", "10.0.0.1", "ümlaut"],
)
def test_non_rfc1123_hostnames_are_refused(name: str) -> None:
    with pytest.raises(ValidationFailed) as info:
        normalize_hostname(name)
    assert info.value.field == "hostname"


def test_static_addresses_need_a_prefix_and_a_host_part() -> None:
    assert normalize_interface_address("10.0.5.100/24") == "10.0.5.100/24"
    assert normalize_interface_address("2001:db8::10/64") == "2001:db8::10/64"
    for bad, why in [
        ("10.0.5.100", "no prefix"),
        ("10.0.5.0/24", "network address"),
        ("10.0.5.255/24", "broadcast"),
        ("10.0.5.300/24", "not an IP"),
        ("224.0.0.1/4", "cannot be"),
        ("127.0.0.1/8", "cannot be"),
        ("10.0.0.1/0", "/0"),
    ]:
        with pytest.raises(ValidationFailed, match=why):
            normalize_interface_address(bad)


def test_state_machine_allows_exactly_the_seed_transitions() -> None:
    allowed = {
        ("pending", "approved"),
        ("pending", "rejected"),
        ("rejected", "approved"),
        ("approved", "rejected"),
    }
    for a in DeviceStatus:
        for b in DeviceStatus:
            if (a.value, b.value) in allowed:
                check_transition(a, b)
            else:
                with pytest.raises(InvalidTransition):
                    check_transition(a, b)
