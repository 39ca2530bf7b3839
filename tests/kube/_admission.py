"""What the API server does to every object it is asked to store, in its order, before anything is written.

For a custom resource: prune unknown fields (refused with 400 under `fieldValidation=Strict`, as kubectl
asks, a warning otherwise), apply schema defaults, then validate: metadata, the `openAPIV3Schema` and,
unless those found a blocking error, the CEL rules; any error is one 422 listing them all. Built-in
kinds get the metadata rules only (the emulator has no schemas for them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import kmock

from tests.kube import _cel, _errors, _metadata, _openapi, _structural

#: Errors after which the API server does not run CEL rules (apiextensions' hasBlockingErr).
_BLOCKING = {
    "FieldValueNotSupported",
    "FieldValueRequired",
    "FieldValueTooLong",
    "FieldValueTooMany",
    "FieldValueTypeInvalid",
}
_NOT_CHECKED = _errors.FieldError(
    "",
    "FieldValueInvalid",
    "some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation",
    "null",
)


@attrs.define
class WriteOptions:
    """What a request asks of a write (`fieldValidation`, `fieldManager`, `force`) and what it is told back
    (warnings). Without `fieldManager`, the manager is the client's User-Agent up to its first `/`."""

    field_validation: str = "Warn"  # the API server's default when the request names none
    warnings: list[str] = attrs.field(factory=list)
    field_manager: str = "unknown"
    force: bool = False
    #: Set for server-side apply, whose managedFields `_apply` has already worked out.
    applied: bool = False

    @classmethod
    def from_params(cls, params: Mapping[str, str], user_agent: str = "") -> WriteOptions:
        return cls(
            field_validation=params.get("fieldValidation") or "Warn",
            field_manager=params.get("fieldManager") or user_agent.split("/")[0] or "unknown",
            force=params.get("force") == "true",
        )


def admit(
    resource: kmock.resource,
    kind: str | None,
    schema: dict[str, Any] | None,
    obj: dict[str, Any],
    old: dict[str, Any] | None,
    options: WriteOptions,
) -> dict[str, Any]:
    """`obj` as the API server would store it (pruned, in place, and defaulted); raises its 400 or 422 if it
    refuses it. `schema` is the CRD's for the object's version, None for built-in kinds; `old` the current
    object on updates (for CEL transition rules)."""
    name = str((obj.get("metadata") or {}).get("name", ""))
    errors = _metadata.errors(resource, obj)
    if schema is not None:
        _prune(schema, obj, kind, resource, options)
        obj = _structural.apply_defaults(schema, obj)
        errors += _openapi.validate(schema, obj)
        if any(error.reason in _BLOCKING for error in errors):
            errors.append(_NOT_CHECKED)
        else:
            errors += _cel.violations(schema, obj, "", old if old is not None else _cel.MISSING)
    if errors:
        raise _errors.invalid_object(kind or "", resource.group or "", name, errors)
    return obj


def _prune(
    schema: dict[str, Any], obj: dict[str, Any], kind: str | None, resource: kmock.resource, options: WriteOptions
) -> None:
    """Prune `obj` in place; what was dropped is refused (Strict), warned about (Warn) or let go (Ignore)."""
    dropped = _structural.prune(schema, obj)
    if dropped and options.field_validation == "Strict":
        raise _errors.unknown_fields(kind or "", str(resource.version), dropped)
    if options.field_validation == "Warn":
        options.warnings += [f'unknown field "{path}"' for path in dropped]
