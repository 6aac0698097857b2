"""Talos version strings: what an operator may type, and what Ktizo refuses."""

from __future__ import annotations

import pytest

from ktizo.domain.errors import ValidationFailed
from ktizo.talos import DEFAULT_TALOS_VERSION, SUPPORTED_TALOS_VERSIONS, TalosVersion, parse_talos_version


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("v1.13", TalosVersion(1, 13)),
        ("1.13", TalosVersion(1, 13)),
        ("v1.13.9", TalosVersion(1, 13)),
        ("1.12.0", TalosVersion(1, 12)),
        ("v1.11", TalosVersion(1, 11)),
        (" v1.12.3 ", TalosVersion(1, 12)),
    ],
)
def test_accepted_spellings(text: str, expected: TalosVersion) -> None:
    assert parse_talos_version(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "1.10",
        "v1.14",
        "1.14.0",
        "v2.0",
        "",
        "latest",
        "v1",
        "1",
        "v1.13.9.1",
        "v1.13-beta.1",
        "v01.13",
        "1.x",
    ],
)
def test_refused_versions_name_the_supported_ones(text: str) -> None:
    with pytest.raises(ValidationFailed) as exc:
        parse_talos_version(text)
    assert exc.value.field == "talos_version"
    assert "v1.11, v1.12, v1.13" in exc.value.message


def test_unsupported_minor_is_called_unsupported_not_malformed() -> None:
    with pytest.raises(ValidationFailed, match=r"Talos v1\.10 is not supported"):
        parse_talos_version("v1.10.7")


def test_version_prints_like_talos_writes_it() -> None:
    assert str(TalosVersion(1, 13)) == "v1.13"
    assert f"{TalosVersion(1, 11)}" == "v1.11"


def test_multidoc_networking_starts_at_1_12() -> None:
    assert [v.multidoc_network for v in SUPPORTED_TALOS_VERSIONS] == [False, True, True]


def test_supported_and_default() -> None:
    assert [str(v) for v in SUPPORTED_TALOS_VERSIONS] == ["v1.11", "v1.12", "v1.13"]
    assert str(DEFAULT_TALOS_VERSION) == "v1.13"
    assert sorted(SUPPORTED_TALOS_VERSIONS) == list(SUPPORTED_TALOS_VERSIONS)
