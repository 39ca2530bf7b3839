"""Values of a CRD's schema for property tests: what hypothesis-jsonschema draws from a structural schema.

A CRD's `openAPIV3Schema` is an OpenAPI v3 *structural* schema, not JSON
Schema: `x-kubernetes-int-or-string`, `x-kubernetes-preserve-unknown-fields`,
OpenAPI 3.0's boolean `exclusiveMinimum`, Go (RE2) regular expressions, and
unknown fields that the API server prunes (or, with `fieldValidation=Strict`,
refuses) instead of validating. The helpers here turn it into JSON Schema
that hypothesis-jsonschema generates from, and assemble objects from it.

Only generation lives here. What the API server itself does to a value
(defaulting, pruning, CEL rules) is asked of a real one (tests/kube/clusters.py,
`Cluster.dry_run_create`): a copy of its rules here would test the copy.
The CEL rules of a node reach generation only through the `keep` callback of
`strategy_for`, which the caller answers (with the API server).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from hypothesis import assume
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

__all__ = [
    "INT_OR_STRING",
    "Keep",
    "NodePath",
    "biased_coin",
    "boundary_values",
    "child",
    "go_regex",
    "integer_format_violations",
    "openapi_schema",
    "satisfying",
    "strategy_for",
    "to_json_schema",
]

#: Where a node sits in the resource: field names, and 0 for an array's items (`("spec", "groups", 0)`).
NodePath = tuple[str | int, ...]
#: Whether a value drawn for a node with CEL rules (`x-kubernetes-validations`) is one to keep: (path, node, value).
Keep = Callable[[NodePath, dict[str, Any], Any], bool]

#: The custom format hypothesis-jsonschema draws the string side of an int-or-string from.
INT_OR_STRING = "x-int-or-string"
INT64 = (-(2**63), 2**63 - 1)
INT32 = (-(2**31), 2**31 - 1)
#: Values of free-form (`x-kubernetes-preserve-unknown-fields`) objects: any small JSON value.
_SCALAR: dict[str, Any] = {
    "anyOf": [
        {"type": "null"},
        {"type": "boolean"},
        {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]},
        {"type": "number"},
        {"type": "string", "maxLength": 8},
    ]
}
_FREE_VALUE: dict[str, Any] = {"anyOf": [*_SCALAR["anyOf"], {"type": "array", "maxItems": 2, "items": _SCALAR}]}
#: Keywords that say nothing about which values are valid (or that the helpers below apply instead).
_ANNOTATIONS = {"description", "default", "example", "nullable", "title", "externalDocs"}
#: Keywords `strategy_for` builds objects and arrays from; any other one there is refused, loudly.
_OBJECT_KEYWORDS = {"type", "properties", "required", "additionalProperties", "propertyNames", "maxProperties"}
_ARRAY_KEYWORDS = {"type", "items", "minItems", "maxItems", "uniqueItems"}


def openapi_schema(crd_path: Path, version: str) -> dict[str, Any]:
    """The `openAPIV3Schema` of one version of the CRD in `crd_path`."""
    crd = yaml.safe_load(crd_path.read_text())
    served = next(v for v in crd["spec"]["versions"] if v["name"] == version)
    return dict(served["schema"]["openAPIV3Schema"])


def go_regex(pattern: str) -> str:
    """A Go (RE2) pattern as a Python one with the same meaning: `\\w`, `\\d`, `\\s` and `\\b` are ASCII in RE2.

    (`$` at the end also matches before a final newline in Python, which RE2's does not: a value ending in a
    newline can match here and be refused by a real server.)
    """
    return pattern if pattern.startswith("(?a)") else "(?a)" + pattern


def child(schema: dict[str, Any], name: str) -> dict[str, Any] | None:
    """The schema of field `name` of an object of `schema`, if it has one."""
    extra = schema.get("additionalProperties")
    sub = schema.get("properties", {}).get(name, extra if isinstance(extra, dict) else None)
    return sub if isinstance(sub, dict) else None


def to_json_schema(
    node: dict[str, Any], *, max_items: int = 3, max_properties: int = 3, max_length: int = 12
) -> dict[str, Any]:
    """JSON Schema (draft 4 to 7) accepting what the structural schema `node` accepts, capped in size.

    - `x-kubernetes-int-or-string`: an int64, or a string of format INT_OR_STRING
      (any string; pass a strategy for it in `custom_formats`).
    - `x-kubernetes-preserve-unknown-fields` without properties: a small free-form object.
    - objects with `properties`: `additionalProperties: false`, since the API
      server prunes unknown fields and the stored object never has them.
    - boolean `exclusiveMinimum`/`exclusiveMaximum` become the numeric form.
    - integers get their int64 (or `format: int32`) bounds; other formats are dropped.
    - patterns get RE2's meaning (`go_regex`).
    - `maxItems`, `maxProperties` and `maxLength` (free strings only: no
      pattern, no enum) are capped to keep examples small; `minItems` and
      `minLength` are kept, and the caps never go below them.
    - the x-kubernetes-* keywords, `default` and `nullable` are dropped (no null is drawn).
    """

    def convert(schema: dict[str, Any]) -> dict[str, Any]:
        if schema.get("x-kubernetes-int-or-string"):
            return {
                "anyOf": [
                    {"type": "integer", "minimum": INT64[0], "maximum": INT64[1]},
                    {"type": "string", "format": INT_OR_STRING},
                ]
            }
        if schema.get("x-kubernetes-preserve-unknown-fields") and "properties" not in schema:
            return {
                "type": "object",
                "maxProperties": max_properties,
                "propertyNames": {"maxLength": max_length},
                "additionalProperties": _FREE_VALUE,
            }
        out: dict[str, Any] = {}
        for key, value in schema.items():
            if key.startswith("x-kubernetes-") or key in _ANNOTATIONS or key == "format":
                continue
            if key == "properties":
                out[key] = {name: convert(sub) for name, sub in value.items()}
            elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
                out[key] = convert(value)
            elif key in ("anyOf", "allOf", "oneOf"):
                out[key] = [convert(sub) for sub in value]
            elif key == "pattern":
                out[key] = go_regex(value)
            else:
                out[key] = copy.deepcopy(value)
        for bound in ("Minimum", "Maximum"):
            exclusive = out.pop(f"exclusive{bound}", None)
            if exclusive is True and bound.lower() in out:
                out[f"exclusive{bound}"] = out.pop(bound.lower())
            elif exclusive not in (None, True, False):
                out[f"exclusive{bound}"] = exclusive
        kind = out.get("type")
        if kind == "integer":
            low, high = INT32 if schema.get("format") == "int32" else INT64
            if "minimum" not in out and "exclusiveMinimum" not in out:
                out["minimum"] = low
            if "maximum" not in out and "exclusiveMaximum" not in out:
                out["maximum"] = high
        elif kind == "object":
            if "properties" in out and "additionalProperties" not in out:
                out["additionalProperties"] = False
            if isinstance(out.get("additionalProperties"), dict):
                out["maxProperties"] = _cap(out, "minProperties", "maxProperties", max_properties)
                out.setdefault("propertyNames", {"maxLength": max_length})
        elif kind == "array":
            out["maxItems"] = _cap(out, "minItems", "maxItems", max_items)
        elif kind == "string" and "pattern" not in out and "enum" not in out:
            out["maxLength"] = _cap(out, "minLength", "maxLength", max_length)
        return out

    return convert(node)


def _cap(schema: dict[str, Any], low: str, high: str, cap: int) -> int:
    return int(max(schema.get(low, 0), min(schema.get(high, cap), cap)))


def strategy_for(
    schema: dict[str, Any],
    custom_formats: dict[str, st.SearchStrategy[str]] | None = None,
    *,
    keep: Keep | None = None,
    path: NodePath = (),
    presence: dict[NodePath, float] | None = None,
    **caps: int,
) -> st.SearchStrategy[Any]:
    """Values of the structural `schema` (at `path` in the resource), drawn from a strategy built once.

    Every leaf (strings, numbers, enums, int-or-strings) comes from
    hypothesis-jsonschema's `from_schema` on `to_json_schema(leaf)`, or half
    the time from the leaf's special values: the edges of its range
    (`boundary_values`) and its default. Objects and arrays are assembled
    here (`_objects`, `dictionaries`, `lists`):
    hypothesis-jsonschema 0.23's own object strategy rebuilds its
    sub-strategies on every draw (a fifth of a second per ZeroCopyModel, and
    minutes of shrinking), and it calls `many(...).more()`, which current
    Hypothesis no longer has. An optional field is there half the time, or
    with the probability `presence[its path]`.

    CEL rules are not evaluated here. A node that has some is redrawn until
    `keep(path, node, value)` says yes (`satisfying`), so that a broken rule
    redraws that node, not the whole object: with a dozen rules on optional
    fields, whole objects that keep every one are a few in a hundred. Without
    `keep` the rules are ignored, and the caller must expect values the API
    server refuses.
    """
    formats = custom_formats or {}

    def build(node: dict[str, Any], where: NodePath) -> st.SearchStrategy[Any]:
        converted = to_json_schema(node, **caps)
        kind = converted.get("type")
        values: st.SearchStrategy[Any]
        if kind == "object":
            _refuse_unknown(converted, _OBJECT_KEYWORDS)
            properties = node.get("properties", {})
            if properties:
                required = set(node.get("required", []))
                values = _objects(
                    {name: build(sub, (*where, name)) for name, sub in properties.items() if name in required},
                    {name: build(sub, (*where, name)) for name, sub in properties.items() if name not in required},
                    {name: p for name in properties if (p := (presence or {}).get((*where, name))) is not None},
                )
            else:
                extra = node.get("additionalProperties")
                if isinstance(extra, dict) or "additionalProperties" in converted:
                    keys = from_schema({"type": "string", **converted.get("propertyNames", {})})
                    items = (
                        build(extra, (*where, "*"))
                        if isinstance(extra, dict)
                        else from_schema(converted["additionalProperties"])
                    )
                    values = st.dictionaries(keys, items, max_size=converted.get("maxProperties"))
                else:
                    values = st.builds(dict)  # no fields, and unknown ones are pruned
        elif kind == "array":
            _refuse_unknown(converted, _ARRAY_KEYWORDS)
            unique_by: Callable[[Any], Any] | None = repr if converted.get("uniqueItems") else None
            values = st.lists(
                build(node["items"], (*where, 0)),
                min_size=converted.get("minItems", 0),
                max_size=converted["maxItems"],
                unique_by=unique_by,
            )
        else:
            values = from_schema(converted, custom_formats=formats)
            # Values random draws seldom hit, and where layers disagree: the range's edges, and the
            # default (valid by construction: the API server checks defaults against the schema).
            special = [*boundary_values(converted), *([node["default"]] if "default" in node else [])]
            if special:
                values = st.one_of(values, st.sampled_from(special))
        if keep is not None and node.get("x-kubernetes-validations"):
            values = satisfying(values, lambda value: keep(where, node, value))
        return values

    return build(schema, path)


def _objects(
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]],
    odds: dict[str, float] | None = None,
) -> st.SearchStrategy[dict[str, Any]]:
    """Like `fixed_dictionaries`, but each optional field is there half the time (a fair coin, shrinking to absent),
    or with probability `odds[name]`.

    With `fixed_dictionaries` an optional field of an object with a dozen is
    there a fifth of the time or less, so a value that matters only in one
    field (0 replicas, 5e-324 CPUs) comes up too seldom to be found.
    """
    coins = {name: biased_coin(p) for name, p in (odds or {}).items()}

    @st.composite
    def draw_object(draw: st.DrawFn) -> dict[str, Any]:
        value = {name: draw(strategy) for name, strategy in required.items()}
        for name, strategy in optional.items():
            if draw(coins.get(name, st.booleans())):
                value[name] = draw(strategy)
        return value

    return draw_object()


def biased_coin(p: float, bits: int = 8) -> st.SearchStrategy[bool]:
    """True with probability `p` (to 2**-bits), shrinking to False.

    Made of fair coins, `booleans()`: Hypothesis' integers and floats lean
    hard towards their edges (`integers(0, 99) >= 10` holds about 60% of the
    time in a larger draw). The coins are the binary digits of a number U in
    [0, 1), compared with 1 - p as they come: False as soon as U < 1 - p.
    """

    @st.composite
    def flip(draw: st.DrawFn) -> bool:
        rest = 1 - p
        for _ in range(bits):
            rest *= 2
            digit = rest >= 1
            rest -= digit
            coin = draw(st.booleans())
            if coin != digit:
                return coin  # U's digit above 1 - p's: U is larger; below: smaller
        return rest == 0  # equal so far: U >= 1 - p if nothing of 1 - p is left

    return flip()


def satisfying(
    values: st.SearchStrategy[Any], predicate: Callable[[Any], bool], tries: int = 10
) -> st.SearchStrategy[Any]:
    """`values.filter(predicate)` with more tries than Hypothesis' three before the whole example is given up.

    "Exactly one of two optional fields" holds for half the draws at best; three
    misses in a row would throw away the whole resource drawn around it, one
    time in eight or more.
    """

    @st.composite
    def draw_satisfying(draw: st.DrawFn) -> Any:
        for _ in range(tries):
            value = draw(values)
            if predicate(value):
                return value
        assume(False)

    return draw_satisfying()


def boundary_values(schema: dict[str, Any]) -> list[int | float]:
    """The edges of a numeric range: each bound and its nearest neighbour inside (the next float, or +-1).

    Random numbers seldom land on them, and that is where limits disagree
    (0 replicas allowed by one layer but not the next, 5e-324 CPUs, an int64 into an int32).
    """
    kind = schema.get("type")
    if kind not in ("integer", "number") or "enum" in schema or "multipleOf" in schema:
        return []

    def step(value: float, towards: float) -> int | float:
        return int(value + (1 if towards > value else -1)) if kind == "integer" else math.nextafter(value, towards)

    low, high = schema.get("minimum"), schema.get("maximum")
    if "exclusiveMinimum" in schema:
        low = step(schema["exclusiveMinimum"], math.inf)
    if "exclusiveMaximum" in schema:
        high = step(schema["exclusiveMaximum"], -math.inf)
    edges: list[int | float] = []
    if low is not None:
        edges += [low, step(low, math.inf)]
    if high is not None:
        edges += [step(high, -math.inf), high]
    inside = [e for e in edges if (low is None or e >= low) and (high is None or e <= high)]
    return sorted(set(inside), key=inside.index)


def integer_format_violations(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    """Integers outside their `format: int32`/`int64`: the controller's Go types cannot hold them."""
    broken = []
    if isinstance(value, int) and not isinstance(value, bool) and schema.get("format") in ("int32", "int64"):
        low, high = INT32 if schema["format"] == "int32" else INT64
        if not low <= value <= high:
            broken.append(f"{path}: {value} does not fit {schema['format']}")
    elif isinstance(value, dict):
        for name, item in value.items():
            sub = child(schema, name)
            if sub is not None:
                broken += integer_format_violations(sub, item, f"{path}.{name}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            broken += integer_format_violations(schema["items"], item, f"{path}[{index}]")
    return broken


def _refuse_unknown(node: dict[str, Any], known: set[str]) -> None:
    unknown = set(node) - known
    if unknown:
        raise NotImplementedError(f"strategy_for does not handle {sorted(unknown)} (in {node})")
