"""The Kubernetes API emulator against the real kubectl and kopf: each gap closed over kmock 0.8, exercised.

What a user would do with kubectl is done with kubectl; raw HTTP is used only where kubectl hides the
answer (status codes, `kind: Status` bodies, watch framing).
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import kuberay
from tests.kube.clusters import call
from tests.kube.emulator import Cluster, running_emulator

pytestmark = pytest.mark.integration

CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.toys.example.com
spec:
  group: toys.example.com
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget, shortNames: [wdg]}
  versions:
    - name: v1
      served: true
      storage: true
      subresources: {status: {}}
      schema:
        openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}
"""
WIDGETS = "/apis/toys.example.com/v1/namespaces/default/widgets"
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"

#: A minimal operator: on create it patches the status and posts an event; its delete handler makes kopf
#: add its finalizer.
OPERATOR = '''
import kopf


@kopf.on.create("toys.example.com", "v1", "widgets")
def mark_ready(body, patch, **_):
    patch.status["phase"] = "Ready"
    kopf.info(body, reason="Ready", message="the widget is ready")


@kopf.on.delete("toys.example.com", "v1", "widgets")
def release(**_):
    """Nothing to clean up; its presence alone makes kopf hold widgets with a finalizer."""
'''


def widget(name: str, *, namespace: str = "default", size: int = 1, **metadata: Any) -> str:
    obj = {
        "apiVersion": "toys.example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": {"size": size},
    }
    return yaml.safe_dump(obj)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The output of a kubectl run that must have succeeded."""
    assert result.returncode == 0, f"{result.args} failed: {result.stderr}"
    return result.stdout


def get(cluster: Cluster, *args: str) -> Any:
    return json.loads(ok(cluster.kubectl("get", *args, "-o", "json")))


def api(
    cluster: Cluster, method: str, path: str, body: Any = None, content_type: str = "application/json"
) -> tuple[int, Any]:
    """A raw API call, for what kubectl does not show: (HTTP status, decoded JSON body)."""
    return call(cluster.url, method, path, body, content_type)


def eventually(condition: Callable[[], bool], timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


class Lines:
    """The lines a subprocess prints, read in the background so that tests can wait on them with a deadline."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None  # started with stdout=PIPE
        for line in self.process.stdout:
            self._queue.put(line)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                line = self._queue.get(timeout=remaining).rstrip("\n")
            except queue.Empty:
                break
            self.seen.append(line)
            if predicate(line):
                return line
        raise AssertionError(f"no such line within {timeout}s; seen: {self.seen}")


