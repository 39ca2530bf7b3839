"""What a real API server refuses and changes in what it is sent, checked on the emulator (or, with
`--kubeconfig`, on a real cluster: every test here passes unchanged on both).

Our own CRD and KubeRay's, as they are installed: schema types and bounds, enums, required fields, CEL
rules (transition rules too), defaults, pruning and strict field validation, metadata rules, patch types,
printer columns. Refusals are checked as kubectl reports them and, through `kubectl proxy`, as the
`kind: Status` bodies clients branch on.
"""

from __future__ import annotations

import copy
import datetime
import json
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import kuberay
from tests.kube.clusters import ApiProxy, target_cluster
from tests.kube.emulator import Cluster

pytestmark = [pytest.mark.integration, pytest.mark.kube]

ROOT = Path(__file__).resolve().parents[2]
ZCM_CRD = ROOT / "crds" / "zerocopymodels.zerocopy.dev.yaml"
HEAD = {"template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}}}

if kuberay.missing() is not None:
    pytest.skip(str(kuberay.missing()), allow_module_level=True)


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with target_cluster(request.config, tmp_path_factory) as cluster:
        cluster.kubectl("apply", "-f", str(ZCM_CRD), check=True)
        if cluster.kubectl("get", "crd", "rayservices.ray.io").returncode != 0:
            cluster.kubectl("apply", "--server-side", "-f", str(kuberay.crd("rayservices")), check=True)
        yield cluster


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> Iterator[str]:
    name = f"zerocopy-rules-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name, check=True)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def proxy(cluster: Cluster) -> Iterator[ApiProxy]:
    with ApiProxy(cluster) as running:
        yield running


def model(name: str, **serving: Any) -> dict[str, Any]:
    """A valid ZeroCopyModel (the tiny-mlp example), with `serving` fields set or (None) removed."""
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"] = {"name": name}
    for field, value in serving.items():
        if value is None:
            resource["spec"]["serving"].pop(field, None)
        else:
            resource["spec"]["serving"][field] = value
    return dict(resource)


def rayservice(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {"rayClusterConfig": {"headGroupSpec": copy.deepcopy(HEAD)}, **spec},
    }


def kubectl(cluster: Cluster, namespace: str, *args: str, obj: Any = None) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(*args, "-n", namespace, input=None if obj is None else json.dumps(obj))


def fetched(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = kubectl(cluster, namespace, "get", kind, name, "-o", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def causes(body: dict[str, Any]) -> dict[str, str]:
    """The causes of a `kind: Status`, field to message."""
    return {cause.get("field", ""): cause.get("message", "") for cause in body["details"].get("causes", [])}


def test_schema_violations_are_422_with_the_servers_status(proxy: ApiProxy, namespace: str) -> None:
    path = f"/apis/zerocopy.dev/v1alpha1/namespaces/{namespace}/zerocopymodels"
    status, body = proxy.call("POST", path, model("negative", replicas=-5))
    assert (status, body["kind"], body["status"], body["reason"], body["code"]) == (
        422,
        "Status",
        "Failure",
        "Invalid",
        422,
    )
    assert (body["details"]["name"], body["details"]["group"], body["details"]["kind"]) == (
        "negative", "zerocopy.dev", "ZeroCopyModel",
    )  # fmt: skip
    assert body["message"].startswith('ZeroCopyModel.zerocopy.dev "negative" is invalid: ')
    assert "should be greater than or equal to 1" in causes(body)["spec.serving.replicas"]
    assert [c["reason"] for c in body["details"]["causes"] if c["field"] == "spec.serving.replicas"] == [
        "FieldValueInvalid"
    ]
    assert proxy.call("GET", f"{path}/negative")[0] == 404  # nothing was stored


def test_types_and_required_fields_of_kuberays_schema(cluster: Cluster, namespace: str, proxy: ApiProxy) -> None:
    groups = [{"groupName": "cpu", "replicas": "two", "rayStartParams": {}, **copy.deepcopy(HEAD)}]
    service = rayservice("typed")
    service["spec"]["rayClusterConfig"]["workerGroupSpecs"] = groups
    refused = kubectl(cluster, namespace, "create", "-f", "-", obj=service)
    assert refused.returncode != 0
    assert "spec.rayClusterConfig.workerGroupSpecs[0].replicas" in refused.stderr
    assert "must be of type integer" in refused.stderr

    status, body = proxy.call("POST", f"/apis/ray.io/v1/namespaces/{namespace}/rayservices", {**service, "spec": {}})
    assert status == 422
    assert causes(body)["spec.rayClusterConfig"] == "Required value"


def test_status_writes_are_validated_like_kuberay_conditions(cluster: Cluster, namespace: str) -> None:
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=rayservice("conditioned")).returncode == 0
    condition = {"type": "Ready", "status": "True", "reason": "RayServiceReady", "message": "ready"}

    def write(status: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        patch = json.dumps({"status": status})
        return kubectl(cluster, namespace, "patch", "rayservice", "conditioned", "--subresource=status",
                       "--type=merge", "-p", patch)  # fmt: skip

    refused = write({"conditions": [condition]})
    assert refused.returncode != 0
    assert "status.conditions[0].lastTransitionTime: Required value" in refused.stderr
    assert "status" not in fetched(cluster, namespace, "rayservice", "conditioned")
    assert write({"conditions": [{**condition, "lastTransitionTime": now()}]}).returncode == 0
    stored = fetched(cluster, namespace, "rayservice", "conditioned")["status"]["conditions"]
    assert [c["type"] for c in stored] == ["Ready"]

    assert kubectl(cluster, namespace, "create", "-f", "-", obj=model("phased")).returncode == 0
    bad_phase = kubectl(cluster, namespace, "patch", "zcm", "phased", "--subresource=status", "--type=merge",
                        "-p", '{"status": {"phase": "Exploded"}}')  # fmt: skip
    assert 'status.phase: Unsupported value: "Exploded"' in bad_phase.stderr


def test_cel_rules_and_transition_rules(cluster: Cluster, namespace: str) -> None:
    both = model("both")
    both["spec"]["model"]["architecture"]["transformers"] = "GPT2LMHeadModel"
    refused = kubectl(cluster, namespace, "create", "-f", "-", obj=both)
    assert refused.returncode != 0
    assert "set exactly one of architecture.factory or architecture.transformers" in refused.stderr
    too_many = kubectl(cluster, namespace, "create", "-f", "-", obj=model("scaled", autoscaling={"maxReplicas": 3}))
    assert "set serving.replicas or serving.autoscaling, not both" in too_many.stderr

    managed = rayservice("managed", managedBy="ray.io/kuberay-operator")
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=managed).returncode == 0
    moved = kubectl(cluster, namespace, "patch", "rayservice", "managed", "--type=merge",
                    "-p", '{"spec": {"managedBy": "kueue.x-k8s.io/multikueue"}}')  # fmt: skip
    assert "the managedBy field is immutable" in moved.stderr
    assert fetched(cluster, namespace, "rayservice", "managed")["spec"]["managedBy"] == "ray.io/kuberay-operator"


def test_schema_defaults_are_stored(cluster: Cluster, namespace: str) -> None:
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=model("defaulted", handler=None)).returncode == 0
    spec = fetched(cluster, namespace, "zcm", "defaulted")["spec"]
    assert (spec["serving"]["handler"], spec["serving"]["task"], spec["serving"]["device"]) == (
        "tensor",
        "tensor",
        "auto",
    )
    assert spec["cluster"]["rayVersion"] == "2.60.0"
    assert spec["cluster"]["workerGroups"][0]["gpuResource"] == "nvidia.com/gpu"
    assert "upgradeStrategy" not in spec  # a default fills a field of an object that is there, never creates one


def test_unknown_fields_are_refused_by_strict_kubectl_and_pruned_otherwise(cluster: Cluster, namespace: str) -> None:
    typo = model("typo", replica=2)
    strict = kubectl(cluster, namespace, "apply", "-f", "-", obj=typo)
    assert strict.returncode != 0
    assert 'strict decoding error: unknown field "spec.serving.replica"' in strict.stderr

    warned = kubectl(cluster, namespace, "apply", "--validate=warn", "-f", "-", obj=typo)
    assert warned.returncode == 0, warned.stderr
    assert 'unknown field "spec.serving.replica"' in warned.stderr
    assert "replica" not in fetched(cluster, namespace, "zcm", "typo")["spec"]["serving"]
    ignored = kubectl(
        cluster, namespace, "apply", "--validate=false", "-f", "-", obj=model("typo", replica=3, replicas=3)
    )
    assert ignored.returncode == 0, ignored.stderr
    assert "unknown field" not in ignored.stderr
    assert fetched(cluster, namespace, "zcm", "typo")["spec"]["serving"]["replicas"] == 3


def test_object_metadata_is_validated(cluster: Cluster, namespace: str) -> None:
    upper = kubectl(cluster, namespace, "create", "-f", "-", obj=model("Alpha"))
    assert upper.returncode != 0
    assert 'metadata.name: Invalid value: "Alpha": a lowercase RFC 1123 subdomain' in upper.stderr

    configmap: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "labelled"}}
    configmap["metadata"]["labels"] = {"k": "v" * 64}
    long_label = kubectl(cluster, namespace, "create", "-f", "-", obj=configmap)
    assert "metadata.labels: Invalid value" in long_label.stderr
    assert "must be no more than 63 characters" in long_label.stderr
    configmap["metadata"]["labels"] = {"bad key": "v"}
    assert (
        "name part must consist of alphanumeric characters"
        in kubectl(cluster, namespace, "create", "-f", "-", obj=configmap).stderr
    )
    configmap["metadata"]["labels"] = {"example.com/k": "v" * 63}
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=configmap).returncode == 0


