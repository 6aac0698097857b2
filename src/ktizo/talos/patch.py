"""Config patches as Talos understands them: strategic merge patches (partial configs) and JSON6902 patches.

Loading follows ``configpatcher.LoadPatch`` and applying follows ``configpatcher.Apply``, ``StrategicMerge``,
``merge.Merge`` and the ``$patch: delete`` selectors of ``configloader`` (Talos v1.13.9, with the v1.14 fix
that skips deletions of absent documents). Talos merges *typed* Go structs; Ktizo merges the YAML as plain
mappings, so the rules that hang on Go types (``merge:"replace"`` tags, custom ``Merge`` methods) are keyed
here by document kind and field path. Differences from Talos are noted where they arise.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ktizo.domain.errors import ValidationFailed
from ktizo.talos.schema import CONFIG_LABEL, document_key, validate_documents

# The list path needs the same refusals (aliases, depth) and Go-like scalars as load_documents, which
# only returns mappings; yamlio keeps these helpers private, so the coupling is deliberate and local.
from ktizo.talos.yamlio import load_documents, load_values

__all__ = [
    "DEFAULT_MAX_PATCH_BYTES",
    "JSON6902_MULTI_DOC",
    "Patch",
    "apply_patches",
    "check_patch_result",
    "load_patch",
]

DEFAULT_MAX_PATCH_BYTES = 256 * 1024

FIELD = "patch"
PATCH_KEY = "$patch"
DELETE = "delete"

JSON6902_MULTI_DOC = (
    "JSON6902 patches are not supported for multi-document machine configuration: Talos refuses them too; "
    "write a strategic merge patch (a partial config) instead"
)

JSON6902_OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})

_IDENTITY_KEYS = frozenset({"apiVersion", "kind", "name", "version"})
_DOCUMENT_DELETE_KEYS = frozenset({"apiVersion", "kind", "name", PATCH_KEY})
_ARRAY_INDEX = re.compile(r"^(?:0|[1-9][0-9]*)$")
_BAD_ESCAPE = re.compile(r"~(?![01])")

_KeyPath = tuple[str | int, ...]
_RulePath = tuple[str, ...]
_Matcher = Callable[[dict[str, Any], dict[str, Any]], bool]


@dataclass(frozen=True)
class Patch:
    """One patch: ``documents`` for a strategic merge patch, ``operations`` for JSON6902; ``source`` is its text."""

    kind: Literal["strategic", "json6902"]
    documents: tuple[dict[str, Any], ...] = ()
    operations: tuple[dict[str, Any], ...] = ()
    source: str = ""


# --- comparing values the way JSON does ---------------------------------------------------------------


def _json_equal(left: Any, right: Any) -> bool:
    # Python says True == 1; JSON (and Go) do not, and a test op or a list selector must not match across types.
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[key], right[key]) for key in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_json_equal(a, b) for a, b in zip(left, right, strict=True))
    return type(left) is type(right) and bool(left == right)


def _dotted(path: _KeyPath) -> str:
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else part
    return text or "(document)"


def _type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    return "scalar"


# --- loading --------------------------------------------------------------------------------------------


def _patch_text(text: str | bytes, max_bytes: int) -> str:
    too_big = ValidationFailed(f"patch is larger than {max_bytes} bytes", FIELD)
    if isinstance(text, bytes):
        if len(text) > max_bytes:
            raise too_big
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationFailed(f"patch is not UTF-8 text (bad byte at offset {exc.start})", FIELD) from None
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise too_big
    return text


def _parse_values(text: str) -> list[Any]:
    """Every non-empty YAML document of ``text``, whatever its type, behind load_documents's protections."""
    try:
        return load_values(text, max_bytes=len(text.encode("utf-8", "surrogatepass")) + 1)
    except ValidationFailed as exc:
        raise ValidationFailed(exc.message, FIELD) from None


def _check_pointer(value: Any, index: int, op: str, member: str) -> str:
    if not isinstance(value, str) or (value and not value.startswith("/")) or _BAD_ESCAPE.search(value):
        raise ValidationFailed(
            f'JSON6902 operation {index} ({op}): {member!r} must be a JSON pointer such as "/machine/install/disk"',
            FIELD,
        )
    return value


