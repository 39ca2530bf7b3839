"""Reading HTTP requests the way the Kubernetes API server addresses and decodes them.

kmock 0.8's own path parser crashes on `/api/v1/namespaces` and reads `/api/v1/namespaces/<name>` as a
namespace scope rather than the Namespace object, so the emulator parses paths with `parse_address` instead.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import aiohttp.web
import attrs
import kmock
import multidict
import yaml

from tests.kube import _errors, _patches, _protobuf

#: libyaml's loader where available: server-side applies of KubeRay's CRDs are megabytes.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: Sub-paths of `/api/v1/namespaces/<name>/...` that are subresources of the Namespace, not resources in it.
NAMESPACE_SUBRESOURCES = frozenset({"status", "finalize"})


@attrs.frozen
class Address:
    """What an API path points at. `group is None` means the path is not under `/api` or `/apis`."""

    group: str | None = None
    version: str | None = None
    plural: str | None = None
    namespace: str | None = None
    name: str | None = None
    subresource: str | None = None


def parse_address(path: str) -> Address:
    parts = [part for part in path.split("/") if part]
    if parts[:1] == ["api"] and len(parts) >= 2:
        group, version, rest = "", parts[1], parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    elif parts[:1] == ["apis"] and len(parts) == 2:
        return Address(group=parts[1])
    else:
        return Address()

    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] not in NAMESPACE_SUBRESOURCES:
        namespace, rest = rest[1], rest[2:]
    return Address(
        group=group,
        version=version,
        plural=rest[0] if rest else None,
        namespace=namespace,
        name=rest[1] if len(rest) > 1 else None,
        subresource="/".join(rest[2:]) or None,
    )


def guess_action(method: str, address: Address, query: multidict.MultiMapping[str]) -> kmock.action | None:
    """kmock's action for a resource request; None for PUT (kmock has no action for it) and discovery paths."""
    if address.plural is None:
        return None
    if method == "GET":
        watching = query.get("watch", "").lower() in {"true", "1"}
        return kmock.action.WATCH if watching else kmock.action.FETCH if address.name else kmock.action.LIST
    actions = {
        ("POST", False): kmock.action.CREATE,
        ("PATCH", True): kmock.action.UPDATE,
        ("DELETE", True): kmock.action.DELETE,
    }
    return actions.get((method, address.name is not None))


def content_type(headers: Mapping[str, str]) -> str:
    """The media type, from headers that are case-insensitive (as `parse_request` keeps them)."""
    return headers.get("Content-Type", "application/json").split(";")[0].strip().lower()


def decode_body(body: bytes, headers: Mapping[str, str]) -> Any:
    """The body as data (None if empty): YAML for server-side apply (JSON is YAML too), protobuf as kubectl
    sends the objects it generates, JSON otherwise. Raises the API server's 4xx errors if it cannot."""
    if not body.strip():
        return None
    if content_type(headers) == _protobuf.CONTENT_TYPE:
        return _protobuf.decode(body)
    try:
        if content_type(headers) == _patches.APPLY_PATCH:
            return yaml.load(body, Loader=_YAML_LOADER)
        return json.loads(body)
    except (ValueError, yaml.YAMLError) as exc:
        raise _errors.bad_request(f"the request body is not valid: {exc}") from exc


async def parse_request(raw_request: aiohttp.web.BaseRequest, *, id: int) -> kmock.Request:
    body = await raw_request.read()
    headers = multidict.CIMultiDict(raw_request.headers)
    try:
        data = decode_body(body, headers)
    except kmock.KubernetesError:
        data = None  # reported by the handler that needs the body
    address = parse_address(raw_request.path)
    resource = None
    if address.group is not None:
        resource = kmock.resource(group=address.group, version=address.version, plural=address.plural)
    return kmock.Request(
        id=id,
        raw_request=raw_request,
        url=raw_request.url,
        method=raw_request.method,
        params=dict(raw_request.query),
        headers=headers,
        cookies=dict(raw_request.cookies),
        body=body,
        text=body.decode("utf-8", errors="replace"),
        data=data,
        action=guess_action(raw_request.method, address, raw_request.query),
        resource=resource,
        namespace=address.namespace,
        name=address.name,
        subresource=address.subresource,
    )