def test_strategic_merge_patches_of_custom_resources_are_415(cluster: Cluster, namespace: str, proxy: ApiProxy) -> None:
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=model("patched")).returncode == 0
    default_patch = kubectl(
        cluster, namespace, "patch", "zcm", "patched", "-p", '{"spec": {"serving": {"replicas": 3}}}'
    )
    assert default_patch.returncode != 0
    assert "application/strategic-merge-patch+json is not supported by zerocopy.dev/v1alpha1" in default_patch.stderr
    path = f"/apis/zerocopy.dev/v1alpha1/namespaces/{namespace}/zerocopymodels/patched"
    status, body = proxy.call(
        "PATCH", path, {"metadata": {"labels": {"a": "b"}}}, "application/strategic-merge-patch+json"
    )
    assert (status, body["reason"]) == (415, "UnsupportedMediaType")
    assert "application/merge-patch+json" in body["message"]

    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smp"}, "data": {"a": "1"}}
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=configmap).returncode == 0
    assert kubectl(cluster, namespace, "patch", "configmap", "smp", "-p", '{"data": {"b": "2"}}').returncode == 0
    assert fetched(cluster, namespace, "configmap", "smp")["data"] == {"a": "1", "b": "2"}


def test_kubectl_get_shows_the_crds_printer_columns(cluster: Cluster, namespace: str) -> None:
    assert kubectl(cluster, namespace, "create", "-f", "-", obj=model("printed")).returncode == 0
    status = {"phase": "Ready", "replicas": "2/2", "conditions": [{"type": "Ready", "status": "True"}]}
    patch = kubectl(cluster, namespace, "patch", "zcm", "printed", "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))  # fmt: skip
    assert patch.returncode == 0, patch.stderr
    header, *rows = kubectl(cluster, namespace, "get", "zcm", "printed").stdout.splitlines()
    assert header.split() == ["NAME", "READY", "PHASE", "REPLICAS", "MODEL", "ENDPOINT", "AGE"]
    assert rows[0].split()[:5] == ["printed", "True", "Ready", "2/2", "file://.cache/tiny-mlp.safetensors"]
    wide = kubectl(cluster, namespace, "get", "zcm", "printed", "-o", "wide").stdout.splitlines()[0].split()
    assert "TASK" in wide  # priority 1: shown by -o wide only


def configmap(name: str, owner: dict[str, Any] | None = None, **metadata: Any) -> dict[str, Any]:
    refs = [{"apiVersion": "v1", "kind": "ConfigMap", "name": owner["metadata"]["name"],
             "uid": owner["metadata"]["uid"]}] if owner else []  # fmt: skip
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "ownerReferences": refs, **metadata}}