def _check_operation(index: int, operation: Any) -> None:
    if not isinstance(operation, dict):
        raise ValidationFailed(f"JSON6902 operation {index} is a {_type_name(operation)}, not a mapping", FIELD)
    op = operation.get("op")
    if op not in JSON6902_OPS:
        raise ValidationFailed(
            f"JSON6902 operation {index}: op {op!r} is not one of {', '.join(sorted(JSON6902_OPS))}", FIELD
        )
    _check_pointer(operation.get("path"), index, op, "path")
    if op in ("add", "replace", "test") and "value" not in operation:
        raise ValidationFailed(f"JSON6902 operation {index} ({op}): 'value' is missing", FIELD)
    if op in ("move", "copy"):
        _check_pointer(operation.get("from"), index, op, "from")


def _json6902_from(values: list[Any]) -> tuple[dict[str, Any], ...]:
    if len(values) != 1:
        raise ValidationFailed(
            f"patch has {len(values)} YAML documents and one of them is a list; a JSON6902 patch is a single list "
            "of operations, a strategic merge patch is one or more mappings",
            FIELD,
        )
    operations = values[0]
    if not operations:
        raise ValidationFailed("patch is an empty list of JSON6902 operations", FIELD)
    for index, operation in enumerate(operations):
        if not isinstance(operation, dict) or "op" not in operation:
            raise ValidationFailed(
                f"patch is a list, but item {index} is not a JSON6902 operation (a mapping with 'op'); "
                "a strategic merge patch is a mapping, not a list",
                FIELD,
            )
        _check_operation(index, operation)
    return tuple(operations)


def load_patch(text: str | bytes, *, max_bytes: int = DEFAULT_MAX_PATCH_BYTES) -> Patch:
    """Load a patch, telling the two kinds apart as Talos's ``LoadPatch`` does.

    One or more YAML mappings make a strategic merge patch (``$patch: delete`` allowed); a single YAML or JSON
    list of mappings with an ``op`` key makes a JSON6902 patch. Raises ``ValidationFailed`` with field "patch"
    for oversize or non-UTF-8 input, invalid YAML, anchors or aliases, an empty patch, scalars, and malformed
    operations or ``$patch`` directives.
    """
    source = _patch_text(text, max_bytes)
    try:
        # Strategic first, as Talos tries it first: load_documents is the canonical reader of configs.
        documents = load_documents(source, max_bytes=max_bytes)
    except ValidationFailed as strategic_error:
        values = _parse_values(source)
        if not values:
            raise ValidationFailed("patch is empty", FIELD) from None
        if any(isinstance(value, list) for value in values):
            return Patch(kind="json6902", operations=_json6902_from(values), source=source)
        for number, value in enumerate(values, start=1):
            if not isinstance(value, dict):
                raise ValidationFailed(
                    f"patch document {number} is a {_type_name(value)}; a patch is a partial config (one or "
                    "more mappings) or a JSON6902 list of operations",
                    FIELD,
                ) from None
        raise ValidationFailed(strategic_error.message, FIELD) from None
    for number, document in enumerate(documents, start=1):
        _split_document(document, number)
    return Patch(kind="strategic", documents=tuple(documents), source=source)


# --- $patch: delete ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Deletion:
    """A ``$patch: delete``: the key at ``path``, or with ``item`` the first list item with that key and value."""

    path: tuple[str, ...]
    item: tuple[str, Any] | None = None


def _describe_document(document: Mapping[str, Any]) -> str:
    _api, kind, name = document_key(dict(document))
    if kind == CONFIG_LABEL:
        return "v1alpha1"
    return f"{kind} {name!r}" if name else kind


def _check_marker(value: Any, where: str) -> None:
    if value != DELETE:
        raise ValidationFailed(f"{where}: '$patch: {value}' is not supported; the only directive is '$patch: delete'")