@contextlib.contextmanager
def background(command: list[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """A subprocess that is interrupted (then killed if need be) when the block ends."""
    with subprocess.Popen(command, text=True, **kwargs) as process:
        try:
            yield process
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with running_emulator(tmp_path / "emulator") as cluster:
        yield cluster


@pytest.fixture
def widgets(cluster: Cluster) -> Cluster:
    """A cluster where the toy CRD is applied and established."""
    ok(cluster.kubectl("apply", "-f", "-", input=CRD))
    ok(cluster.kubectl("wait", "--for=condition=Established", "crd/widgets.toys.example.com", "--timeout=10s"))
    return cluster


def test_builtins_are_discoverable_and_crds_come_and_go(cluster: Cluster) -> None:
    builtins = ok(cluster.kubectl("api-resources", "-o", "name")).split()
    assert {"namespaces", "pods", "leases.coordination.k8s.io", "events.events.k8s.io"} <= set(builtins)
    assert "customresourcedefinitions.apiextensions.k8s.io" in builtins
    assert "doesn't have a resource type" in cluster.kubectl("get", "widgets").stderr

    ok(cluster.kubectl("apply", "-f", "-", input=CRD))
    status, resources = api(cluster, "GET", "/apis/toys.example.com/v1")
    entries = {entry["name"]: entry for entry in resources["resources"]}
    assert status == 200
    assert entries["widgets"]["kind"] == "Widget"
    assert entries["widgets"]["namespaced"] is True
    assert entries["widgets"]["shortNames"] == ["wdg"]
    assert {"get", "list", "watch", "patch", "create", "delete", "update"} <= set(entries["widgets"]["verbs"])
    assert "widgets/status" in entries
    ok(cluster.kubectl("get", "wdg"))

    ok(cluster.kubectl("delete", "crd", "widgets.toys.example.com"))
    assert api(cluster, "GET", "/apis/toys.example.com/v1")[0] == 404
    assert api(cluster, "GET", WIDGETS)[0] == 404
    assert cluster.kubectl("get", "widgets").returncode != 0  # kubectl's message depends on its discovery cache


@pytest.mark.skipif(kuberay.missing() is not None, reason=str(kuberay.missing()))
def test_kuberay_crd_is_served_at_its_stable_version(cluster: Cluster) -> None:
    crd = str(kuberay.crd("rayservices"))
    too_big = cluster.kubectl("apply", "-f", crd)  # its last-applied annotation would exceed 256 KiB, as on a cluster
    assert "metadata.annotations: Too long" in too_big.stderr
    ok(cluster.kubectl("apply", "--server-side", "-f", crd))
    assert api(cluster, "GET", "/apis/ray.io")[1]["preferredVersion"]["version"] == "v1"
    head = {"template": {"spec": {"containers": [{"name": "ray-head", "image": "rayproject/ray"}]}}}
    spec = {"rayClusterConfig": {"headGroupSpec": head}}
    service = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": "svc"}, "spec": spec}
    ok(cluster.kubectl("apply", "-f", "-", input=json.dumps(service)))
    assert get(cluster, "rayservices")["items"][0]["apiVersion"] == "ray.io/v1"


def test_short_names_and_lists_with_kind(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    assert ok(widgets.kubectl("get", "wdg", "-o", "name")) == "widget.toys.example.com/w1\n"
    assert [item["kind"] for item in get(widgets, "widgets")["items"]] == ["Widget"]

    status, listing = api(widgets, "GET", WIDGETS)
    assert status == 200
    assert (listing["kind"], listing["apiVersion"]) == ("WidgetList", "toys.example.com/v1")
    assert int(listing["metadata"]["resourceVersion"]) >= int(listing["items"][0]["metadata"]["resourceVersion"])


def test_server_owned_metadata_and_generation(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    created = get(widgets, "wdg", "w1")["metadata"]
    assert created["uid"]
    assert created["creationTimestamp"]
    assert created["generation"] == 1

    def after(*args: str) -> dict[str, Any]:
        ok(widgets.kubectl(*args))
        return get(widgets, "wdg", "w1")["metadata"]

    labelled = after("label", "wdg", "w1", "color=red")
    assert labelled["generation"] == 1
    assert int(labelled["resourceVersion"]) > int(created["resourceVersion"])
    resized = after("patch", "wdg", "w1", "--type=merge", "-p", '{"spec": {"size": 2}}')
    assert resized["generation"] == 2
    reported = after("patch", "wdg", "w1", "--subresource=status", "--type=merge", "-p", '{"status": {"phase": "Up"}}')
    assert reported["generation"] == 2
    assert int(reported["resourceVersion"]) > int(resized["resourceVersion"])
    forged = after("patch", "wdg", "w1", "--type=merge", "-p", '{"metadata": {"uid": "forged", "generation": 7}}')
    assert (forged["uid"], forged["generation"]) == (created["uid"], 2)
    unchanged = after("patch", "wdg", "w1", "--type=merge", "-p", '{"spec": {"size": 2}}')
    assert unchanged["resourceVersion"] == forged["resourceVersion"]  # a no-op is not a write


def test_status_subresource_is_separate(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    both = '{"spec": {"size": 5}, "status": {"phase": "Forged"}}'
    ok(widgets.kubectl("patch", "wdg", "w1", "--type=merge", "-p", both))
    obj = get(widgets, "wdg", "w1")
    assert obj["spec"]["size"] == 5
    assert "status" not in obj

    both = '{"spec": {"size": 9}, "status": {"phase": "Ready"}}'
    ok(widgets.kubectl("patch", "wdg", "w1", "--subresource=status", "--type=merge", "-p", both))
    obj = get(widgets, "wdg", "w1")
    assert (obj["spec"]["size"], obj["status"]["phase"]) == (5, "Ready")


def test_watch_with_kubectl_sees_updates_and_deletion(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    command = widgets.kubectl_command("get", "wdg", "--watch", "--output-watch-events")
    with background(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as process:
        lines = Lines(process)
        lines.wait_for(lambda line: line.split()[:2] == ["ADDED", "w1"])
        ok(widgets.kubectl("patch", "wdg", "w1", "--type=merge", "-p", '{"spec": {"size": 2}}'))
        lines.wait_for(lambda line: line.split()[:2] == ["MODIFIED", "w1"])
        ok(widgets.kubectl("delete", "wdg", "w1"))
        lines.wait_for(lambda line: line.split()[:2] == ["DELETED", "w1"])


def test_watch_resumes_from_resource_version_as_json_lines(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    before = get(widgets, "wdg", "w1")["metadata"]["resourceVersion"]
    ok(widgets.kubectl("patch", "wdg", "w1", "--type=merge", "-p", '{"spec": {"size": 2}}'))

    def watch(since: str) -> list[dict[str, Any]]:
        url = f"{widgets.url}{WIDGETS}?watch=true&resourceVersion={since}&timeoutSeconds=1&allowWatchBookmarks=true"
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=10) as response:  # ends by timeoutSeconds
            assert response.headers.get_content_type() == "application/json"
            events = [json.loads(line) for line in response.read().splitlines()]
        assert time.monotonic() - started < 5
        return events

    resumed = watch(before)
    assert [(event["type"], event["object"]["spec"]["size"]) for event in resumed] == [("MODIFIED", 2)]
    assert [(event["type"], event["object"]["spec"]["size"]) for event in watch("0")] == [("ADDED", 2)]


def test_put_conflicts_on_a_stale_resource_version(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    stale = get(widgets, "wdg", "w1")
    fresh = {**stale, "spec": {"size": 3}}
    ok(widgets.kubectl("replace", "-f", "-", input=json.dumps(fresh)))
    assert get(widgets, "wdg", "w1")["spec"] == {"size": 3}

    result = widgets.kubectl("replace", "-f", "-", input=json.dumps(stale))
    assert result.returncode != 0
    assert "the object has been modified" in result.stderr
    status, body = api(widgets, "PUT", f"{WIDGETS}/w1", stale)
    assert (status, body["kind"], body["reason"]) == (409, "Status", "Conflict")
    assert get(widgets, "wdg", "w1")["spec"] == {"size": 3}


def test_server_side_apply_creates_then_owns_what_it_sent(widgets: Cluster) -> None:
    result = ok(widgets.kubectl("apply", "--server-side", "-f", "-", input=widget("w1", size=4)))
    assert "serverside-applied" in result
    assert get(widgets, "wdg", "w1")["spec"] == {"size": 4}

    manifest = "apiVersion: toys.example.com/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {size: 1}\n"
    status, created = api(widgets, "PATCH", f"{WIDGETS}/w2?fieldManager=test", manifest, "application/apply-patch+yaml")
    assert (status, created["metadata"]["generation"]) == (201, 1)
    update = "apiVersion: toys.example.com/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {color: red}\n"
    path = f"{WIDGETS}/w2?fieldManager=test&force=true"
    assert api(widgets, "PATCH", path, update, "application/apply-patch+yaml")[0] == 200
    stored = get(widgets, "wdg", "w2", "--show-managed-fields")
    assert stored["spec"] == {"color": "red"}  # the manager dropped `size`, which nobody else owned
    (entry,) = stored["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == ("test", "Apply")
    assert entry["fieldsV1"] == {"f:spec": {"f:color": {}}}


def test_label_and_field_selectors(widgets: Cluster) -> None:
    for name, labels in [("red", {"color": "red"}), ("blue", {"color": "blue"}), ("plain", {})]:
        ok(widgets.kubectl("apply", "-f", "-", input=widget(name, labels=labels)))

    def names(*selector: str) -> list[str]:
        return sorted(item["metadata"]["name"] for item in get(widgets, "wdg", *selector)["items"])

    assert names("-l", "color=red") == ["red"]
    assert names("-l", "color!=red") == ["blue", "plain"]
    assert names("-l", "color in (red, blue)") == ["blue", "red"]
    assert names("-l", "color notin (red)") == ["blue", "plain"]
    assert names("-l", "color") == ["blue", "red"]
    assert names("-l", "!color") == ["plain"]
    assert names("--field-selector", "metadata.name=blue") == ["blue"]
    assert names("--field-selector", "metadata.namespace=default,metadata.name!=blue") == ["plain", "red"]


def test_finalizers_hold_deletion_until_removed(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1", finalizers=["example.com/hold"])))
    ok(widgets.kubectl("delete", "wdg", "w1", "--wait=false"))
    held = get(widgets, "wdg", "w1")["metadata"]
    assert held["deletionTimestamp"]
    assert held["finalizers"] == ["example.com/hold"]

    ok(widgets.kubectl("patch", "wdg", "w1", "--type=json", "-p", '[{"op": "remove", "path": "/metadata/finalizers"}]'))
    assert "NotFound" in widgets.kubectl("get", "wdg", "w1").stderr


def test_owner_references_cascade(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("owner")))
    owner_uid = get(widgets, "wdg", "owner")["metadata"]["uid"]

    def configmap(name: str, owner_kind: str = "", owner_name: str = "", uid: str = "") -> str:
        refs = [{"apiVersion": "v1", "kind": owner_kind, "name": owner_name, "uid": uid}] if uid else []
        return json.dumps(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "ownerReferences": refs}}
        )

    ref = {"owner_kind": "Widget", "owner_name": "owner", "uid": owner_uid}
    ok(widgets.kubectl("apply", "-f", "-", input=configmap("child", **ref)))
    child_uid = get(widgets, "configmap", "child")["metadata"]["uid"]
    ok(widgets.kubectl("apply", "-f", "-", input=configmap("grandchild", "ConfigMap", "child", child_uid)))
    ok(widgets.kubectl("apply", "-f", "-", input=configmap("unrelated")))

    ok(widgets.kubectl("delete", "wdg", "owner"))
    assert [item["metadata"]["name"] for item in get(widgets, "configmaps")["items"]] == ["unrelated"]


def test_failed_json_patch_test_op_is_422_not_500(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    version = get(widgets, "wdg", "w1")["metadata"]["resourceVersion"]

    def patch(expected_version: str) -> tuple[int, Any]:
        ops = [
            {"op": "test", "path": "/metadata/resourceVersion", "value": expected_version},
            {"op": "add", "path": "/metadata/finalizers", "value": ["example.com/hold"]},
        ]
        return api(widgets, "PATCH", f"{WIDGETS}/w1", ops, "application/json-patch+json")

    status, body = patch("stale")
    assert (status, body["kind"], body["reason"]) == (422, "Status", "Invalid")
    assert "finalizers" not in get(widgets, "wdg", "w1")["metadata"]
    assert patch(version)[0] == 200
    assert get(widgets, "wdg", "w1")["metadata"]["finalizers"] == ["example.com/hold"]


def test_kubectl_wait_for_condition(widgets: Cluster) -> None:
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1")))
    command = widgets.kubectl_command("wait", "--for=condition=Ready", "wdg/w1", "--timeout=20s")
    with background(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as waiting:
        ready = '{"status": {"conditions": [{"type": "Ready", "status": "True"}]}}'
        ok(widgets.kubectl("patch", "wdg", "w1", "--subresource=status", "--type=merge", "-p", ready))
        assert waiting.wait(timeout=20) == 0
        assert "condition met" in (waiting.stdout.read() if waiting.stdout else "")


def test_errors_are_status_objects(widgets: Cluster) -> None:
    result = widgets.kubectl("get", "wdg", "missing")
    assert 'Error from server (NotFound): widgets.toys.example.com "missing" not found' in result.stderr
    status, body = api(widgets, "GET", f"{WIDGETS}/missing")
    assert (status, body["kind"], body["reason"], body["details"]["name"]) == (404, "Status", "NotFound", "missing")

    ok(widgets.kubectl("create", "-f", "-", input=widget("w1")))
    assert "AlreadyExists" in widgets.kubectl("create", "-f", "-", input=widget("w1")).stderr
    status, body = api(widgets, "POST", WIDGETS, yaml.safe_load(widget("w1")))
    assert (status, body["kind"], body["reason"]) == (409, "Status", "AlreadyExists")


def test_namespaces_exist_as_objects_and_take_their_objects_along(widgets: Cluster) -> None:
    names = set(ok(widgets.kubectl("get", "namespaces", "-o", "name")).split())
    assert {"namespace/default", "namespace/kube-system"} <= names
    missing = widgets.kubectl("apply", "-f", "-", input=widget("w1", namespace="team"))
    assert 'namespaces "team" not found' in missing.stderr

    ok(widgets.kubectl("create", "namespace", "team"))
    ok(widgets.kubectl("apply", "-f", "-", input=widget("w1", namespace="team")))
    assert get(widgets, "wdg", "-n", "team")["items"]
    ok(widgets.kubectl("delete", "namespace", "team"))
    assert get(widgets, "wdg", "--all-namespaces")["items"] == []


def test_kubectl_create_of_builtins_sent_as_protobuf(cluster: Cluster) -> None:
    ok(cluster.kubectl("create", "configmap", "settings", "--from-literal=mode=fast"))
    ok(cluster.kubectl("create", "secret", "generic", "token", "--from-literal=key=s3cret"))
    assert get(cluster, "configmap", "settings")["data"] == {"mode": "fast"}
    assert get(cluster, "secret", "token")["data"] == {"key": "czNjcmV0"}  # base64 of s3cret


def test_events_can_be_posted_and_listed(cluster: Cluster) -> None:
    core = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "note-"},
        "involvedObject": {"kind": "ConfigMap", "name": "settings", "namespace": "default"},
        "reason": "Noted",
        "message": "a core event",
    }
    ok(cluster.kubectl("create", "-f", "-", input=json.dumps(core)))
    [event] = get(cluster, "events")["items"]
    assert event["metadata"]["name"].startswith("note-")
    assert event["involvedObject"]["name"] == "settings"

    modern = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "modern"}, "reason": "Noted"}
    ok(cluster.kubectl("create", "-f", "-", input=json.dumps(modern)))
    assert [item["metadata"]["name"] for item in get(cluster, "events.v1.events.k8s.io")["items"]] == ["modern"]


def test_kopf_operator_patches_status_and_releases_its_finalizer(widgets: Cluster, tmp_path: Path) -> None:
    ok(widgets.kubectl("create", "namespace", "operated"))
    script = tmp_path / "operator.py"
    script.write_text(OPERATOR)
    log_path = tmp_path / "kopf.log"
    command = [sys.executable, "-m", "kopf", "run", "--standalone", "--namespace=operated", "--verbose", str(script)]
    with log_path.open("w") as log, background(command, env=widgets.env(), stdout=log, stderr=subprocess.STDOUT):
        ok(widgets.kubectl("apply", "-f", "-", input=widget("w1", namespace="operated")))

        def phase() -> str:
            return ok(widgets.kubectl("get", "wdg", "w1", "-n", "operated", "-o", "jsonpath={.status.phase}"))

        def reasons() -> list[str]:
            return [event["reason"] for event in get(widgets, "events", "-n", "operated")["items"]]

        assert eventually(lambda: phase() == "Ready"), log_path.read_text()
        assert KOPF_FINALIZER in get(widgets, "wdg", "w1", "-n", "operated")["metadata"]["finalizers"]
        assert eventually(lambda: "Ready" in reasons()), log_path.read_text()

        ok(widgets.kubectl("delete", "wdg", "w1", "-n", "operated", "--timeout=20s"))
        assert "NotFound" in widgets.kubectl("get", "wdg", "w1", "-n", "operated").stderr