def gone(cluster: Cluster, namespace: str, *objects: str) -> bool:
    """Whether the objects are deleted within 30 s (kubectl waits on a watch: the garbage collector is async)."""
    waited = kubectl(cluster, namespace, "wait", "--for=delete", *objects, "--timeout=30s")
    return waited.returncode == 0 or "not found" in waited.stderr


def created(cluster: Cluster, namespace: str, obj: dict[str, Any]) -> dict[str, Any]:
    out = kubectl(cluster, namespace, "create", "-o", "json", "-f", "-", obj=obj)
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_garbage_collection_follows_the_propagation_policy(cluster: Cluster, namespace: str) -> None:
    owner = created(cluster, namespace, configmap("orphan-owner"))
    created(cluster, namespace, configmap("orphan-child", owner))
    assert kubectl(cluster, namespace, "delete", "configmap", "orphan-owner", "--cascade=orphan").returncode == 0
    assert "ownerReferences" not in fetched(cluster, namespace, "configmap", "orphan-child")["metadata"]

    owner = created(cluster, namespace, configmap("fg-owner"))
    created(cluster, namespace, configmap("fg-child", owner, finalizers=["example.com/hold"]))
    deleting = kubectl(cluster, namespace, "delete", "configmap", "fg-owner", "--cascade=foreground", "--wait=false")
    assert deleting.returncode == 0, deleting.stderr
    held = fetched(cluster, namespace, "configmap", "fg-owner")["metadata"]
    assert held["deletionTimestamp"]
    assert "foregroundDeletion" in held["finalizers"]
    release = '[{"op": "remove", "path": "/metadata/finalizers"}]'
    assert kubectl(cluster, namespace, "patch", "configmap", "fg-child", "--type=json", "-p", release).returncode == 0
    assert gone(cluster, namespace, "configmap/fg-child", "configmap/fg-owner")

    ghost = {"metadata": {"name": "never-existed", "uid": str(uuid.uuid4())}}
    created(cluster, namespace, configmap("dangling", ghost))
    assert gone(cluster, namespace, "configmap/dangling")


