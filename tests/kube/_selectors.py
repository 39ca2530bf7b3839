"""`labelSelector` and `fieldSelector` query parameters, as predicates over objects."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from tests.kube import _errors

Predicate = Callable[[Mapping[str, Any]], bool]

_KEY = r"[A-Za-z0-9][-A-Za-z0-9_./]*"
_VALUE = r"[-A-Za-z0-9_.]*"
_EXISTS = re.compile(rf"(?P<negated>!?)\s*(?P<key>{_KEY})")
_EQUALITY = re.compile(rf"(?P<key>{_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_VALUE})")
_SET = re.compile(rf"(?P<key>{_KEY})\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)")
_FIELD = re.compile(r"(?P<path>[A-Za-z0-9_.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*)")


def _terms(selector: str) -> list[str]:
    """Split on the commas that separate requirements, not on those inside `in (a, b)`."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(selector):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return [term.strip() for term in terms if term.strip()]


def _label_requirement(term: str) -> Callable[[Mapping[str, str]], bool]:
    if match := _SET.fullmatch(term):
        key, values = match["key"], {value.strip() for value in match["values"].split(",")}
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQUALITY.fullmatch(term):
        key, value = match["key"], match["value"]
        if match["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS.fullmatch(term):
        key, negated = match["key"], bool(match["negated"])
        return lambda labels: (key in labels) != negated
    raise _errors.bad_request(f"unable to parse requirement: {term!r}")


def label_selector(selector: str) -> Predicate:
    """Equality (`=`, `==`, `!=`), set (`in`, `notin`) and existence (`key`, `!key`) requirements, all ANDed."""
    requirements = [_label_requirement(term) for term in _terms(selector)]

    def matches(obj: Mapping[str, Any]) -> bool:
        labels = obj.get("metadata", {}).get("labels") or {}
        return all(requirement(labels) for requirement in requirements)

    return matches


def _field(obj: Mapping[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return "" if value is None else str(value)


def field_selector(selector: str) -> Predicate:
    """`path=value` / `path!=value` on dotted paths such as `metadata.name` and `metadata.namespace`, ANDed."""
    requirements: list[tuple[str, bool, str]] = []
    for term in _terms(selector):
        match = _FIELD.fullmatch(term)
        if match is None:
            raise _errors.bad_request(f"invalid field selector: {term!r}")
        requirements.append((match["path"], match["op"] != "!=", match["value"].strip()))

    def matches(obj: Mapping[str, Any]) -> bool:
        return all((_field(obj, path) == value) == equal for path, equal, value in requirements)

    return matches


def selected(params: Mapping[str, str]) -> Predicate:
    """The request's label and field selectors together; everything matches when there are none."""
    by_labels = label_selector(params.get("labelSelector", ""))
    by_fields = field_selector(params.get("fieldSelector", ""))
    return lambda obj: by_labels(obj) and by_fields(obj)
