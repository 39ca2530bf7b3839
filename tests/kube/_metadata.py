"""The API server's rules for `metadata`: names, labels, annotations, finalizers and owner references.

These hold for every kind (apimachinery's ValidateObjectMeta), before and beside any CRD schema; names
are DNS-1123 subdomains except where a kind needs less (namespaces: labels; services: DNS-1035 labels).
Messages are apimachinery's, so that tests can match a real server's too.
"""

from __future__ import annotations

import re
from typing import Any

import kmock

from tests.kube._errors import FieldError

#: The API server's limit on the total size of an object's annotations. kubectl's client-side apply copies the
#: whole object into an annotation, which makes KubeRay's CRDs too big: apply them with `--server-side`.
MAX_ANNOTATIONS_BYTES = 256 * 1024

_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_LABEL_1123 = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_LABEL_1035 = r"[a-z]([-a-z0-9]*[a-z0-9])?"
_QUALIFIED_NAME = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"

_SUBDOMAIN_TEXT = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start "
    f"and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '{_SUBDOMAIN}')"
)
_LABEL_1123_TEXT = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end "
    f"with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is '{_LABEL_1123}')"
)
_LABEL_1035_TEXT = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, "
    "and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation is "
    f"'{_LABEL_1035}')"
)
_QUALIFIED_NAME_TEXT = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
    f"character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '{_QUALIFIED_NAME}')"
)
_LABEL_VALUE_TEXT = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is "
    f"'{_LABEL_VALUE}')"
)
#: How names are checked, by resource plural (core group): (pattern, explanation, maximum length).
_NAME_RULES = {
    "namespaces": (_LABEL_1123, _LABEL_1123_TEXT, 63),
    "services": (_LABEL_1035, _LABEL_1035_TEXT, 63),
}


def _name_problems(name: str, pattern: str, text: str, limit: int) -> list[str]:
    problems = [f"must be no more than {limit} characters"] if len(name) > limit else []
    return problems + ([] if re.fullmatch(pattern, name) else [text])


def qualified_name_problems(key: str) -> list[str]:
    """Why `key` is not a label or annotation key (`[prefix/]name`), apimachinery's IsQualifiedName."""
    prefix, _, name = key.rpartition("/")
    problems = []
    if "/" in key and not prefix:
        problems.append("prefix part must be non-empty")
    elif prefix:
        problems += [f"prefix part {p}" for p in _name_problems(prefix, _SUBDOMAIN, _SUBDOMAIN_TEXT, 253)]
    if not name:
        return [*problems, "name part must be non-empty"]
    if len(name) > 63:
        problems.append("name part must be no more than 63 characters")
    if not re.fullmatch(_QUALIFIED_NAME, name):
        problems.append(_QUALIFIED_NAME_TEXT)
    return problems


def errors(resource: kmock.resource, obj: dict[str, Any]) -> list[FieldError]:
    """Every metadata error of `obj`, a `resource` object about to be stored."""
    meta = obj.get("metadata") or {}
    pattern, text, limit = _NAME_RULES.get(str(resource.plural), (_SUBDOMAIN, _SUBDOMAIN_TEXT, 253))
    if resource.group:
        pattern, text, limit = _SUBDOMAIN, _SUBDOMAIN_TEXT, 253
    name = str(meta.get("name", ""))
    found = [
        FieldError("metadata.name", "FieldValueInvalid", p, name) for p in _name_problems(name, pattern, text, limit)
    ]
    for key, value in (meta.get("labels") or {}).items():
        found += [FieldError("metadata.labels", "FieldValueInvalid", p, key) for p in qualified_name_problems(key)]
        value_problems = [] if re.fullmatch(_LABEL_VALUE, str(value)) else [_LABEL_VALUE_TEXT]
        if len(str(value)) > 63:
            value_problems.insert(0, "must be no more than 63 characters")
        found += [FieldError("metadata.labels", "FieldValueInvalid", p, value) for p in value_problems]
    annotations = meta.get("annotations") or {}
    for key in annotations:
        found += [
            FieldError("metadata.annotations", "FieldValueInvalid", p, key)
            for p in qualified_name_problems(key.lower())
        ]
    size = sum(len(key.encode()) + len(str(value).encode()) for key, value in annotations.items())
    if size > MAX_ANNOTATIONS_BYTES:
        found.append(
            FieldError("metadata.annotations", "FieldValueTooLong", f"must have at most {MAX_ANNOTATIONS_BYTES} bytes")
        )
    for index, finalizer in enumerate(meta.get("finalizers") or []):
        where = f"metadata.finalizers[{index}]"
        found += [FieldError(where, "FieldValueInvalid", p, finalizer) for p in qualified_name_problems(finalizer)]
    return found + _owner_reference_errors(meta.get("ownerReferences") or [])


def _owner_reference_errors(references: list[Any]) -> list[FieldError]:
    found = []
    for index, ref in enumerate(references):
        for field in ("apiVersion", "kind", "name", "uid"):
            if not (isinstance(ref, dict) and ref.get(field)):
                found.append(FieldError(f"metadata.ownerReferences[{index}].{field}", "FieldValueInvalid", "", ""))
    controllers = [ref for ref in references if isinstance(ref, dict) and ref.get("controller")]
    if len(controllers) > 1:
        detail = "Only one reference can have Controller set to true."
        found.append(FieldError("metadata.ownerReferences", "FieldValueInvalid", detail, references))
    return found
