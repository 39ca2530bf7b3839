"""Server-side apply: field ownership (`metadata.managedFields`), removal of dropped fields, conflicts.

Each field manager owns a set of field paths in fieldsV1 form: `f:<name>` for map keys, `k:{...}` for items
of lists with `x-kubernetes-list-type: map` (their keys from `x-kubernetes-list-map-keys`), `v:<json>` for
items of `set` lists; any other list (atomic) and any `x-kubernetes-map-type: atomic` map is owned whole.
An apply makes its manager own exactly the fields it sent: fields it owned before and dropped are removed
unless another manager owns them, and fields others own with a different value are a 409 unless forced.
Other writes record an `Update` entry owning the fields they changed (taken from whoever owned them).

Simplifications: built-in kinds have no schema here, so all their lists are atomic; removing a field leaves
its parent map, even if empty.
"""

from __future__ import annotations

import copy
import datetime
import json
from collections.abc import Iterable
from typing import Any

import kmock

from tests.kube import _errors

Path = tuple[str, ...]
_MISSING = object()
#: Fields nobody owns: the server's or the URL's.
_UNOWNED = {
    ("f:apiVersion",),
    ("f:kind",),
    *(
        ("f:metadata", f"f:{name}")
        for name in (
            "name",
            "namespace",
            "uid",
            "resourceVersion",
            "generation",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "managedFields",
            "selfLink",
        )
    ),
}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _child_schema(schema: dict[str, Any] | None, key: str) -> dict[str, Any] | None:
    if schema is None:
        return None
    if key in (schema.get("properties") or {}):
        return dict(schema["properties"][key])
    extra = schema.get("additionalProperties")
    return dict(extra) if isinstance(extra, dict) else None


def _map_keys(schema: dict[str, Any] | None) -> list[str] | None:
    if schema is not None and schema.get("x-kubernetes-list-type") == "map":
        return list(schema.get("x-kubernetes-list-map-keys") or [])
    return None


def _item_key(item: Any, keys: list[str]) -> str:
    return "k:" + json.dumps({key: item.get(key) for key in keys if key in item}, separators=(",", ":"))


def fields(value: Any, schema: dict[str, Any] | None, prefix: Path = ()) -> set[Path]:
    """The paths `value` sets: leaves, and map-list items themselves (`.` in fieldsV1)."""
    found: set[Path] = set()
    if isinstance(value, dict) and (schema is None or schema.get("x-kubernetes-map-type") != "atomic"):
        if not value and prefix:
            return {prefix}
        for key, child in value.items():
            found |= fields(child, _child_schema(schema, key), (*prefix, f"f:{key}"))
        return found
    if isinstance(value, list) and schema is not None:
        items = schema.get("items") if isinstance(schema.get("items"), dict) else None
        keys = _map_keys(schema)
        if keys and all(isinstance(item, dict) for item in value):
            for item in value:
                path = (*prefix, _item_key(item, keys))
                found |= {path} | fields(item, items, path)
            return found
        if schema.get("x-kubernetes-list-type") == "set":
            return {(*prefix, "v:" + json.dumps(item, separators=(",", ":"))) for item in value}
    return {prefix}


def owned(obj: dict[str, Any], schema: dict[str, Any] | None, status_separate: bool) -> set[Path]:
    found = {path for path in fields(obj, schema) if path[:2] not in _UNOWNED and path[:1] not in _UNOWNED}
    if status_separate:
        found = {path for path in found if path[:1] != ("f:status",)}
    return found


def _step(value: Any, element: str) -> Any:
    kind, _, rest = element.partition(":")
    if kind == "f":
        return value.get(rest, _MISSING) if isinstance(value, dict) else _MISSING
    if isinstance(value, list):
        wanted = json.loads(rest)
        for item in value:
            if kind == "k" and isinstance(item, dict) and all(item.get(k) == v for k, v in wanted.items()):
                return item
            if kind == "v" and item == wanted:
                return item
    return _MISSING


def value_at(obj: Any, path: Path) -> Any:
    for element in path:
        obj = _step(obj, element)
        if obj is _MISSING:
            break
    return obj


def _remove(obj: Any, path: Path) -> None:
    parent = value_at(obj, path[:-1])
    kind, _, rest = path[-1].partition(":")
    if kind == "f" and isinstance(parent, dict):
        parent.pop(rest, None)
    elif isinstance(parent, list):
        item = _step(parent, path[-1])
        if item is not _MISSING:
            parent.remove(item)


