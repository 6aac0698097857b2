"""Reading and writing Talos config YAML: strict, alias-free loading and unambiguous dumping.

Talos reads configs with Go YAML in strict mode. The loader here refuses what Talos refuses (duplicate keys)
and what would hurt Ktizo (aliases, deep nesting), and reads scalars the way Talos would where the two
YAML dialects differ on common config values. The dumper quotes every string that either dialect could read
as something else, so what Ktizo writes is read back as written, by Talos and by Ktizo.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

from ktizo.domain.errors import ValidationFailed

try:
    from yaml import CSafeDumper as _BaseDumper
    from yaml import CSafeLoader as _BaseLoader
except ImportError:  # pragma: no cover - only where PyYAML was built without libyaml
    from yaml import SafeDumper as _BaseDumper  # type: ignore[assignment]
    from yaml import SafeLoader as _BaseLoader  # type: ignore[assignment]

DEFAULT_MAX_BYTES = 1_048_576

# Talos configs nest about ten levels; the limit stops "[[[[..." inputs long before the recursive
# composer could exhaust the stack.
MAX_DEPTH = 100

_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_TIMESTAMP = "tag:yaml.org,2002:timestamp"
_VALUE = "tag:yaml.org,2002:value"
_MERGE = "tag:yaml.org,2002:merge"

# YAML 1.1 integers minus base 60 ("12:30" is a string to Go YAML), plus the 1.2 "0o644" octal form
# that Talos itself writes for machine.files[].permissions.
_LOADER_INT = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0o[0-7_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_LOADER_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)

# Forms that YAML 1.2 (Go) reads as numbers but PyYAML's 1.1 rules do not: the dumper must quote such
# strings, or a value in a free-form field (pods, extraConfig) would reach Talos as a number.
_DUMPER_EXTRA_INT = re.compile(r"^[-+]?0o[0-7_]+$")
_DUMPER_EXTRA_FLOAT = re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?$")


class _Loader(_BaseLoader):
    """Safe loader that refuses non-string and duplicate keys, as Talos's strict decoder does."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _value_node in node.value:
            if key_node.tag == _MERGE:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, str):
                # Keys such as `on:` or `1:` are booleans or numbers to YAML 1.1; Talos has none of those.
                raise ConstructorError(
                    None, None, f"mapping key {key!r} is not a string (quote it)", key_node.start_mark
                )
            if key in seen:
                raise ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _loader_resolvers() -> dict[Any, list[tuple[str, re.Pattern[str]]]]:
    # Dates stay strings (Talos has no timestamp fields, and jsonschema cannot validate date objects);
    # "=" stays a string (SafeLoader has no constructor for the 1.1 "value" tag and would fail).
    replaced = {_INT: _LOADER_INT, _FLOAT: _LOADER_FLOAT}
    resolvers: dict[Any, list[tuple[str, re.Pattern[str]]]] = {}
    for first, entries in yaml.resolver.Resolver.yaml_implicit_resolvers.items():
        kept = [(tag, replaced.get(tag, rx)) for tag, rx in entries if tag not in (_TIMESTAMP, _VALUE)]
        if kept:
            resolvers[first] = kept
    return resolvers


_Loader.yaml_implicit_resolvers = _loader_resolvers()


class _Dumper(_BaseDumper):
    """Safe dumper that writes every repeated object in full: Talos gets no anchors or aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_str(dumper: yaml.representer.SafeRepresenter, value: str) -> yaml.ScalarNode:
    # Inline manifests and audit policies are multi-line; a literal block keeps them readable. The emitter
    # falls back to a quoted style by itself when a string cannot be a block (trailing spaces, \r ...).
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)
_Dumper.add_implicit_resolver(_INT, _DUMPER_EXTRA_INT, list("-+0"))
_Dumper.add_implicit_resolver(_FLOAT, _DUMPER_EXTRA_FLOAT, list("-+.0123456789"))


def _where(mark: Any) -> str:
    if mark is None:
        return ""
    return f" at line {mark.line + 1}, column {mark.column + 1}"


def _to_text(data: str | bytes, max_bytes: int) -> str:
    too_big = f"config is larger than {max_bytes} bytes"
    if isinstance(data, bytes):
        if len(data) > max_bytes:
            raise ValidationFailed(too_big)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationFailed(f"config is not UTF-8 text (bad byte at offset {exc.start})") from None
    # The cheap character count settles most cases without encoding a huge string.
    if len(data) > max_bytes or len(data.encode("utf-8", "surrogatepass")) > max_bytes:
        raise ValidationFailed(too_big)
    return data


def _check_events(text: str) -> None:
    """Refuse anchors, aliases and deep nesting from the event stream, before anything is constructed."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.NodeEvent) and event.anchor is not None:
            # Aliases let a few hundred bytes expand to gigabytes ("billion laughs"); Talos configs
            # never need them, so even a harmless anchor is refused to keep the rule simple.
            kind = "alias" if isinstance(event, yaml.AliasEvent) else "anchor"
            raise ValidationFailed(
                f"YAML {kind} '{event.anchor}'{_where(event.start_mark)} is not allowed; write the value out in full"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise ValidationFailed(f"YAML nested more than {MAX_DEPTH} levels deep{_where(event.start_mark)}")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


def load_values(data: str | bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Any]:
    """Every non-empty YAML document of ``data``, whatever its type, read the way Talos reads YAML.

    Raises ``ValidationFailed`` for input over ``max_bytes``, anchors or aliases, nesting too deep, invalid YAML
    (with its line and column), or duplicate or non-string keys."""
    text = _to_text(data, max_bytes)
    try:
        _check_events(text)
        loaded = list(yaml.load_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "syntax error"
        if "nesting depth" in problem:
            # PyYAML >= 6.0.3 has a nesting limit of its own, which its scanner can reach before the parser hands
            # us the event past ours: say it in the same words either way.
            raise ValidationFailed(f"YAML nested more than {MAX_DEPTH} levels deep{_where(mark)}") from None
        raise ValidationFailed(f"invalid YAML{_where(mark)}: {problem}") from None
    except yaml.reader.ReaderError as exc:
        raise ValidationFailed(f"invalid YAML at character {exc.position}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        raise ValidationFailed(f"invalid YAML: {exc}") from None
    except (ValueError, RecursionError) as exc:
        # int() refuses numbers of more than 4300 digits; nothing in a Talos config is that long.
        raise ValidationFailed(f"invalid YAML: {exc}") from None
    return [value for value in loaded if value is not None]


def load_documents(data: str | bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> list[dict[str, Any]]:
    """Parse a multi-document config into one mapping per document; empty documents are skipped.

    Refuses what ``load_values`` refuses, a document that is not a mapping, or no document at all."""
    docs: list[dict[str, Any]] = []
    for index, doc in enumerate(load_values(data, max_bytes=max_bytes), start=1):
        if not isinstance(doc, dict):
            raise ValidationFailed(
                f"YAML document {index} is a {type(doc).__name__}, not a mapping; "
                "every Talos config document is a mapping"
            )
        docs.append(doc)
    if not docs:
        raise ValidationFailed("config holds no YAML document")
    return docs


def dump_documents(docs: list[Any]) -> str:
    """Write documents (mappings, or the list of a JSON 6902 patch) as one YAML stream separated by ``---``
    lines, keys in their given order."""
    return yaml.dump_all(
        docs,
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        # Base64 certificates are single lines of several kilobytes; folding them would still be valid
        # YAML but makes configs hard to diff and grep.
        width=1 << 30,
        explicit_start=False,
    )
