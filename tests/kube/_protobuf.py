"""Decoding the few built-in objects kubectl sends as protobuf instead of JSON.

The objects kubectl generates itself (`kubectl create namespace|configmap|secret`) go out as
`application/vnd.kubernetes.protobuf`; everything from YAML or JSON files (`apply`, `create -f`) goes as JSON.
This reads the protobuf envelope (`runtime.Unknown`) and the fields of those three kinds; others are a 415.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

from tests.kube import _errors

CONTENT_TYPE = "application/vnd.kubernetes.protobuf"
_MAGIC = b"k8s\x00"

Field = tuple[str, Callable[[bytes], Any], bool]  # (JSON name, decoder of one value, repeated)


def _varint(data: bytes, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[offset]
        value |= (byte & 0x7F) << shift
        offset, shift = offset + 1, shift + 7
        if not byte & 0x80:
            return value, offset


def _fields(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs of a message: bytes for length-delimited fields, int for varints."""
    offset = 0
    while offset < len(data):
        tag, offset = _varint(data, offset)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, offset = _varint(data, offset)
            yield number, value
        elif wire_type == 2:
            length, offset = _varint(data, offset)
            yield number, data[offset : offset + length]
            offset += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire_type}")


def _message(schema: dict[int, Field]) -> Callable[[bytes], dict[str, Any]]:
    def decode(data: bytes) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for number, value in _fields(data):
            if number not in schema or value == b"":  # empty optional fields are omitted in JSON
                continue
            name, decode_value, repeated = schema[number]
            if repeated:
                result.setdefault(name, []).append(decode_value(value))
            else:
                result[name] = decode_value(value)
        return result

    return decode


def _map(decode_value: Callable[[bytes], Any]) -> Callable[[bytes], tuple[str, Any]]:
    """One entry of a protobuf map (a message with the key as field 1 and the value as field 2)."""

    def decode(data: bytes) -> tuple[str, Any]:
        entry = dict(_fields(data))
        return _text(entry.get(1, b"")), decode_value(entry.get(2, b""))

    return decode


def _text(data: bytes) -> str:
    return data.decode("utf-8")


def _base64(data: bytes) -> str:
    """Bytes fields are base64 strings in JSON."""
    return base64.b64encode(data).decode("ascii")


_OBJECT_META: dict[int, Field] = {
    1: ("name", _text, False),
    2: ("generateName", _text, False),
    3: ("namespace", _text, False),
    11: ("labels", _map(_text), True),
    12: ("annotations", _map(_text), True),
    14: ("finalizers", _text, True),
}
_KINDS: dict[str, dict[int, Field]] = {
    "Namespace": {1: ("metadata", _message(_OBJECT_META), False)},
    "ConfigMap": {
        1: ("metadata", _message(_OBJECT_META), False),
        2: ("data", _map(_text), True),
        3: ("binaryData", _map(_base64), True),
    },
    "Secret": {
        1: ("metadata", _message(_OBJECT_META), False),
        2: ("data", _map(_base64), True),
        3: ("type", _text, False),
    },
}
_MAPS = {"labels", "annotations", "data", "binaryData"}


def _maps_as_dicts(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {key: dict(value) if key in _MAPS else _maps_as_dicts(value) for key, value in obj.items()}
    return obj


def decode(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded Namespace, ConfigMap or Secret."""
    try:
        if not body.startswith(_MAGIC):
            raise ValueError("no Kubernetes envelope")
        envelope = dict(_fields(body[len(_MAGIC) :]))
        type_meta = dict(_fields(envelope.get(1, b"")))
        api_version, kind = _text(type_meta.get(1, b"")), _text(type_meta.get(2, b""))
        if kind not in _KINDS:
            raise _errors.unsupported_media_type(f"{CONTENT_TYPE} for {kind or 'this kind'}", ["application/json"])
        obj = _maps_as_dicts(_message(_KINDS[kind])(envelope.get(2, b"")))
    except (IndexError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise _errors.bad_request(f"the protobuf body is not valid: {exc}") from exc
    return {"apiVersion": api_version, "kind": kind, **obj}
