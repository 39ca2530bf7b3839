"""Validation of a value against a CRD's structural `openAPIV3Schema`, with the API server's field errors.

Not JSON Schema: OpenAPI 3.0's boolean `exclusiveMinimum`, `nullable`,
`x-kubernetes-int-or-string`, `x-kubernetes-list-type` (`set` and `map`
lists refuse duplicates), Go (RE2) patterns and the formats the API server
checks. Errors are worded as kube-openapi words them (`spec.replicas in body
should be greater than or equal to 0`), so that tests can match on a real
server's messages too.
"""

from __future__ import annotations

import base64
import datetime
import json
import re
import uuid
from collections.abc import Callable
from typing import Any

from tests.kube._errors import FieldError
from tests.kube._structural import child, items

_JSON_TYPES: dict[type, str] = {bool: "boolean", int: "integer", float: "number", str: "string"}


def go_regex(pattern: str) -> str:
    """A Go (RE2) pattern as a Python one with the same meaning: `\\w`, `\\d`, `\\s` and `\\b` are ASCII in RE2.

    (`$` at the end also matches before a final newline in Python, which RE2's does not: a value ending in a
    newline can pass a pattern here that a real server refuses.)
    """
    return pattern if pattern.startswith("(?a)") else "(?a)" + pattern