def _strip(value: Any, path: _KeyPath, deletions: list[_Deletion], in_list: bool) -> tuple[Any, bool]:
    """Copy ``value`` without its ``$patch`` directives, recording them; True when nothing is left of it.

    Like Talos, a mapping or list emptied by removing directives disappears from its parent too.
    """
    if isinstance(value, dict):
        if PATCH_KEY in value:
            _check_marker(value[PATCH_KEY], _dotted(path))
            if in_list:
                # Talos's selectors cannot reach into list items ("cannot delete an inner key").
                raise ValidationFailed(
                    f"{_dotted(path)}: '$patch: delete' cannot delete a key inside a list item; "
                    "delete the whole item instead"
                )
            if len(value) > 1:
                # Talos silently ignores the siblings; refusing says so before anyone relies on them.
                others = ", ".join(repr(key) for key in value if key != PATCH_KEY)
                raise ValidationFailed(
                    f"{_dotted(path)}: a mapping with '$patch: delete' is deleted whole, so {others} would be ignored"
                )
            deletions.append(_Deletion(tuple(str(part) for part in path)))
            return None, True
        kept: dict[str, Any] = {}
        removed = False
        for key, child in value.items():
            new_child, gone = _strip(child, (*path, key), deletions, in_list)
            if gone:
                removed = True
            else:
                kept[key] = new_child
        return kept, removed and not kept
    if isinstance(value, list):
        items: list[Any] = []
        removed = False
        for index, item in enumerate(value):
            if isinstance(item, dict) and PATCH_KEY in item:
                where = _dotted((*path, index))
                _check_marker(item[PATCH_KEY], where)
                if in_list:
                    raise ValidationFailed(
                        f"{where}: '$patch: delete' cannot delete an item of a list nested in another list"
                    )
                selectors = [(key, item_value) for key, item_value in item.items() if key != PATCH_KEY]
                if not selectors:
                    raise ValidationFailed(
                        f"{where}: a list item with '$patch: delete' needs a key that selects the item to delete, "
                        "such as 'interface: eth0'"
                    )
                # Talos selects on the first key besides $patch, and so does Ktizo.
                deletions.append(_Deletion(tuple(str(part) for part in path), selectors[0]))
                removed = True
                continue
            new_item, _gone = _strip(item, (*path, index), deletions, True)
            items.append(new_item)
        return items, removed and not items
    return value, False


def _split_document(document: dict[str, Any], number: int) -> tuple[list[_Deletion], dict[str, Any] | None]:
    """The deletions a patch document asks for, and what is left to merge (None when nothing is)."""
    label = f"patch document {number}"
    if not isinstance(document, dict):
        raise ValidationFailed(f"{label} is a {_type_name(document)}, not a mapping", FIELD)
    kind, api_version = document.get("kind"), document.get("apiVersion")
    if (kind is None) != (api_version is None):
        # Talos's decoder refuses a kind without apiVersion and the reverse ("missing apiVersion").
        missing = "apiVersion" if api_version is None else "kind"
        raise ValidationFailed(f"{label}: {missing!r} is missing; documents other than v1alpha1 need both", FIELD)
    label = f"{label} ({_describe_document(document)})"
    if PATCH_KEY in document:
        try:
            _check_marker(document[PATCH_KEY], label)
        except ValidationFailed as exc:
            raise ValidationFailed(exc.message, FIELD) from None
        if kind is None:
            raise ValidationFailed(
                f"{label}: the v1alpha1 document cannot be deleted; delete its fields instead", FIELD
            )
        extra = sorted(set(document) - _DOCUMENT_DELETE_KEYS)
        if extra:
            raise ValidationFailed(
                f"{label}: a document with '$patch: delete' is deleted whole, so {', '.join(map(repr, extra))} "
                "would be ignored",
                FIELD,
            )
        return [_Deletion(())], None
    deletions: list[_Deletion] = []
    try:
        rest, _gone = _strip(document, (), deletions, False)
    except ValidationFailed as exc:
        raise ValidationFailed(f"{label}: {exc.message}", FIELD) from None
    if deletions and set(rest) <= _IDENTITY_KEYS:
        # Talos skips such a remainder only when it lacks apiVersion too, and would then append an empty
        # document when the target is absent; a remainder that merely names the document merges nothing.
        return deletions, None
    return deletions, rest


def _apply_deletion(document: dict[str, Any], deletion: _Deletion) -> None:
    *parents, last = deletion.path
    node = document
    for depth, key in enumerate(parents, start=1):
        child = node.get(key)
        if not isinstance(child, dict):
            # Talos: "lookup failed" when a parent on the way is absent.
            raise ValidationFailed(
                f"cannot delete {'.'.join(deletion.path)}: {'.'.join(parents[:depth])} is not in the config"
            )
        node = child
    if deletion.item is None:
        # An absent key is already deleted. Talos agrees for struct fields; for map entries (nodeLabels) it
        # reports "lookup failed" instead.
        node.pop(last, None)
        return
    items = node.get(last)
    key, value = deletion.item
    if isinstance(items, list):
        for index, item in enumerate(items):
            if isinstance(item, dict) and key in item and _json_equal(item[key], value):
                # Only the first match, as Talos does.
                del items[index]
                return
    raise ValidationFailed(
        f"no item of {'.'.join(deletion.path)} has {key} = {value!r}, so none can be deleted"
        if isinstance(items, list)
        else f"{'.'.join(deletion.path)} is not a list in the config, so no item of it can be deleted"
    )


