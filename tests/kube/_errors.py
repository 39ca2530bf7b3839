"""The failures the API server reports, as `kind: Status` bodies with the codes and reasons clients branch on.

kubectl and kopf decide what to do next from the code and `reason` (e.g. kubectl apply creates on NotFound,
kopf retries its finalizer patch on 422), so these mirror the real API server's wording.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import kmock


def _qualified(resource: kmock.resource) -> str:
    """`plural.group` as the API server names resources in messages (`pods` for the core group)."""
    return f"{resource.plural}.{resource.group}" if resource.group else str(resource.plural)


def _details(resource: kmock.resource, name: str | None) -> dict[str, str]:
    return {"name": name or "", "group": resource.group or "", "kind": resource.plural or ""}


def unknown_resource() -> kmock.KubernetesError:
    return kmock.KubernetesError(404, "NotFound", "the server could not find the requested resource", {})


def not_found(resource: kmock.resource, name: str) -> kmock.KubernetesError:
    message = f'{_qualified(resource)} "{name}" not found'
    return kmock.KubernetesError(404, "NotFound", message, _details(resource, name))


def already_exists(resource: kmock.resource, name: str) -> kmock.KubernetesError:
    message = f'{_qualified(resource)} "{name}" already exists'
    return kmock.KubernetesError(409, "AlreadyExists", message, _details(resource, name))


def conflict(resource: kmock.resource, name: str) -> kmock.KubernetesError:
    message = (
        f'Operation cannot be fulfilled on {_qualified(resource)} "{name}": '
        "the object has been modified; please apply your changes to the latest version and try again"
    )
    return kmock.KubernetesError(409, "Conflict", message, _details(resource, name))


def invalid(message: str) -> kmock.KubernetesError:
    """422: the request is well-formed but cannot be applied (a failed JSON-patch `test` op among others)."""
    return kmock.KubernetesError(422, "Invalid", message, {})


def bad_request(message: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(400, "BadRequest", message, {})


def unsupported_media_type(content_type: str, accepted: Iterable[str]) -> kmock.KubernetesError:
    message = f"the body of the request was in an unknown format - accepted media types include: {', '.join(accepted)}"
    return kmock.KubernetesError(415, "UnsupportedMediaType", message, {})


def forbidden(resource: kmock.resource, name: str, why: str) -> kmock.KubernetesError:
    message = f'{_qualified(resource)} "{name}" is forbidden: {why}'
    return kmock.KubernetesError(403, "Forbidden", message, _details(resource, name))


#: The text of each field error reason (Go's field.ErrorType) in messages; the reason goes in `causes`.
FIELD_ERROR_TYPES = {
    "FieldValueRequired": "Required value",
    "FieldValueInvalid": "Invalid value",
    "FieldValueTypeInvalid": "Invalid value",
    "FieldValueNotSupported": "Unsupported value",
    "FieldValueTooLong": "Too long",
    "FieldValueTooMany": "Too many",
    "FieldValueDuplicate": "Duplicate value",
    "FieldValueForbidden": "Forbidden",
}
#: Errors whose message never shows the value (Go's field.Error.ErrorBody).
_VALUE_HIDDEN = {"FieldValueRequired", "FieldValueTooLong", "FieldValueForbidden"}


@attrs.frozen
class FieldError:
    """One entry of the API server's field.ErrorList: where (`spec.replicas`), which reason, and why."""

    path: str
    reason: str  # a key of FIELD_ERROR_TYPES
    detail: str = ""
    value: Any = None

    def message(self) -> str:
        """The text after the path, e.g. `Invalid value: -5: should be greater than or equal to 0`."""
        parts = [FIELD_ERROR_TYPES[self.reason]]
        if self.reason not in _VALUE_HIDDEN:
            parts.append(json.dumps(self.value, separators=(",", ":")))
        if self.detail:
            parts.append(self.detail)
        return ": ".join(parts)

    def __str__(self) -> str:
        return f"{self.path or '<nil>'}: {self.message()}"

    def cause(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message(), "field": self.path}


def invalid_object(kind: str, group: str, name: str, errors: Sequence[FieldError]) -> kmock.KubernetesError:
    """422 for an object that breaks its schema, CEL rules or metadata rules, worded like the API server."""
    listed = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(map(str, errors)) + "]"
    qualified = f"{kind}.{group}" if group else kind
    details = {"name": name, "group": group, "kind": kind, "causes": [error.cause() for error in errors]}
    return kmock.KubernetesError(422, "Invalid", f'{qualified} "{name}" is invalid: {listed}', details)


def unknown_fields(kind: str, version: str, paths: Sequence[str]) -> kmock.KubernetesError:
    """400 for `fieldValidation=Strict` (kubectl's default) when the body has fields the schema lacks."""
    fields = ", ".join(f'unknown field "{path}"' for path in paths)
    message = f'{kind} in version "{version}" cannot be handled as a {kind}: strict decoding error: {fields}'
    return kmock.KubernetesError(400, "BadRequest", message, {})


def apply_conflicts(
    resource: kmock.resource, name: str, conflicts: Sequence[tuple[str, str, str]]
) -> kmock.KubernetesError:
    """409 for a server-side apply that would take fields other managers own: (manager, its apiVersion,
    `.spec.field`) triples."""
    count = f"{len(conflicts)} conflict{'s' if len(conflicts) > 1 else ''}"
    listed = "\n".join(f'conflict with "{manager}" using {version}: {field}' for manager, version, field in conflicts)
    message = f"Apply failed with {count}: {listed}"
    causes = [
        {"type": "FieldManagerConflict", "message": f'conflict with "{manager}" using {version}', "field": field}
        for manager, version, field in conflicts
    ]
    return kmock.KubernetesError(409, "Conflict", message, {**_details(resource, name), "causes": causes})