def json_type(value: Any) -> str:
    """The OpenAPI type name of a decoded JSON value."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _date_time(value: str) -> bool:
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return False
    return "T" in value.upper() or " " in value


def _parses(parse: Callable[[str], object]) -> Callable[[str], bool]:
    def check(value: str) -> bool:
        try:
            parse(value)
        except ValueError:
            return False
        return True

    return check


#: The string formats the API server checks (others, like `int32` on integers, are documentation only).
FORMATS: dict[str, Callable[[str], bool]] = {
    "date-time": _date_time,
    "date": _parses(datetime.date.fromisoformat),
    "uuid": _parses(uuid.UUID),
    "byte": _parses(lambda value: base64.b64decode(value, validate=True)),
}


def validate(schema: dict[str, Any], value: Any, path: str = "") -> list[FieldError]:
    """Every field error of `value` under `schema` (the pruned, defaulted object); [] when it is valid."""
    if value is None:
        if schema.get("nullable"):
            return []
        return [_type_error(schema, value, path)] if "type" in schema else []
    if schema.get("x-kubernetes-int-or-string"):
        if json_type(value) in ("integer", "string"):
            return _combinators(schema, value, path)
        return [FieldError(path, "FieldValueTypeInvalid", f"{path} in body must be of type integer,string", "")]
    expected = schema.get("type")
    actual = json_type(value)
    if expected and actual != expected and not (expected == "number" and actual == "integer"):
        return [_type_error(schema, value, path)]
    errors = _enum(schema, value, path)
    if isinstance(value, dict):
        errors += _object(schema, value, path)
    elif isinstance(value, list):
        errors += _array(schema, value, path)
    elif isinstance(value, str):
        errors += _string(schema, value, path)
    elif actual in ("integer", "number"):
        errors += _number(schema, value, path)
    return errors + _combinators(schema, value, path)


def _type_error(schema: dict[str, Any], value: Any, path: str) -> FieldError:
    actual = json_type(value)
    return FieldError(
        path, "FieldValueTypeInvalid", f'{path} in body must be of type {schema["type"]}: "{actual}"', actual
    )


def _enum(schema: dict[str, Any], value: Any, path: str) -> list[FieldError]:
    allowed = schema.get("enum")
    if allowed is None or value in allowed:
        return []
    supported = "supported values: " + ", ".join(json.dumps(option) for option in allowed)
    return [FieldError(path, "FieldValueNotSupported", supported, value)]


def _object(schema: dict[str, Any], value: dict[str, Any], path: str) -> list[FieldError]:
    errors = [
        FieldError(_join(path, name), "FieldValueRequired") for name in schema.get("required", []) if name not in value
    ]
    if "maxProperties" in schema and len(value) > schema["maxProperties"]:
        errors.append(
            FieldError(path, "FieldValueTooMany", f"must have at most {schema['maxProperties']} items", len(value))
        )
    if "minProperties" in schema and len(value) < schema["minProperties"]:
        detail = f"{path} in body should have at least {schema['minProperties']} properties"
        errors.append(FieldError(path, "FieldValueInvalid", detail, len(value)))
    root_like = not path or schema.get("x-kubernetes-embedded-resource")
    for name, item in value.items():
        sub = child(schema, name)
        if sub is not None and not (root_like and name == "metadata"):  # ObjectMeta has rules of its own
            errors += validate(sub, item, _join(path, name))
    return errors


def _array(schema: dict[str, Any], value: list[Any], path: str) -> list[FieldError]:
    errors = []
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        errors.append(
            FieldError(path, "FieldValueTooMany", f"must have at most {schema['maxItems']} items", len(value))
        )
    if "minItems" in schema and len(value) < schema["minItems"]:
        detail = f"{path} in body should have at least {schema['minItems']} items"
        errors.append(FieldError(path, "FieldValueInvalid", detail, len(value)))
    errors += _duplicates(schema, value, path)
    sub = items(schema)
    if sub is not None:
        for index, item in enumerate(value):
            errors += validate(sub, item, f"{path}[{index}]")
    return errors


def _duplicates(schema: dict[str, Any], value: list[Any], path: str) -> list[FieldError]:
    """`uniqueItems` and `x-kubernetes-list-type: set` refuse equal items; `map` lists equal keys."""
    list_type = schema.get("x-kubernetes-list-type")
    keys = schema.get("x-kubernetes-list-map-keys") or []
    seen: list[Any] = []
    errors = []
    for index, item in enumerate(value):
        if list_type == "map" and isinstance(item, dict):
            identity: Any = {key: item.get(key) for key in keys}
        elif list_type == "set" or schema.get("uniqueItems"):
            identity = item
        else:
            return []
        if identity in seen:
            errors.append(FieldError(f"{path}[{index}]", "FieldValueDuplicate", "", identity))
        seen.append(identity)
    return errors


def _string(schema: dict[str, Any], value: str, path: str) -> list[FieldError]:
    errors = []
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        errors.append(FieldError(path, "FieldValueTooLong", f"may not be longer than {schema['maxLength']}", value))
    if "minLength" in schema and len(value) < schema["minLength"]:
        detail = f"{path} in body should be at least {schema['minLength']} chars long"
        errors.append(FieldError(path, "FieldValueInvalid", detail, value))
    if "pattern" in schema and not re.search(go_regex(schema["pattern"]), value):
        detail = f"{path} in body should match '{schema['pattern']}'"
        errors.append(FieldError(path, "FieldValueInvalid", detail, value))
    check = FORMATS.get(schema.get("format", ""))
    if check is not None and not check(value):
        detail = f"{path} in body must be of type {schema['format']}: {json.dumps(value)}"
        errors.append(FieldError(path, "FieldValueInvalid", detail, value))
    return errors


def _number(schema: dict[str, Any], value: float, path: str) -> list[FieldError]:
    errors = []
    if "minimum" in schema:
        low, exclusive = schema["minimum"], schema.get("exclusiveMinimum") is True
        if value < low or (exclusive and value == low):
            relation = "greater than" if exclusive else "greater than or equal to"
            errors.append(FieldError(path, "FieldValueInvalid", f"{path} in body should be {relation} {low}", value))
    if "maximum" in schema:
        high, exclusive = schema["maximum"], schema.get("exclusiveMaximum") is True
        if value > high or (exclusive and value == high):
            relation = "less than" if exclusive else "less than or equal to"
            errors.append(FieldError(path, "FieldValueInvalid", f"{path} in body should be {relation} {high}", value))
    if "multipleOf" in schema and value % schema["multipleOf"]:
        detail = f"{path} in body should be a multiple of {schema['multipleOf']}"
        errors.append(FieldError(path, "FieldValueInvalid", detail, value))
    return errors


def _combinators(schema: dict[str, Any], value: Any, path: str) -> list[FieldError]:
    """`allOf`, `anyOf`, `oneOf` and `not`: in structural schemas they only restrict values (value validation)."""
    errors = []
    for sub in schema.get("allOf", []):
        errors += validate(sub, value, path)
    checks = (
        ("anyOf", lambda passed, total: passed >= 1, "must validate at least one schema (anyOf)"),
        ("oneOf", lambda passed, total: passed == 1, "must validate one and only one schema (oneOf)"),
    )
    for keyword, holds, detail in checks:
        options = schema.get(keyword)
        if options and not holds(sum(not validate(sub, value, path) for sub in options), len(options)):
            errors.append(FieldError(path, "FieldValueInvalid", detail, value))
    if "not" in schema and not validate(schema["not"], value, path):
        errors.append(FieldError(path, "FieldValueInvalid", "must not validate the schema (not)", value))
    return errors


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