# --- strategic merge --------------------------------------------------------------------------------------


def _field_matcher(key: str, zero: Any) -> _Matcher:
    # An absent field is Go's zero value: two vlans without vlanId both have ID 0 and match.
    def matches(existing: dict[str, Any], incoming: dict[str, Any]) -> bool:
        left, right = existing.get(key), incoming.get(key)
        return _json_equal(zero if left is None else left, zero if right is None else right)

    return matches


def _same_interface(existing: dict[str, Any], incoming: dict[str, Any]) -> bool:
    # NetworkDeviceList.Merge: a non-empty interface name decides alone; only without one does the selector.
    name = incoming.get("interface")
    if name:
        return bool(existing.get("interface") == name)
    selector = incoming.get("deviceSelector")
    if selector is None:
        return False
    other = existing.get("deviceSelector")
    # Talos compares the selector structs with ==, whose *bool "physical" compares pointers and so never
    # matches when set; Ktizo compares the values.
    return other is not None and _json_equal(other, selector)


# Fields tagged `merge:"replace"` in Talos v1.13: the patch value replaces the old one.
_REPLACE: Mapping[str | None, frozenset[_RulePath]] = {
    None: frozenset(
        {
            ("cluster", "network", "podSubnets"),
            ("cluster", "network", "serviceSubnets"),
            ("cluster", "apiServer", "auditPolicy"),
        }
    ),
    "NetworkRuleConfig": frozenset({("ingress",), ("portSelector", "ports")}),
}

# Fields of type Args, whose Merge copies every patch entry over the old ones, even empty strings and lists.
_ARGS: Mapping[str | None, frozenset[_RulePath]] = {
    None: frozenset(
        {
            ("machine", "kubelet", "extraArgs"),
            ("cluster", "apiServer", "extraArgs"),
            ("cluster", "controllerManager", "extraArgs"),
            ("cluster", "proxy", "extraArgs"),
            ("cluster", "scheduler", "extraArgs"),
            ("cluster", "etcd", "extraArgs"),
        }
    ),
}

# Lists with a custom Merge: a patch item merges into the first old item it matches, else it is appended.
_KEYED: Mapping[str | None, Mapping[_RulePath, _Matcher]] = {
    None: {
        ("machine", "network", "interfaces"): _same_interface,
        ("machine", "network", "interfaces", "[]", "vlans"): _field_matcher("vlanId", 0),
        ("cluster", "apiServer", "admissionControl"): _field_matcher("name", ""),
    },
    "ExtensionServiceConfig": {("configFiles",): _field_matcher("mountPath", "")},
}


def _rule_path(path: _KeyPath) -> _RulePath:
    return tuple("[]" if isinstance(part, int) else part for part in path)


def _fresh(value: Any) -> Any:
    # A null in a patch means "not set" to Talos's typed decoder, so it never becomes part of the config.
    if isinstance(value, dict):
        return {key: _fresh(child) for key, child in value.items() if child is not None}
    if isinstance(value, list):
        return [_fresh(item) for item in value]
    return value