def merge(live: Any, applied: Any, schema: dict[str, Any] | None) -> Any:
    """`applied` over `live`: maps merge by key, map lists by item key, sets by value; the rest replaces."""
    if isinstance(applied, dict) and isinstance(live, dict):
        if schema is not None and schema.get("x-kubernetes-map-type") == "atomic":
            return copy.deepcopy(applied)
        result = copy.deepcopy(live)
        for key, value in applied.items():
            if value is None:
                result.pop(key, None)
            else:
                result[key] = merge(live.get(key), value, _child_schema(schema, key))
        return result
    if isinstance(applied, list) and isinstance(live, list) and schema is not None:
        keys = _map_keys(schema)
        items = schema.get("items") if isinstance(schema.get("items"), dict) else None
        if keys and all(isinstance(item, dict) for item in [*live, *applied]):
            result = copy.deepcopy(live)
            for item in applied:
                key = _item_key(item, keys)
                index = next((i for i, old in enumerate(result) if _item_key(old, keys) == key), None)
                if index is None:
                    result.append(copy.deepcopy(item))
                else:
                    result[index] = merge(result[index], item, items)
            return result
        if schema.get("x-kubernetes-list-type") == "set":
            return copy.deepcopy(live) + [copy.deepcopy(item) for item in applied if item not in live]
    return copy.deepcopy(applied)


def describe(path: Path) -> str:
    """`.spec.serving.replicas`, `.spec.ports[port=80]`, `.spec.set[="a"]`, as the API server names fields."""
    text = ""
    for element in path:
        kind, _, rest = element.partition(":")
        if kind == "f":
            text += f".{rest}"
        elif kind == "k":
            text += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in json.loads(rest).items()) + "]"
        else:
            text += f"[={rest}]"
    return text


# -- managedFields ------------------------------------------------------------------------------------------


def to_fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for element in path:
            node = node.setdefault(element, {})
        node["."] = {}
    return _collapse(tree)


def _collapse(node: dict[str, Any]) -> dict[str, Any]:
    """Leaves are `{}`; a member with children keeps `.`."""
    children = {key: _collapse(value) for key, value in node.items() if key != "."}
    if "." in node and children:
        return {".": {}, **children}
    return children


def from_fields_v1(tree: dict[str, Any], prefix: Path = ()) -> set[Path]:
    found: set[Path] = set()
    if not tree or "." in tree:
        found.add(prefix)
    for key, child in tree.items():
        if key != ".":
            found |= from_fields_v1(child, (*prefix, key))
    return found - {()}


