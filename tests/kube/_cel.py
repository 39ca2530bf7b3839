"""The CEL rules of a CRD (`x-kubernetes-validations`), run with cel-python the way the API server runs them.

Each rule runs with `self` bound to the value at its node (at the root,
`self.metadata` holds only `name` and `generateName`), on the defaulted
object. A rule that errors (a missing field, a type mismatch) fails, as it
does there. Transition rules (those reading `oldSelf`) run only on updates,
where the old object has a value at the same node: through object fields,
map keys and the keys of `x-kubernetes-list-type: map` lists.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import celpy

from tests.kube._errors import FieldError
from tests.kube._openapi import json_type
from tests.kube._structural import child, items

#: No old value at a node: a creation, or a node the old object lacks.
MISSING: Any = object()
_OLD_SELF = re.compile(r"\boldSelf\b")


@functools.cache
def _program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def compile_rules(schema: dict[str, Any]) -> int:
    """Compiles every CEL rule in `schema` now (cel-python raises the recursion limit when it first parses)."""
    count = 0
    for validation in schema.get("x-kubernetes-validations", []):
        _program(validation["rule"])
        count += 1
    for sub in [*schema.get("properties", {}).values(), schema.get("items"), schema.get("additionalProperties")]:
        if isinstance(sub, dict):
            count += compile_rules(sub)
    return count


#: Verdicts of (rule, self as JSON) already evaluated, None when the rule holds: property tests check the same
#: values many times over, and cel-python takes a millisecond per evaluation. Transition rules are not cached.
_VERDICTS: dict[tuple[str, str], str | None] = {}


def _evaluate(rule: str, value: Any, old: Any) -> str | None:
    """None if `rule` holds for `self` = `value` (and `oldSelf` = `old`), else why not."""
    activation = {"self": celpy.json_to_cel(value)}
    if old is not MISSING:
        activation["oldSelf"] = celpy.json_to_cel(old)
    result: object
    try:
        result = _program(rule).evaluate(activation)
    except celpy.CELEvalError as error:
        return f"{error.args[0] if error.args else error} evaluating rule: {rule}"
    if isinstance(result, celpy.CELEvalError):
        return f"{result.args[0] if result.args else result} evaluating rule: {rule}"
    if isinstance(result, celpy.celtypes.BoolType):
        return None if result else ""
    return f"rule did not evaluate to a boolean: {rule}"


def _verdict(rule: str, value: Any, old: Any) -> str | None:
    if old is not MISSING:
        return _evaluate(rule, value, old)
    key = (rule, json.dumps(value, sort_keys=True))
    if key not in _VERDICTS:
        if len(_VERDICTS) > 100_000:
            _VERDICTS.clear()
        _VERDICTS[key] = _evaluate(rule, value, old)
    return _VERDICTS[key]


def _as_self(value: Any, root: bool) -> Any:
    """The value rules see: at the root, metadata is cut down to what CEL may read of it."""
    if not root or not isinstance(value, dict) or not isinstance(value.get("metadata"), dict):
        return value
    meta = {key: value["metadata"][key] for key in ("name", "generateName") if key in value["metadata"]}
    return {**value, "metadata": meta}


def _message(validation: dict[str, Any], value: Any) -> str:
    """A failed rule's `messageExpression` evaluated (falling back to `message`, as the API server does)."""
    expression = validation.get("messageExpression")
    if expression:
        try:
            result = _program(expression).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError:
            result = None
        if isinstance(result, str) and result.strip():
            return result
    return str(validation.get("message", ""))


def node_errors(schema: dict[str, Any], value: Any, path: str = "", old: Any = MISSING) -> list[FieldError]:
    """The rules of this node alone (not its children) that `value` breaks."""
    errors = []
    root = not path
    for validation in schema.get("x-kubernetes-validations", []):
        rule = validation["rule"]
        if _OLD_SELF.search(rule) and old is MISSING:
            continue
        why = _verdict(rule, _as_self(value, root), _as_self(old, root) if old is not MISSING else old)
        if why is None:
            continue
        where = path + validation.get("fieldPath", "")
        message = why or _message(validation, _as_self(value, root)) or f"failed rule: {rule}"
        errors.append(FieldError(where, validation.get("reason", "FieldValueInvalid"), message, json_type(value)))
    return errors


def violations(schema: dict[str, Any], value: Any, path: str = "", old: Any = MISSING) -> list[FieldError]:
    """Every rule, at any depth, that `value` breaks (transition rules only where `old` has the node)."""
    errors = node_errors(schema, value, path, old)
    if isinstance(value, dict):
        for name, item in value.items():
            sub = child(schema, name)
            if sub is not None:
                old_item = old.get(name, MISSING) if isinstance(old, dict) else MISSING
                errors += violations(sub, item, f"{path}.{name}" if path else name, old_item)
    elif isinstance(value, list) and (sub := items(schema)) is not None:
        keys = schema.get("x-kubernetes-list-map-keys") if schema.get("x-kubernetes-list-type") == "map" else None
        for index, item in enumerate(value):
            errors += violations(sub, item, f"{path}[{index}]", _correlated(old, item, keys))
    return errors


def _correlated(old: Any, item: Any, keys: list[str] | None) -> Any:
    """The old list's item with the same map keys, for transition rules; MISSING for other lists."""
    if not keys or not isinstance(old, list) or not isinstance(item, dict):
        return MISSING
    identity = [item.get(key) for key in keys]
    return next((o for o in old if isinstance(o, dict) and [o.get(key) for key in keys] == identity), MISSING)
