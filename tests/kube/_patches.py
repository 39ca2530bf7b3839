"""The PATCH flavours the API server accepts, applied to plain JSON-like objects.

Simplifications, on purpose: strategic-merge patches (built-in kinds only: custom resources answer 415) are
applied as JSON merge patches (their `$`-directives dropped), so lists are replaced rather than merged by key,
which is exact for what kubectl sends for flat built-ins like ConfigMaps. Server-side apply, with its field
ownership, is `_apply`'s.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch
import jsonpointer

from tests.kube import _errors

MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
JSON_PATCH = "application/json-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"


def accepted_patch_types(*, custom: bool) -> list[str]:
    """The patch types the API server takes, in its order: custom resources have no strategic merge (415)."""
    return (
        [JSON_PATCH, MERGE_PATCH, APPLY_PATCH]
        if custom
        else [STRATEGIC_MERGE_PATCH, JSON_PATCH, MERGE_PATCH, APPLY_PATCH]
    )


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: dicts merge recursively, `null` deletes a key, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge(result.get(key), value)
    return result


def without_directives(patch: Any) -> Any:
    """A strategic-merge patch minus its `$patch`, `$retainKeys`, `$setElementOrder/...` directives."""
    if isinstance(patch, dict):
        return {key: without_directives(value) for key, value in patch.items() if not key.startswith("$")}
    if isinstance(patch, list):
        return [without_directives(item) for item in patch]
    return patch


def apply_patch(current: dict[str, Any], patch_type: str, patch: Any) -> dict[str, Any]:
    """The object `current` would become; raises the API server's 4xx errors for unusable patches."""
    if patch_type == JSON_PATCH:
        return _apply_json_patch(current, patch)
    if not isinstance(patch, dict):
        raise _errors.bad_request(f"a {patch_type} body must be an object")
    if patch_type == STRATEGIC_MERGE_PATCH:
        patch = without_directives(patch)
    result = merge(current, patch)
    assert isinstance(result, dict)  # a dict merged into a dict
    return result


def _apply_json_patch(current: dict[str, Any], ops: Any) -> dict[str, Any]:
    """RFC 6902. A failed `test` op is 422 like on the real server: kopf retries on 422, but forever on 500."""
    if not isinstance(ops, list):
        raise _errors.bad_request("a json-patch body must be a list of operations")
    try:
        result = jsonpatch.apply_patch(current, ops)
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as exc:
        raise _errors.invalid(f"the json-patch cannot be applied: {exc}") from exc
    if not isinstance(result, dict):
        raise _errors.invalid("the json-patch replaced the whole object with a non-object")
    return result