def _entries(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return copy.deepcopy(list((obj.get("metadata") or {}).get("managedFields") or []))


def _ident(entry: dict[str, Any]) -> tuple[str, str, str]:
    return (entry.get("manager", ""), entry.get("operation", ""), entry.get("subresource", ""))


def _set_entry(
    entries: list[dict[str, Any]], ident: tuple[str, str, str], paths: set[Path], api_version: str
) -> list[dict[str, Any]]:
    """`entries` with the one for `ident` owning `paths` (dropped if none); its time kept if unchanged."""
    manager, operation, subresource = ident
    result = []
    for entry in entries:
        if _ident(entry) == ident:
            if paths == from_fields_v1(entry.get("fieldsV1") or {}) and entry.get("apiVersion") == api_version:
                return entries
            continue
        result.append(entry)
    if paths:
        entry = {"manager": manager, "operation": operation, "apiVersion": api_version, "time": _now()}
        entry.update(fieldsType="FieldsV1", fieldsV1=to_fields_v1(paths))
        if subresource:
            entry["subresource"] = subresource
        result.append(entry)
    return result


def _without(entries: list[dict[str, Any]], taken: set[Path], keep: tuple[str, str, str]) -> list[dict[str, Any]]:
    """`entries` minus ownership of `taken` for everyone but `keep` (entries left owning nothing go)."""
    result = []
    for entry in entries:
        paths = from_fields_v1(entry.get("fieldsV1") or {})
        if _ident(entry) == keep or not paths & taken:
            result.append(entry)
        elif paths - taken:
            result.append({**entry, "fieldsV1": to_fields_v1(paths - taken), "time": _now()})
    return result


def record_update(
    current: dict[str, Any] | None,
    updated: dict[str, Any],
    schema: dict[str, Any] | None,
    manager: str,
    subresource: str | None,
    status_separate: bool,
) -> list[dict[str, Any]]:
    """The managedFields after a create, update or non-apply patch: `manager` owns what it changed."""
    entries = _entries(current) if current is not None else []
    api_version = updated.get("apiVersion", "")
    separate = status_separate and subresource != "status"
    after = owned(updated, schema, separate)
    before = owned(current, schema, separate) if current is not None else set()
    changed = {path for path in after if current is None or value_at(current, path) != value_at(updated, path)}
    gone = before - after
    ident = (manager, "Update", subresource or "")
    entries = _without(entries, changed | gone, ident)
    mine = next((e for e in entries if _ident(e) == ident), None)
    paths = (from_fields_v1(mine.get("fieldsV1") or {}) if mine else set()) - gone
    return _set_entry(entries, ident, paths | changed, api_version)


def apply(
    resource: kmock.resource,
    current: dict[str, Any] | None,
    applied: dict[str, Any],
    schema: dict[str, Any] | None,
    manager: str,
    force: bool,
    subresource: str | None,
) -> dict[str, Any]:
    """The object a server-side apply makes of `current` (None: it creates), managedFields included;
    raises 409 for fields other managers own with other values, unless `force` (then it takes them)."""
    if not isinstance(applied, dict):
        raise _errors.bad_request("an apply patch must be an object")
    if (applied.get("metadata") or {}).get("managedFields"):
        raise _errors.bad_request("metadata.managedFields must be nil")
    live = current if current is not None else {}
    api_version = applied.get("apiVersion") or live.get("apiVersion", "")
    ident = (manager, "Apply", subresource or "")
    entries = _entries(live)
    sent = owned(applied, schema, False)
    if subresource == "status":
        sent = {path for path in sent if path[:1] == ("f:status",)}
    conflicts: dict[Path, set[str]] = {}
    for entry in entries:
        if _ident(entry) == ident:
            continue
        for path in from_fields_v1(entry.get("fieldsV1") or {}) & sent:
            if path[-1][:2] not in {"k:", "v:"} and value_at(applied, path) != value_at(live, path):
                conflicts.setdefault(path, set()).add(entry.get("manager", ""))
    if conflicts and not force:
        listed = [
            (name, entry_version(entries, name), describe(path))
            for path, names in sorted(conflicts.items())
            for name in sorted(names)
        ]
        raise _errors.apply_conflicts(resource, str(live.get("metadata", {}).get("name", "")), listed)
    entries = _without(entries, set(conflicts), ident)
    mine = next((e for e in entries if _ident(e) == ident), None)
    before = from_fields_v1(mine.get("fieldsV1") or {}) if mine else set()
    result = merge(live, applied, schema)
    others = set().union(*(from_fields_v1(e.get("fieldsV1") or {}) for e in entries if _ident(e) != ident))
    for path in sorted(before - sent - others, key=len, reverse=True):
        if not _is_item_key(path) and not any(other[: len(path)] == path for other in others):
            _remove(result, path)
    result.setdefault("metadata", {})["managedFields"] = _set_entry(entries, ident, sent, api_version)
    return dict(result)


def entry_version(entries: list[dict[str, Any]], manager: str) -> str:
    return next((e.get("apiVersion", "") for e in entries if e.get("manager") == manager), "")


def _is_item_key(path: Path) -> bool:
    """Whether `path` is a key field of a map-list item (kept while the item is)."""
    return len(path) >= 2 and path[-2].startswith("k:") and path[-1][2:] in json.loads(path[-2][2:])


def keep_present(obj: dict[str, Any]) -> None:
    """Drop, in place, ownership of fields the stored object lacks (pruned, or status on the main resource)."""
    entries = []
    for entry in _entries(obj):
        paths = {path for path in from_fields_v1(entry.get("fieldsV1") or {}) if value_at(obj, path) is not _MISSING}
        if paths:
            entries.append({**entry, "fieldsV1": to_fields_v1(paths)})
    meta = obj.setdefault("metadata", {})
    if entries:
        meta["managedFields"] = entries
    else:
        meta.pop("managedFields", None)
