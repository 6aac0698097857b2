"""Loading and dumping Talos YAML: what is refused, and that what Ktizo writes reads back as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ktizo.domain.errors import ValidationFailed
from ktizo.talos import dump_documents, load_documents

FIXTURES = Path(__file__).parent.parent / "fixtures" / "talos"

BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""

# Strings built from the pieces YAML treats specially, so quoting and block styles get exercised.
_TRICKY = st.lists(
    st.sampled_from(
        [
            "off",
            "On",
            "yes",
            "NO",
            "null",
            "~",
            "true",
            "0o17",
            "0x1f",
            "1e3",
            "12:30",
            "2024-01-01",
            "=",
            "<<",
            "---",
            "...",
            "-",
            ":",
            "#",
            "'",
            '"',
            "[",
            "{",
            "&",
            "*",
            "!",
            "|",
            ">",
            "%",
            "@",
            "`",
            "\\",
            " ",
            "\t",
            "\n",
            "\r",
            "\x85",
            "\u2028",
            "\ufeff",
            "é",
            "0",
            "1",
            ".",
            "_",
            "+",
        ]
    ),
    max_size=8,
).map("".join)
_TEXT = st.text() | _TRICKY
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | _TEXT
_JSON_LIKE = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_TEXT, children, max_size=4),
    max_leaves=25,
)
_DOCUMENTS = st.lists(st.dictionaries(_TEXT, _JSON_LIKE, max_size=5), min_size=1, max_size=3)


def _refusal(data: str | bytes, **kwargs: Any) -> ValidationFailed:
    with pytest.raises(ValidationFailed) as exc:
        load_documents(data, **kwargs)
    return exc.value


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_DOCUMENTS)
def test_dump_then_load_gives_back_the_same_documents(docs: list[dict[str, Any]]) -> None:
    assert load_documents(dump_documents(docs)) == docs


@pytest.mark.parametrize("name", ["controlplane.yaml", "worker.yaml"])
def test_talos_examples_load_and_survive_a_round_trip(name: str) -> None:
    docs = load_documents((FIXTURES / name).read_bytes())
    assert [doc.get("kind") for doc in docs] == [None, "HostnameConfig"]
    assert docs[0]["persist"] is True
    assert docs[0]["machine"]["type"] == name.removesuffix(".yaml")
    assert docs[1]["auto"] == "stable"
    assert load_documents(dump_documents(docs)) == docs


def test_billion_laughs_is_refused_before_expansion() -> None:
    error = _refusal(BILLION_LAUGHS)
    assert "anchor 'a'" in error.message
    assert "line 1" in error.message


def test_a_plain_alias_is_refused() -> None:
    error = _refusal("machine:\n  type: worker\n  certSANs: &sans [a]\nother: *sans\n")
    assert "anchor 'sans'" in error.message
    assert "line 3" in error.message


def test_an_alias_without_anchor_is_refused_as_alias() -> None:
    assert "alias 'x'" in _refusal("a: *x\n").message


def test_an_unused_anchor_is_refused_too() -> None:
    assert "anchor 'k'" in _refusal("a: &k 1\n").message


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("- a\n- b\n", "document 1 is a list"),
        ("just a string\n", "document 1 is a str"),
        ("42\n", "document 1 is a int"),
        ("a: 1\n---\n[1, 2]\n", "document 2 is a list"),
    ],
)
def test_documents_must_be_mappings(text: str, what: str) -> None:
    error = _refusal(text)
    assert what in error.message
    assert "mapping" in error.message


def test_oversize_input_is_refused() -> None:
    text = "a: " + "x" * 2000 + "\n"
    assert "larger than 1000 bytes" in _refusal(text, max_bytes=1000).message
    assert "larger than 1000 bytes" in _refusal(text.encode(), max_bytes=1000).message
    assert load_documents(text, max_bytes=len(text)) == [{"a": "x" * 2000}]


def test_size_limit_counts_bytes_not_characters() -> None:
    text = "a: " + "é" * 600 + "\n"  # 606 characters, 1206 bytes
    assert "larger than" in _refusal(text, max_bytes=1000).message


def test_default_limit_is_one_mebibyte() -> None:
    text = "a: " + "x" * (1_048_576 - 3)
    assert len(load_documents(text)[0]["a"]) == 1_048_573
    assert "larger than 1048576 bytes" in _refusal(text + "x").message


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("a: 1\nb: 2\n  c: 3\n", "line 3, column 4"),
        ("machine:\n  type: worker\n  install: {disk: /dev/sda\n", "line 4, column 1"),
        ('a: "unterminated\n', "line 2"),
    ],
)
def test_invalid_yaml_says_where(text: str, where: str) -> None:
    error = _refusal(text)
    assert error.message.startswith("invalid YAML")
    assert where in error.message


def test_duplicate_keys_are_refused_like_talos_does() -> None:
    error = _refusal("machine:\n  type: worker\n  type: controlplane\n")
    assert "duplicate key 'type'" in error.message
    assert "line 3" in error.message


def test_non_string_keys_are_refused() -> None:
    assert "not a string" in _refusal("on: 1\n").message
    assert "not a string" in _refusal("nodeLabels:\n  1: a\n").message


def test_empty_documents_are_skipped() -> None:
    assert load_documents("---\na: 1\n---\n---\n# nothing\n---\nb: 2\n") == [{"a": 1}, {"b": 2}]


@pytest.mark.parametrize("text", ["", "\n", "# just a comment\n", "---\n", "---\n...\n---\n"])
def test_no_document_at_all_is_refused(text: str) -> None:
    assert "no YAML document" in _refusal(text).message


def test_deep_nesting_is_refused() -> None:
    assert "nested more than" in _refusal("a: " + "[" * 100_000).message


def test_bytes_must_be_utf8() -> None:
    assert "not UTF-8" in _refusal(b"a: \xff\xfe\n").message


def test_python_tags_are_refused() -> None:
    assert "invalid YAML" in _refusal("a: !!python/object/apply:os.system [id]\n").message


def test_scalars_read_as_talos_reads_them() -> None:
    [doc] = load_documents("a: 2024-01-01\nb: 12:30\nc: 0o644\nd: =\ne: 0x10\nf: yes\n")
    # Go YAML has no date or base-60 numbers; Talos writes file permissions as 0o644.
    assert doc == {"a": "2024-01-01", "b": "12:30", "c": 0o644, "d": "=", "e": 16, "f": True}


def test_dump_never_writes_anchors_for_shared_objects() -> None:
    shared = {"sans": ["a", "b"]}
    text = dump_documents([{"x": shared, "y": shared, "z": [shared, shared]}])
    assert "&" not in text
    assert "*" not in text
    assert load_documents(text) == [{"x": shared, "y": shared, "z": [shared, shared]}]


@pytest.mark.parametrize("word", ["off", "on", "yes", "no", "Off", "null", "~", "true", "0o17", "1e3", "12:30"])
def test_dump_quotes_strings_yaml_could_read_as_something_else(word: str) -> None:
    text = dump_documents([{"value": word}])
    assert text in (f"value: '{word}'\n", f'value: "{word}"\n')
    assert yaml.safe_load(text) == {"value": word}


def test_dump_does_not_fold_long_lines() -> None:
    blob = "TFMwdExTMUNSVWRKVGlCRFJWSlVTVVpKUTBGVVJTMHRMUzB0Q2sxSlNVSlFha0" * 200  # a PEM in base64
    text = dump_documents([{"machine": {"ca": {"crt": blob, "note": "words " * 300}}}])
    assert f"crt: {blob}\n" in text
    assert len(text.splitlines()) == 4


def test_dump_separates_documents_with_dashes_and_keeps_key_order() -> None:
    text = dump_documents([{"version": "v1alpha1", "debug": False}, {"apiVersion": "v1alpha1", "kind": "X"}])
    assert text == "version: v1alpha1\ndebug: false\n---\napiVersion: v1alpha1\nkind: X\n"


def test_multiline_strings_are_written_as_blocks() -> None:
    manifest = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: x\n"
    text = dump_documents([{"contents": manifest}])
    assert text.startswith("contents: |\n")
    assert load_documents(text) == [{"contents": manifest}]
