"""What the emulator serves in API discovery: built-in resources, the resources of applied CRDs, versions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import kmock

from tests.kube import _errors

#: Without `verbs` in discovery, kopf refuses to watch a resource and kubectl refuses to get it.
VERBS = frozenset({"create", "delete", "get", "list", "patch", "update", "watch"})

CRDS = kmock.resource(group="apiextensions.k8s.io", version="v1", plural="customresourcedefinitions")
NAMESPACES = kmock.resource(group="", version="v1", plural="namespaces")

#: The server version drives gcloud's kubectl dispatcher: it runs the kubectl of the closest minor version.
SERVER_VERSION = {
    "major": "1",
    "minor": "32",
    "gitVersion": "v1.32.4",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2025-04-22T00:00:00Z",
    "goVersion": "go1.23.6",
    "compiler": "gc",
    "platform": "linux/amd64",
}


def _info(kind: str, *, namespaced: bool, shortnames: Iterable[str] = (), status: bool = False) -> kmock.ResourceInfo:
    return kmock.ResourceInfo(
        kind=kind,
        singular=kind.lower(),
        namespaced=namespaced,
        verbs=VERBS,
        shortnames=shortnames,
        subresources={"status"} if status else set(),
    )


def builtin_resources() -> dict[kmock.resource, kmock.ResourceInfo]:
    """The built-in resources that the operator, kopf and kubectl use; fresh objects for each emulator."""
    core = {
        "namespaces": _info("Namespace", namespaced=False, shortnames={"ns"}, status=True),
        "events": _info("Event", namespaced=True, shortnames={"ev"}),
        "pods": _info("Pod", namespaced=True, shortnames={"po"}, status=True),
        "services": _info("Service", namespaced=True, shortnames={"svc"}, status=True),
        "configmaps": _info("ConfigMap", namespaced=True, shortnames={"cm"}),
        "secrets": _info("Secret", namespaced=True),
    }
    resources = {kmock.resource(group="", version="v1", plural=plural): info for plural, info in core.items()}
    resources[kmock.resource("events.k8s.io", "v1", "events")] = _info("Event", namespaced=True, shortnames={"ev"})
    resources[kmock.resource("coordination.k8s.io", "v1", "leases")] = _info("Lease", namespaced=True)
    resources[CRDS] = _info("CustomResourceDefinition", namespaced=False, shortnames={"crd", "crds"}, status=True)
    return resources


def crd_resources(crd: dict[str, Any]) -> dict[kmock.resource, kmock.ResourceInfo]:
    """The resources a CustomResourceDefinition serves, one per served version; 422 if it is malformed."""
    try:
        spec = crd["spec"]
        names = spec["names"]
        resources = {
            kmock.resource(group=spec["group"], version=version["name"], plural=names["plural"]): kmock.ResourceInfo(
                kind=names["kind"],
                singular=names.get("singular") or names["kind"].lower(),
                namespaced=spec["scope"] == "Namespaced",
                verbs=VERBS,
                shortnames=names.get("shortNames") or (),
                categories=names.get("categories") or (),
                subresources={"status"} if "status" in (version.get("subresources") or {}) else set(),
            )
            for version in spec["versions"]
            if version.get("served", True)
        }
    except (KeyError, TypeError) as exc:
        raise _errors.invalid(f"the CustomResourceDefinition lacks a required field: {exc}") from exc
    if crd.get("metadata", {}).get("name") != f"{names['plural']}.{spec['group']}":
        raise _errors.invalid('metadata.name must be "<spec.names.plural>.<spec.group>"')
    return resources


_VERSION = re.compile(r"v(?P<major>\d+)(?:(?P<stability>alpha|beta)(?P<minor>\d+))?")


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes' version order, highest first when sorted: GA before beta before alpha, then by number."""
    match = _VERSION.fullmatch(version)
    if match is None:
        return (0, 0, 0, version)
    stability = {None: 3, "beta": 2, "alpha": 1}[match["stability"]]
    return (-stability, -int(match["major"]), -int(match["minor"] or 0), version)


def api_group(group: str, versions: Iterable[str]) -> dict[str, Any]:
    """An APIGroup whose preferred version is the one kubectl should use: the most stable, e.g. v1 over v1alpha1."""
    ordered = sorted(set(versions), key=version_priority)
    entries = [{"groupVersion": f"{group}/{version}", "version": version} for version in ordered]
    return {"name": group, "versions": entries, "preferredVersion": entries[0]}


def api_resource_list(
    group: str, version: str, resources: Mapping[kmock.resource, kmock.ResourceInfo]
) -> dict[str, Any]:
    """An APIResourceList. Subresources are entries of their own with no short names (kmock copies them there,
    which makes kubectl resolve `ns` to `namespaces/status`)."""
    entries: list[dict[str, Any]] = []
    for resource, info in sorted(resources.items(), key=lambda item: str(item[0].plural)):
        if (resource.group, resource.version) != (group, version):
            continue
        entries.append(
            {
                "name": resource.plural,
                "singularName": info.singular,
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": sorted(info.verbs),
                "shortNames": sorted(info.shortnames),
                "categories": sorted(info.categories),
            }
        )
        entries.extend(
            {
                "name": f"{resource.plural}/{subresource}",
                "singularName": "",
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": ["get", "patch", "update"],
            }
            for subresource in sorted(info.subresources)
        )
    group_version = f"{group}/{version}" if group else version
    return {"apiVersion": "v1", "kind": "APIResourceList", "groupVersion": group_version, "resources": entries}
