"""What the API server changes in a custom resource before it validates it: pruning, then defaulting.

A CRD's `openAPIV3Schema` is a *structural* schema: every field has a
schema, found by `child`. The API server drops fields it has none for
(unless `x-kubernetes-preserve-unknown-fields` keeps them), reports them to
clients that asked for strict field validation, drops `null`s of
non-nullable fields, then fills in `default`s. The order matters: a default
never brings back a pruned field, and CEL rules see the defaulted object.
"""

from __future__ import annotations

import copy
from typing import Any

#: Fields every object has beside what its schema says (pruned only by the API server's own ObjectMeta decoding).
_ROOT_FIELDS = ("apiVersion", "kind", "metadata")


def child(schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The schema of field `name` of an object of `schema`, if it has one."""
    extra = schema.get("additionalProperties")
    sub = schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else None)
    return sub if isinstance(sub, dict) else None


def items(schema: dict[str, Any]) -> dict[str, Any] | None:
    """The schema of the items of an array of `schema`, if it has one."""
    sub = schema.get("items")
    return sub if isinstance(sub, dict) else None


def _keeps_unknown(schema: dict[str, Any]) -> bool:
    return bool(schema.get("additionalProperties") is True or schema.get("x-kubernetes-preserve-unknown-fields"))


def pruned_fields(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Fields of `value` that the structural `schema` does not know, as `spec.a[0].b`: the API server drops
    them (and with `fieldValidation=Strict` refuses the request, naming them)."""
    return prune(schema, copy.deepcopy(value), path, root=False)


def prune(schema: dict[str, Any], value: Any, path: str = "", *, root: bool = True) -> list[str]:
    """Drop, in place, the fields of `value` that `schema` does not know; the paths of those dropped.

    At the root (and in `x-kubernetes-embedded-resource`s) apiVersion, kind and metadata always stay.
    """
    dropped: list[str] = []
    if isinstance(value, dict) and not schema.get("x-kubernetes-int-or-string"):
        embedded = root or schema.get("x-kubernetes-embedded-resource")
        for name in list(value):
            if embedded and name in _ROOT_FIELDS:
                continue  # ObjectMeta's own decoding applies there, not the CRD's schema
            sub = child(schema, name)
            where = f"{path}.{name}" if path else name
            if sub is not None:
                dropped += prune(sub, value[name], where, root=False)
            elif not _keeps_unknown(schema):
                del value[name]
                dropped.append(where)
    elif isinstance(value, list) and (sub := items(schema)) is not None:
        for index, item in enumerate(value):
            dropped += prune(sub, item, f"{path}[{index}]", root=False)
    return dropped


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` with the schema's defaults filled in, as the API server stores it (structural defaulting).

    A default fills a missing field (or a `null` one that is not `nullable`)
    of an object that is there; it never creates the object around it. The
    defaulted value is then defaulted too. Non-nullable `null`s without a
    default are dropped.
    """
    value = copy.deepcopy(value)
    _default_in_place(schema, value)
    return value


def _default_in_place(schema: dict[str, Any], value: Any) -> None:
    if isinstance(value, dict):
        for name in list(value):
            sub = child(schema, name)
            if value[name] is None and sub is not None and not sub.get("nullable"):
                del value[name]
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
        for name, item in value.items():
            sub = child(schema, name)
            if sub is not None:
                _default_in_place(sub, item)
    elif isinstance(value, list) and (sub := items(schema)) is not None:
        for item in value:
            _default_in_place(sub, item)