def test_a_deleted_namespace_terminates_until_its_objects_are_gone(cluster: Cluster) -> None:
    name = f"zerocopy-ending-{uuid.uuid4().hex[:6]}"
    assert cluster.kubectl("create", "namespace", name).returncode == 0
    created(cluster, name, configmap("held", finalizers=["example.com/hold"]))
    assert cluster.kubectl("delete", "namespace", name, "--wait=false").returncode == 0
    terminating = json.loads(cluster.kubectl("get", "namespace", name, "-o", "json").stdout)
    assert terminating["status"]["phase"] == "Terminating"
    refused = kubectl(cluster, name, "create", "-f", "-", obj=configmap("late"))
    assert "Forbidden" in refused.stderr
    assert f"unable to create new content in namespace {name} because it is being terminated" in refused.stderr

    release = '[{"op": "remove", "path": "/metadata/finalizers"}]'
    assert kubectl(cluster, name, "patch", "configmap", "held", "--type=json", "-p", release).returncode == 0
    waited = cluster.kubectl("wait", "--for=delete", f"namespace/{name}", "--timeout=120s")
    assert waited.returncode == 0 or "not found" in waited.stderr


# -- server-side apply -------------------------------------------------------------------------------------

REPLICAS = ("f:spec", "f:serving", "f:replicas")
ROUTE = ("f:spec", "f:serving", "f:routePrefix")


def applied(cluster: Cluster, namespace: str, obj: Any, *flags: str) -> subprocess.CompletedProcess[str]:
    return kubectl(cluster, namespace, "apply", "--server-side", *flags, "-f", "-", obj=obj)


def serving_only(name: str, **serving: Any) -> dict[str, Any]:
    """An apply configuration of a ZeroCopyModel that sets only these `spec.serving` fields."""
    return {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ZeroCopyModel", "metadata": {"name": name},
            "spec": {"serving": serving}}  # fmt: skip


