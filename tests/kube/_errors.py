"""The failures the API server reports, as `kind: Status` bodies with the codes and reasons clients branch on.

kubectl and kopf decide what to do next from the code and `reason` (e.g. kubectl apply creates on NotFound,
kopf retries its finalizer patch on 422), so these mirror the real API server's wording.
"""

from __future__ import annotations

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


def unsupported_media_type(content_type: str) -> kmock.KubernetesError:
    return kmock.KubernetesError(
        415, "UnsupportedMediaType", f"the body of the request was in an unknown format: {content_type}", {}
    )
