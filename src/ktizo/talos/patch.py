"""Config patches as Talos understands them: strategic merge patches (partial configs) and JSON6902 patches.

Loading follows ``configpatcher.LoadPatch`` and applying follows ``configpatcher.Apply``, ``StrategicMerge``,
``merge.Merge`` and the ``$patch: delete`` selectors of ``configloader`` (Talos v1.13.9, with the v1.14 fix
that skips deletions of absent documents). Talos merges *typed* Go structs; Ktizo merges the YAML as plain
mappings, so the rules that hang on Go types (``merge:"replace"`` tags, custom ``Merge`` methods) are keyed
here by document kind and field path. Differences from Talos are noted where they arise. Where Talos scans a
list for the first match, Ktizo looks it up in an index with the same answer, so that applying a patch at the
size limit takes time linear in its size (see "finding first matches").
"""

from __future__ import annotations

import bisect
import copy
import datetime
import heapq
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
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


# --- finding first matches without rescanning ---------------------------------------------------------------
#
# A keyed list merge and a `$patch: delete` selector take the *first* item that matches, and doing that by
# scanning is quadratic: a patch with thousands of items rescans the list for each. The indexes below give the
# same answers from hash lookups. Each item's value in the field compared gets an exact *key* (two keys are equal
# exactly when the comparison the rule uses says the values are), items are found by key, and the first is the
# smallest of the candidates. They assume the documents are trees, as loaded YAML is (apply_patches checks), so
# that an item changes only when a merge into that item changes it.


class _NoKey(Exception):
    """A value the index cannot key: of a type YAML does not produce, or over a budget. It is compared instead."""


_NUMBER = "number"  # the tag of ints and floats, which compare by value (1 == 1.0) in JSON and in Python
_BOOLEAN = "boolean"  # JSON keeps booleans apart from numbers; Python does not (True == 1)
_ATOMS = frozenset({str, bytes, type(None), datetime.date, datetime.datetime})

# Nodes a re-keying may visit when a merge changed a field other than the one matched on, which can be large: a
# merge of a small patch item must not cost as much as the item merged into. A field over budget is compared.
_REKEY_BUDGET = 256


