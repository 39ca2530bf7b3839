"""`kubectl get`'s Table responses for custom resources: the CRD's `additionalPrinterColumns`, as the server fills them.

kubectl asks for `as=Table` and prints the columns the server sends; without them it prints NAME and AGE
only. Column paths are the JSONPath subset CRDs use (`.status.phase`, `.items[0]`, `[?(@.type=="Ready")]`),
evaluated here; like the API server, the first match is the cell and a missing one is empty (None).
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

#: The column a CRD version without printer columns gets (apiextensions' defaulting).
_DEFAULT_COLUMNS = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
_NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace.",
    "priority": 0,
}
_STEP = re.compile(
    r"\.(?P<field>[^.\[]+)|\[(?P<index>\d+)\]|\[\?\(@\.(?P<key>[\w.-]+)==(?P<value>\"[^\"]*\"|'[^']*')\)\]"
)


def wants_table(accept: str) -> bool:
    """Whether an Accept header asks for a meta.k8s.io Table (kubectl get's does)."""
    return any("as=Table" in part for part in accept.split(","))


def _lookup(obj: Any, path: str) -> Any:
    """The first value `path` selects in `obj`, or None."""
    values = [obj]
    position = 0
    path = path.strip().removeprefix("{").removesuffix("}")
    while position < len(path):
        step = _STEP.match(path, position)
        if step is None:
            return None
        position = step.end()
        if step["field"] is not None:
            values = [v[step["field"]] for v in values if isinstance(v, dict) and step["field"] in v]
        elif step["index"] is not None:
            index = int(step["index"])
            values = [v[index] for v in values if isinstance(v, list) and index < len(v)]
        else:
            wanted = step["value"][1:-1]
            values = [
                item
                for v in values
                if isinstance(v, list)
                for item in v
                if isinstance(item, dict) and str(item.get(step["key"])) == wanted
            ]
    return values[0] if values else None


def _age(timestamp: str, now: datetime.datetime) -> str:
    """A timestamp as kubectl's ages: 42s, 5m, 3h, 2d (apimachinery's HumanDuration, coarsely)."""
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h" if seconds < 172800 else f"{seconds // 86400}d"


def _cell(column: Mapping[str, Any], obj: Mapping[str, Any], now: datetime.datetime) -> Any:
    value = _lookup(obj, column["jsonPath"])
    if value is None:
        return None
    kind = column.get("type")
    if kind == "date":
        return _age(str(value), now)
    if kind == "string" and not isinstance(value, str):
        return json.dumps(value)
    return value


def _row_object(obj: Mapping[str, Any], include: str) -> dict[str, Any] | None:
    if include == "None":
        return None
    if include == "Object":
        return dict(obj)
    return {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj.get("metadata", {})}


def table(
    crd_version: Mapping[str, Any], objects: Iterable[Mapping[str, Any]], resource_version: str, include: str = ""
) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table of `objects` with the printer columns of their CRD's version."""
    columns = crd_version.get("additionalPrinterColumns") or _DEFAULT_COLUMNS
    now = datetime.datetime.now(datetime.UTC)
    definitions = [_NAME_COLUMN] + [
        {
            "name": column["name"],
            "type": column.get("type", "string"),
            "format": column.get("format", ""),
            "description": column.get("description", ""),
            "priority": column.get("priority", 0),
        }
        for column in columns
    ]
    rows = [
        {
            "cells": [obj.get("metadata", {}).get("name"), *(_cell(column, obj, now) for column in columns)],
            "object": _row_object(obj, include or "Metadata"),
        }
        for obj in objects
    ]
    return {
        "apiVersion": "meta.k8s.io/v1",
        "kind": "Table",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    }