def _is_zero(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    return value == "" or (isinstance(value, int | float) and value == 0)


def _mismatch(path: _KeyPath, base: Any, patch: Any) -> ValidationFailed:
    return ValidationFailed(
        f"{_dotted(path)}: the patch has a {_type_name(patch)} where the config has a {_type_name(base)}"
    )


def _merge_value(base: Any, patch: Any, path: _KeyPath, kind: str | None) -> Any:
    """Merge ``patch`` into ``base`` (a private copy, changed in place) and return the result."""
    if patch is None:
        return base
    if base is None:
        return _fresh(patch)
    rule = _rule_path(path)
    if rule in _REPLACE.get(kind, frozenset()):
        return _fresh(patch)
    if isinstance(patch, dict):
        if not isinstance(base, dict):
            raise _mismatch(path, base, patch)
        if rule in _ARGS.get(kind, frozenset()):
            base.update({key: _fresh(value) for key, value in patch.items() if value is not None})
            return base
        for key, value in patch.items():
            if base.get(key) is not None:
                base[key] = _merge_value(base[key], value, (*path, key), kind)
            elif value is not None:
                # Set even when zero: Talos does so for map entries (nodeLabels values are often ""), and for
                # a struct field a zero value reads as "not set" anyway.
                base[key] = _fresh(value)
        return base
    if isinstance(patch, list):
        if not isinstance(base, list):
            raise _mismatch(path, base, patch)
        matcher = _KEYED.get(kind, {}).get(rule)
        for item in patch:
            if matcher is not None and isinstance(item, dict):
                for index, existing in enumerate(base):
                    if isinstance(existing, dict) and matcher(existing, item):
                        base[index] = _merge_value(existing, item, (*path, index), kind)
                        break
                else:
                    base.append(_fresh(item))
            else:
                base.append(_fresh(item))
        return base
    if isinstance(base, dict | list):
        raise _mismatch(path, base, patch)
    # Go's merge skips zero values (they are indistinguishable from "not given") but always applies a bool.
    # Talos does apply a zero through pointer fields (*int); without Go types Ktizo cannot tell those apart.
    if _is_zero(patch):
        return base
    return patch


def _find(documents: list[dict[str, Any]], key: tuple[str, str, str]) -> int | None:
    for index, document in enumerate(documents):
        if document_key(document) == key:
            return index
    return None


def _apply_strategic(documents: list[dict[str, Any]], patch: Patch, label: str) -> list[dict[str, Any]]:
    if not patch.documents:
        raise ValidationFailed(f"{label}: a strategic merge patch needs at least one document", FIELD)
    for number, patch_document in enumerate(patch.documents, start=1):
        try:
            deletions, rest = _split_document(patch_document, number)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{label}: {exc.message}", FIELD) from None
        key = document_key(patch_document)
        index = _find(documents, key)
        where = f"{label}, document {number} ({_describe_document(patch_document)})"
        try:
            for deletion in deletions:
                if index is None:
                    # Deleting from a document the config does not have: Talos skips it silently.
                    break
                if not deletion.path:
                    del documents[index]
                    index = None
                    continue
                _apply_deletion(documents[index], deletion)
            if rest is None:
                continue
            if index is None:
                documents.append(_fresh(rest))
            else:
                target = documents[index]
                kind = target.get("kind")
                documents[index] = _merge_value(target, rest, (), kind if isinstance(kind, str) else None)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{where}: {exc.message}", FIELD) from None
    return documents


# --- JSON6902 ---------------------------------------------------------------------------------------------


class _PointerError(Exception):
    """A JSON pointer that does not resolve; turned into ValidationFailed with the operation's context."""


def _tokens(pointer: str) -> list[str]:
    if not pointer:
        return []
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _list_index(items: list[Any], part: str, *, insert: bool) -> int:
    if insert and part == "-":
        return len(items)
    if not _ARRAY_INDEX.match(part):
        raise _PointerError(f"{part!r} is not a list index")
    index = int(part)
    if index > len(items) or (index == len(items) and not insert):
        raise _PointerError(f"index {index} is out of range for a list of {len(items)}")
    return index


def _get(document: Any, tokens: list[str]) -> Any:
    node = document
    for depth, token in enumerate(tokens, start=1):
        if isinstance(node, dict):
            if token not in node:
                raise _PointerError(f"{'/' + '/'.join(tokens[:depth])} does not exist")
            node = node[token]
        elif isinstance(node, list):
            node = node[_list_index(node, token, insert=False)]
        else:
            raise _PointerError(f"{'/' + '/'.join(tokens[: depth - 1])} is a scalar")
    return node


def _add(document: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _get(document, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        parent[last] = value
    elif isinstance(parent, list):
        parent.insert(_list_index(parent, last, insert=True), value)
    else:
        raise _PointerError("the parent is a scalar")
    return document


def _remove(document: Any, tokens: list[str]) -> Any:
    if not tokens:
        raise _PointerError("the whole document cannot be removed")
    parent = _get(document, tokens[:-1])
    last = tokens[-1]
    if isinstance(parent, dict):
        if last not in parent:
            raise _PointerError("it does not exist")
        return parent.pop(last)
    if isinstance(parent, list):
        return parent.pop(_list_index(parent, last, insert=False))
    raise _PointerError("the parent is a scalar")


def _apply_operation(document: Any, operation: dict[str, Any]) -> Any:
    op = operation["op"]
    tokens = _tokens(operation["path"])
    if op == "add":
        return _add(document, tokens, copy.deepcopy(operation["value"]))
    if op == "remove":
        _remove(document, tokens)
        return document
    if op == "replace":
        if not tokens:
            return copy.deepcopy(operation["value"])
        parent = _get(document, tokens[:-1])
        last = tokens[-1]
        if isinstance(parent, dict):
            if last not in parent:
                raise _PointerError("it does not exist")
            # Assigned in place so the key keeps its position in the written YAML.
            parent[last] = copy.deepcopy(operation["value"])
        elif isinstance(parent, list):
            parent[_list_index(parent, last, insert=False)] = copy.deepcopy(operation["value"])
        else:
            raise _PointerError("the parent is a scalar")
        return document
    if op == "test":
        if not _json_equal(_get(document, tokens), operation["value"]):
            # The values are not shown: they may be secrets.
            raise _PointerError("test failed: the value differs")
        return document
    source = _tokens(operation["from"])
    if op == "move":
        if source == tokens:
            _get(document, source)
            return document
        if tokens[: len(source)] == source:
            raise _PointerError("a value cannot be moved into itself")
        return _add(document, tokens, _remove(document, source))
    return _add(document, tokens, copy.deepcopy(_get(document, source)))


def _apply_json6902(documents: list[dict[str, Any]], patch: Patch, label: str) -> list[dict[str, Any]]:
    if len(documents) > 1:
        raise ValidationFailed(JSON6902_MULTI_DOC, FIELD)
    if not documents:
        raise ValidationFailed(f"{label}: a JSON6902 patch needs a config with a document to patch", FIELD)
    if not patch.operations:
        raise ValidationFailed(f"{label}: a JSON6902 patch needs at least one operation", FIELD)
    document: Any = documents[0]
    for index, operation in enumerate(patch.operations):
        try:
            _check_operation(index, operation)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{label}: {exc.message}", FIELD) from None
        try:
            document = _apply_operation(document, operation)
        except _PointerError as exc:
            raise ValidationFailed(
                f"{label}: JSON6902 operation {index} ({operation['op']} {operation['path']}): {exc}", FIELD
            ) from None
        if not isinstance(document, dict):
            raise ValidationFailed(
                f"{label}: JSON6902 operation {index} ({operation['op']} {operation['path']}) leaves a "
                f"{_type_name(document)} where the config document must be a mapping",
                FIELD,
            )
    return [document]


# --- applying and checking --------------------------------------------------------------------------------


def apply_patches(docs: list[dict[str, Any]], patches: Sequence[Patch]) -> list[dict[str, Any]]:
    """Apply ``patches`` in order to a copy of ``docs`` and return the result; the inputs are not changed.

    Strategic patches merge documents matched by (apiVersion, kind, name) and append the rest; JSON6902
    patches need a single-document config. Raises ``ValidationFailed`` with field "patch", naming the patch,
    document or operation and the path, when a patch cannot apply. The result is not validated: see
    ``check_patch_result``.
    """
    documents = copy.deepcopy(docs)
    for number, patch in enumerate(patches, start=1):
        label = f"patch {number}"
        if patch.kind == "strategic":
            documents = _apply_strategic(documents, patch, label)
        elif patch.kind == "json6902":
            documents = _apply_json6902(documents, patch, label)
        else:
            raise ValidationFailed(f"{label}: unknown patch kind {patch.kind!r}", FIELD)
    return documents


def _lookup(document: dict[str, Any], path: _RulePath) -> Any:
    node: Any = document
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


# Fields without which a machine cannot join: a patch must not remove them.
_REQUIRED: tuple[_RulePath, ...] = (
    ("machine", "type"),
    ("cluster", "controlPlane", "endpoint"),
    ("machine", "ca", "crt"),
)


def check_patch_result(docs: list[dict[str, Any]]) -> None:
    """Validate a patched config, and refuse one whose patches removed fields every machine config needs.

    Raises ``ValidationFailed`` from ``validate_documents``, or naming ``machine.type``,
    ``cluster.controlPlane.endpoint`` or ``machine.ca.crt`` when that field is gone.
    """
    validate_documents(docs)
    config = next(doc for doc in docs if doc.get("kind") is None)
    for path in _REQUIRED:
        value = _lookup(config, path)
        if not isinstance(value, str) or not value:
            dotted = ".".join(path)
            raise ValidationFailed(f"{dotted} is missing from the patched config; patches must not remove it", dotted)