class _Same:
    """A NaN inside a container under Python's ==, which compares the items by identity first: equal to itself."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _spend(budget: list[int] | None, nodes: int = 1) -> None:
    if budget is not None:
        budget[0] -= nodes
        if budget[0] < 0:
            raise _NoKey


def _text_key(key: Any) -> str:
    if type(key) is not str:
        raise _NoKey
    return key


def _json_key(value: Any, budget: list[int] | None = None) -> Hashable:
    """A key for ``value``: two keys are equal exactly when ``_json_equal`` says their values are."""
    _spend(budget)
    kind = type(value)
    if kind is bool:
        return (_BOOLEAN, value)
    if kind is int or kind is float:
        # NaN equals nothing, itself included, and a new object is equal to no other key.
        return (_NUMBER, value) if value == value else object()
    if kind is dict:
        return (dict, frozenset((_text_key(key), _json_key(child, budget)) for key, child in value.items()))
    if kind is list:
        return (list, tuple(_json_key(child, budget) for child in value))
    # Everything else compares as `type(left) is type(right) and left == right`.
    return (kind, _python_key(value, budget, nested=False, counted=True))


def _python_key(
    value: Any, budget: list[int] | None = None, *, nested: bool = False, counted: bool = False
) -> Hashable:
    """A key for ``value``: two keys are equal exactly when Python's == says their values are (as items of a
    container with ``nested``, where == takes an object to be equal to itself, NaN included)."""
    if not counted:
        _spend(budget)
    kind = type(value)
    if kind is bool or kind is int or kind is float:
        if value != value:
            return _Same(value) if nested else object()
        return (_NUMBER, value)
    if kind in _ATOMS:
        return (kind, value)
    if kind is list or kind is tuple:
        return (kind, tuple(_python_key(child, budget, nested=True) for child in value))
    if kind is dict:
        return (
            dict,
            frozenset((_text_key(key), _python_key(child, budget, nested=True)) for key, child in value.items()),
        )
    if kind is set or kind is frozenset:
        # Set members are hashable, and a frozenset compares them as a set does (a set equals a frozenset).
        _spend(budget, len(value))
        return (set, frozenset(value))
    raise _NoKey


_ABSENT: Any = object()  # a field an item has no value in, so that it matches nothing on that field
_LOOSE: Any = object()  # the key of a value that has none (see _ItemIndex)


@dataclass(frozen=True, eq=False)
class _Field:
    """What items are compared on: ``value`` reads it from an item (``_ABSENT``: the item cannot match on it),
    ``equal`` compares an item's value with the one sought, ``key`` keys values as ``equal`` compares them.
    ``source`` is the item key that ``value`` reads: a merge that does not set it leaves the value alone."""

    source: Any
    value: Callable[[dict[Any, Any]], Any]
    equal: Callable[[Any, Any], bool]
    key: Callable[[Any, list[int] | None], Hashable]


def _is_tree(value: Any) -> bool:
    """Whether no list or mapping is reachable twice from ``value`` (loaded YAML never shares one)."""
    seen: set[int] = set()
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict | list):
            if id(node) in seen:
                return False
            seen.add(id(node))
            stack.extend(node.values() if isinstance(node, dict) else node)
        elif isinstance(node, tuple):
            stack.extend(node)
    return True


class _ItemIndex:
    """Where values are among the items of a list, by *slot*: a number an item keeps for as long as it is in the
    list (positions shift as items are deleted), increasing along the list.

    ``entries`` gives an item's values, each under a name, and ``lookup`` one of them by name (``_ABSENT`` when
    the item has none); values are compared with ``equal`` and keyed with ``key``. Slots below ``scanned`` are
    indexed. A heap entry whose slot is gone, or has another key by now, is dropped when met.
    """

    def __init__(
        self,
        entries: Callable[[dict[Any, Any]], Iterable[tuple[Hashable, Any]]],
        lookup: Callable[[dict[Any, Any], Hashable], Any],
        equal: Callable[[Any, Any], bool],
        key: Callable[[Any, list[int] | None], Hashable],
    ) -> None:
        self.entries = entries
        self.lookup = lookup
        self.equal = equal
        self.key = key
        self.scanned = 0
        self._heaps: dict[tuple[Hashable, Hashable], list[int]] = {}
        self._keys: dict[int, dict[Hashable, Hashable]] = {}  # slot -> name -> key, or _LOOSE
        self._loose: dict[Hashable, dict[int, Any]] = {}  # name -> slot -> a value without key, compared instead
        self._stale: dict[int, set[Hashable]] = {}  # slot -> names whose values a merge may have changed

    def put(self, slot: int, item: Any, names: Iterable[Hashable] | None = None, budget: int | None = None) -> None:
        """Index ``item`` at ``slot``: all its values, or again those under ``names``, keying each within
        ``budget`` nodes (past it, the value is compared instead)."""
        keys = self._keys.setdefault(slot, {})
        if names is None:
            for name, key in keys.items():
                if key is _LOOSE:
                    del self._loose[name][slot]
            keys.clear()
            pairs = self.entries(item) if isinstance(item, dict) else ()
        else:
            pairs = [(name, self.lookup(item, name) if isinstance(item, dict) else _ABSENT) for name in names]
        for name, value in pairs:
            old = keys.pop(name, _ABSENT)
            if old is _LOOSE:
                del self._loose[name][slot]
            if value is _ABSENT:
                continue
            try:
                key = self.key(value, None if budget is None else [budget])
            except _NoKey:
                keys[name] = _LOOSE
                self._loose.setdefault(name, {})[slot] = value
                continue
            keys[name] = key
            if old is _ABSENT or old is _LOOSE or old != key:
                heapq.heappush(self._heaps.setdefault((name, key), []), slot)

    def mark(self, slot: int, names: Iterable[Hashable]) -> None:
        """Note that a merge may have changed the values under ``names`` of the item at ``slot``; they are keyed
        again, once however many merges there were, when the index is next used."""
        if slot < self.scanned:
            self._stale.setdefault(slot, set()).update(names)

    def refresh(self, item_at: Callable[[int], Any]) -> None:
        # A value changed by a merge may be much larger than what the patch item added to it: the budget keeps
        # re-keying it as cheap as that patch item was.
        for slot, names in self._stale.items():
            item = item_at(slot)
            if item is not _ABSENT:
                self.put(slot, item, names, _REKEY_BUDGET)
        self._stale.clear()

    def first(self, name: Hashable, key: Hashable, value: Any, alive: Callable[[int], bool]) -> int | None:
        """The smallest indexed slot whose value under ``name`` equals ``value`` (whose key is ``key``)."""
        found = None
        heap = self._heaps.get((name, key))
        while heap:
            slot = heap[0]
            if alive(slot) and self._keys.get(slot, {}).get(name, _ABSENT) == key:
                found = slot
                break
            heapq.heappop(heap)
        loose = self._loose.get(name)
        if loose:
            for slot, other in list(loose.items()):
                if not alive(slot):
                    del loose[slot]
                elif (found is None or slot < found) and self.equal(other, value):
                    found = slot
        return found

    def holds(self, slot: int, name: Hashable, key: Hashable, value: Any) -> bool:
        current = self._keys.get(slot, {}).get(name, _ABSENT)
        if current is _LOOSE:
            return self.equal(self._loose[name][slot], value)
        return bool(current == key)


def _field_index(field: _Field) -> _ItemIndex:
    def entries(item: dict[Any, Any]) -> Iterable[tuple[Hashable, Any]]:
        return ((field, field.value(item)),)

    return _ItemIndex(entries, lambda item, _name: field.value(item), field.equal, field.key)


def _deletion_index() -> _ItemIndex:
    # `$patch: delete` selects the first item with a key and value: every (key, value) of an item is indexed.
    return _ItemIndex(dict.items, lambda item, key: item.get(key, _ABSENT), _json_equal, _json_key)


class _ListState:
    """A list of the documents being patched, with the indexes that find first matches in it.

    ``slots[position]`` is the slot of the item at that position. The list changes only through ``delete``, merges
    reported to ``merged``, and appends at its end (numbered when next looked at).
    """

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.slots = list(range(len(items)))
        self._next = len(items)
        self._fields: dict[_Field, _ItemIndex] = {}
        self._deletions: _ItemIndex | None = None

    def _sync(self) -> None:
        grown = len(self.items) - len(self.slots)
        if grown > 0:
            self.slots.extend(range(self._next, self._next + grown))
            self._next += grown

    def _alive(self, slot: int) -> bool:
        position = bisect.bisect_left(self.slots, slot)
        return position < len(self.slots) and self.slots[position] == slot

    def _item_at(self, slot: int) -> Any:
        position = bisect.bisect_left(self.slots, slot)
        if position < len(self.slots) and self.slots[position] == slot:
            return self.items[position]
        return _ABSENT

    def _first(self, index: _ItemIndex, name: Hashable, value: Any) -> int | None:
        self._sync()
        key = index.key(value, None)  # may raise _NoKey
        index.refresh(self._item_at)
        slot = index.first(name, key, value, self._alive)
        if slot is not None:
            return bisect.bisect_left(self.slots, slot)
        # Every indexed item comes before the others, and none matches: index on, up to the first match.
        position = bisect.bisect_left(self.slots, index.scanned)
        while position < len(self.slots):
            slot = self.slots[position]
            index.put(slot, self.items[position])
            index.scanned = slot + 1
            if index.holds(slot, name, key, value):
                return position
            position += 1
        index.scanned = self._next
        return None

    def first_match(self, field: _Field, value: Any) -> int | None:
        """The position of the first item whose ``field`` equals ``value``; raises _NoKey for a value without key."""
        index = self._fields.get(field)
        if index is None:
            index = self._fields[field] = _field_index(field)
        return self._first(index, field, value)

    def first_with(self, key: Any, value: Any) -> int | None:
        """The position of the first item with ``key`` set to ``value``; raises _NoKey for a value without key."""
        if self._deletions is None:
            self._deletions = _deletion_index()
        return self._first(self._deletions, key, value)

    def delete(self, position: int) -> None:
        self._sync()
        del self.items[position]
        del self.slots[position]

    def merged(self, position: int, before: Any, after: Any, incoming: dict[Any, Any], field: _Field | None) -> None:
        """Index again the item at ``position`` once ``incoming``, found on ``field``, was merged into ``before``,
        giving ``after``."""
        self._sync()
        slot = self.slots[position]
        if after is not before:
            # A replaced item is as large as the patch item it was made from.
            for index in [*self._fields.values(), *([self._deletions] if self._deletions else [])]:
                if slot < index.scanned:
                    index.put(slot, after)
            return
        # A merge changes only what the patch item sets (to anything but null).
        names = {key for key, value in incoming.items() if value is not None}
        for other, index in self._fields.items():
            if other.source not in names:
                continue
            if other is field and slot < index.scanned:
                # The field matched on now holds a merge of two equal values: keying it costs what the patch did.
                index.put(slot, after, (other,))
            else:
                index.mark(slot, (other,))
        if self._deletions is not None:
            self._deletions.mark(slot, names)


class _Patching:
    """What applying one strategic patch keeps: the state of each list it looked for items in."""

    def __init__(self, indexed: bool) -> None:
        self.indexed = indexed
        self._lists: dict[int, _ListState] = {}

    def list_state(self, items: list[Any]) -> _ListState | None:
        if not self.indexed:
            return None
        state = self._lists.get(id(items))
        if state is None or state.items is not items:
            state = self._lists[id(items)] = _ListState(items)
        return state


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


def _delete_first(items: list[Any], key: Any, value: Any, patching: _Patching) -> bool:
    """Delete the first item of ``items`` that has ``key`` with ``value`` (only the first, as Talos does)."""
    state = patching.list_state(items)
    if state is not None:
        try:
            position = state.first_with(key, value)
        except _NoKey:
            pass  # a value YAML does not produce: compared item by item below
        else:
            if position is None:
                return False
            state.delete(position)
            return True
    for index, item in enumerate(items):
        if isinstance(item, dict) and key in item and _json_equal(item[key], value):
            if state is None:
                del items[index]
            else:
                state.delete(index)
            return True
    return False


def _apply_deletion(document: dict[str, Any], deletion: _Deletion, patching: _Patching) -> None:
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
    if isinstance(items, list) and _delete_first(items, key, value, patching):
        return
    raise ValidationFailed(
        f"no item of {'.'.join(deletion.path)} has {key} = {value!r}, so none can be deleted"
        if isinstance(items, list)
        else f"{'.'.join(deletion.path)} is not a list in the config, so no item of it can be deleted"
    )


# --- strategic merge --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _KeyedList:
    """A list with a custom Merge: a patch item merges into the first old item it matches, else it is appended.

    ``probe`` gives the field (an index into ``fields``) a patch item is matched on and the value sought there, or
    None when the item matches nothing.
    """

    fields: tuple[_Field, ...]
    probe: Callable[[dict[str, Any]], tuple[int, Any] | None]

    def matches(self, existing: dict[str, Any], incoming: dict[str, Any]) -> bool:
        probe = self.probe(incoming)
        if probe is None:
            return False
        field = self.fields[probe[0]]
        value = field.value(existing)
        return value is not _ABSENT and field.equal(value, probe[1])


def _by_field(key: str, zero: Any) -> _KeyedList:
    # An absent field is Go's zero value: two vlans without vlanId both have ID 0 and match.
    def value(item: dict[str, Any]) -> Any:
        found = item.get(key)
        return zero if found is None else found

    return _KeyedList((_Field(key, value, _json_equal, _json_key),), lambda incoming: (0, value(incoming)))


def _interface_probe(incoming: dict[str, Any]) -> tuple[int, Any] | None:
    # NetworkDeviceList.Merge: a non-empty interface name decides alone; only without one does the selector.
    name = incoming.get("interface")
    if name:
        return 0, name
    selector = incoming.get("deviceSelector")
    return None if selector is None else (1, selector)


def _selector(item: dict[str, Any]) -> Any:
    selector = item.get("deviceSelector")
    return _ABSENT if selector is None else selector


_INTERFACES = _KeyedList(
    (
        _Field("interface", lambda item: item.get("interface"), lambda old, name: bool(old == name), _python_key),
        # Talos compares the selector structs with ==, whose *bool "physical" compares pointers and so never
        # matches when set; Ktizo compares the values.
        _Field("deviceSelector", _selector, _json_equal, _json_key),
    ),
    _interface_probe,
)


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
_KEYED: Mapping[str | None, Mapping[_RulePath, _KeyedList]] = {
    None: {
        ("machine", "network", "interfaces"): _INTERFACES,
        ("machine", "network", "interfaces", "[]", "vlans"): _by_field("vlanId", 0),
        ("cluster", "apiServer", "admissionControl"): _by_field("name", ""),
    },
    "ExtensionServiceConfig": {("configFiles",): _by_field("mountPath", "")},
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


def _merge_value(base: Any, patch: Any, path: _KeyPath, kind: str | None, patching: _Patching) -> Any:
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
                base[key] = _merge_value(base[key], value, (*path, key), kind, patching)
            elif value is not None:
                # Set even when zero: Talos does so for map entries (nodeLabels values are often ""), and for
                # a struct field a zero value reads as "not set" anyway.
                base[key] = _fresh(value)
        return base
    if isinstance(patch, list):
        if not isinstance(base, list):
            raise _mismatch(path, base, patch)
        keyed = _KEYED.get(kind, {}).get(rule)
        if keyed is not None:
            return _merge_keyed(base, patch, path, kind, keyed, patching)
        for item in patch:
            base.append(_fresh(item))
        return base
    if isinstance(base, dict | list):
        raise _mismatch(path, base, patch)
    # Go's merge skips zero values (they are indistinguishable from "not given") but always applies a bool.
    # Talos does apply a zero through pointer fields (*int); without Go types Ktizo cannot tell those apart.
    if _is_zero(patch):
        return base
    return patch


def _first_keyed(
    base: list[Any], item: dict[str, Any], rule: _KeyedList, state: _ListState | None
) -> tuple[int | None, _Field | None]:
    """The position of the first old item ``item`` merges into, and the field it was found on by the index."""
    probe = rule.probe(item)
    if probe is None:
        return None, None
    number, value = probe
    field = rule.fields[number]
    if state is not None:
        try:
            return state.first_match(field, value), field
        except _NoKey:
            pass  # a value YAML does not produce: compared item by item below
    found = next((index for index, old in enumerate(base) if isinstance(old, dict) and rule.matches(old, item)), None)
    return found, None


def _merge_keyed(
    base: list[Any], patch: list[Any], path: _KeyPath, kind: str | None, rule: _KeyedList, patching: _Patching
) -> list[Any]:
    state = patching.list_state(base)
    for item in patch:
        if not isinstance(item, dict):
            base.append(_fresh(item))
            continue
        index, matched = _first_keyed(base, item, rule, state)
        if index is None:
            base.append(_fresh(item))
            continue
        existing = base[index]
        base[index] = merged = _merge_value(existing, item, (*path, index), kind, patching)
        if state is not None:
            state.merged(index, existing, merged, item, matched)
    return base


class _Documents:
    """The documents a strategic patch applies to, found by Talos's identity (``document_key``) without a scan
    when ``indexed``. A deleted document leaves a hole until ``result``."""

    def __init__(self, documents: list[dict[str, Any]], indexed: bool) -> None:
        self._documents: list[dict[str, Any] | None] = list(documents)
        self._indexed = indexed
        self._keys: list[tuple[str, str, str] | None] = []
        self._heaps: dict[tuple[str, str, str], list[int]] = {}
        if indexed:
            for index in range(len(self._documents)):
                self._keys.append(None)
                self.rekey(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        document = self._documents[index]
        assert document is not None
        return document

    def find(self, key: tuple[str, str, str]) -> int | None:
        if not self._indexed:
            return next(
                (
                    index
                    for index, document in enumerate(self._documents)
                    if document is not None and document_key(document) == key
                ),
                None,
            )
        heap = self._heaps.get(key)
        while heap:
            if self._keys[heap[0]] == key:
                return heap[0]
            heapq.heappop(heap)
        return None

    def rekey(self, index: int) -> None:
        """Index the document at ``index`` again: deleting or merging fields may change its identity."""
        if not self._indexed:
            return
        document = self._documents[index]
        key = None if document is None else document_key(document)
        if key != self._keys[index]:
            self._keys[index] = key
            if key is not None:
                heapq.heappush(self._heaps.setdefault(key, []), index)

    def delete(self, index: int) -> None:
        self._documents[index] = None
        self.rekey(index)

    def append(self, document: dict[str, Any]) -> None:
        self._documents.append(document)
        if self._indexed:
            self._keys.append(None)
            self.rekey(len(self._documents) - 1)

    def replace(self, index: int, document: dict[str, Any]) -> None:
        self._documents[index] = document
        self.rekey(index)

    def result(self) -> list[dict[str, Any]]:
        return [document for document in self._documents if document is not None]


def _apply_strategic(
    documents: list[dict[str, Any]], patch: Patch, label: str, indexed: bool = False
) -> list[dict[str, Any]]:
    if not patch.documents:
        raise ValidationFailed(f"{label}: a strategic merge patch needs at least one document", FIELD)
    patching = _Patching(indexed)
    targets = _Documents(documents, indexed)
    for number, patch_document in enumerate(patch.documents, start=1):
        try:
            deletions, rest = _split_document(patch_document, number)
        except ValidationFailed as exc:
            raise ValidationFailed(f"{label}: {exc.message}", FIELD) from None
        key = document_key(patch_document)
        index = targets.find(key)
        where = f"{label}, document {number} ({_describe_document(patch_document)})"
        try:
            for deletion in deletions:
                if index is None:
                    # Deleting from a document the config does not have: Talos skips it silently.
                    break
                if not deletion.path:
                    targets.delete(index)
                    index = None
                    continue
                _apply_deletion(targets[index], deletion, patching)
            if index is not None and deletions:
                targets.rekey(index)
            if rest is None:
                continue
            if index is None:
                targets.append(_fresh(rest))
            else:
                target = targets[index]
                kind = target.get("kind")
                targets.replace(
                    index, _merge_value(target, rest, (), kind if isinstance(kind, str) else None, patching)
                )
        except ValidationFailed as exc:
            raise ValidationFailed(f"{where}: {exc.message}", FIELD) from None
    return targets.result()


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
    # The indexes that keep large patches linear rely on no list or mapping being shared (see _ListState).
    indexed = _is_tree(documents)
    for number, patch in enumerate(patches, start=1):
        label = f"patch {number}"
        if patch.kind == "strategic":
            documents = _apply_strategic(documents, patch, label, indexed)
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