def appliers(cluster: Cluster, namespace: str, name: str, path: tuple[str, ...]) -> set[str]:
    """The managers whose `Apply` entries in managedFields own the field at `path` (fieldsV1 keys)."""
    out = kubectl(cluster, namespace, "get", "zcm", name, "-o", "json", "--show-managed-fields")
    assert out.returncode == 0, out.stderr
    found = set()
    for entry in json.loads(out.stdout)["metadata"].get("managedFields", []):
        node = entry.get("fieldsV1", {})
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if entry["operation"] == "Apply" and node is not None:
            found.add(entry["manager"])
    return found


def test_server_side_apply_removes_the_fields_a_manager_dropped(cluster: Cluster, namespace: str) -> None:
    assert applied(cluster, namespace, model("ssa-dropped")).returncode == 0
    assert appliers(cluster, namespace, "ssa-dropped", ROUTE) == {"kubectl"}
    reapplied = applied(cluster, namespace, model("ssa-dropped", routePrefix=None))
    assert reapplied.returncode == 0, reapplied.stderr
    serving = fetched(cluster, namespace, "zcm", "ssa-dropped")["spec"]["serving"]
    assert "routePrefix" not in serving
    assert serving["replicas"] == 2
    assert appliers(cluster, namespace, "ssa-dropped", REPLICAS) == {"kubectl"}
    assert appliers(cluster, namespace, "ssa-dropped", ROUTE) == set()


def test_a_second_manager_conflicts_unless_it_forces(cluster: Cluster, namespace: str, proxy: ApiProxy) -> None:
    assert applied(cluster, namespace, model("ssa-conflict")).returncode == 0
    other = serving_only("ssa-conflict", replicas=3)
    refused = applied(cluster, namespace, other, "--field-manager=other")
    assert refused.returncode != 0
    assert 'conflict with "kubectl"' in refused.stderr
    assert ".spec.serving.replicas" in refused.stderr

    path = f"/apis/zerocopy.dev/v1alpha1/namespaces/{namespace}/zerocopymodels/ssa-conflict?fieldManager=other"
    status, body = proxy.call("PATCH", path, json.dumps(other), "application/apply-patch+yaml")
    assert (status, body["kind"], body["reason"]) == (409, "Status", "Conflict")
    assert 'conflict with "kubectl" using zerocopy.dev/v1alpha1: .spec.serving.replicas' in body["message"]
    assert [(c["type"], c["field"]) for c in body["details"]["causes"]] == [
        ("FieldManagerConflict", ".spec.serving.replicas")
    ]
    assert body["details"]["causes"][0]["message"] == 'conflict with "kubectl" using zerocopy.dev/v1alpha1'
    assert fetched(cluster, namespace, "zcm", "ssa-conflict")["spec"]["serving"]["replicas"] == 2

    forced = applied(cluster, namespace, other, "--field-manager=other", "--force-conflicts")
    assert forced.returncode == 0, forced.stderr
    assert fetched(cluster, namespace, "zcm", "ssa-conflict")["spec"]["serving"]["replicas"] == 3
    assert appliers(cluster, namespace, "ssa-conflict", REPLICAS) == {"other"}
    assert appliers(cluster, namespace, "ssa-conflict", ROUTE) == {"kubectl"}


def test_applying_the_same_value_shares_the_field(cluster: Cluster, namespace: str) -> None:
    assert applied(cluster, namespace, model("ssa-shared")).returncode == 0
    same = applied(cluster, namespace, serving_only("ssa-shared", replicas=2), "--field-manager=other")
    assert same.returncode == 0, same.stderr
    assert appliers(cluster, namespace, "ssa-shared", REPLICAS) == {"kubectl", "other"}
    # kubectl drops the field: "other" still owns it, so it stays (and is now other's alone).
    assert applied(cluster, namespace, model("ssa-shared", replicas=None)).returncode == 0
    assert fetched(cluster, namespace, "zcm", "ssa-shared")["spec"]["serving"]["replicas"] == 2
    assert appliers(cluster, namespace, "ssa-shared", REPLICAS) == {"other"}
