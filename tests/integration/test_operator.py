"""The real operator process and the real kubectl against a real Kubernetes API.

The API is a control plane of the session's own (etcd and kube-apiserver from envtest's binaries, plus
kube-controller-manager for garbage collection; see tests/kube/envtest.py). With
`python -m pytest -m kube --kubeconfig PATH` the same tests run against that cluster (KubeRay's CRDs
installed, its controller stopped: `_play_kuberay` writes RayService status as KubeRay 1.7 does).

The operator runs as a ServiceAccount bound to the roles the Helm chart renders, so a permission the chart
lacks fails here with the API server's own 403 (and the operator's log is checked for one at the end).
Each test has a namespace of its own; the tests that need an operator of another kind (one that fails on
purpose, a namespaced one, one without KubeRay) get a control plane of their own.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart import render
from tests.kube import kuberay
from tests.kube.clusters import Cluster, private_cluster
from tests.kube.envtest import dying_with_this_process
from tests.replica_info import replica_info
from zerocopy_runtime.contract import ROUTER_APP

pytestmark = [pytest.mark.integration, pytest.mark.kube]

ROOT = Path(__file__).resolve().parents[2]
INFO = replica_info()
#: How the API server words an RBAC refusal (a 403 for a namespace being terminated reads differently).
RBAC_REFUSAL = re.compile(r'forbidden: User \\?"[^"\\]+\\?" cannot [a-z]+ resource')
#: The kinds of the chart's objects that make the operator's identity and its permissions.
ACCOUNT_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def cluster(kube_cluster: Cluster) -> Cluster:
    if (reason := kuberay.missing()) is not None:
        pytest.skip(reason)
    return kube_cluster


@pytest.fixture
def namespace(kube_namespace: str) -> str:
    return kube_namespace


def _own_control_plane(request: pytest.FixtureRequest, tmp_path: Path) -> contextlib.AbstractContextManager[Cluster]:
    """A control plane of the test's own, for an operator that must not meet the module's."""
    if request.config.getoption("--kubeconfig"):
        pytest.skip("needs a control plane of its own (an operator beside the module's would race it)")
    if (reason := kuberay.missing()) is not None:
        pytest.skip(reason)
    return private_cluster(tmp_path)


class _Info(BaseHTTPRequestHandler):
    """Plays the replicas' GET <route>/-/info."""

    def do_GET(self) -> None:
        body = INFO.model_dump_json().encode()
        self.send_response(200 if self.path.endswith("/-/info") else 404)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet


@pytest.fixture(scope="module")
def info_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Info)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}{{route}}/-/info"
    server.shutdown()


def chart_account(cluster: Cluster, folder: Path, *helm_args: str) -> Path:
    """The chart's ServiceAccount and roles, rendered by helm and applied in a release namespace of their own; a
    kubeconfig that authenticates as that ServiceAccount (a bound token)."""
    release = cluster.new_namespace("zc-system")
    objects = [o for o in render(*helm_args, namespace=release) if o["kind"] in ACCOUNT_KINDS]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(objects), check=True)
    (account,) = [o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"]
    return cluster.token_kubeconfig(release, account, folder / "operator.kubeconfig")


class Operator:
    """`python -m zerocopy_operator` in a subprocess under `kubeconfig`'s identity; restartable.

    `namespaces`: the ones it watches (none: all, as the chart's default install).
    """

    def __init__(
        self,
        cluster: Cluster,
        kubeconfig: Path,
        info_url: str,
        log: Path,
        namespaces: tuple[str, ...] = (),
        module: str = "zerocopy_operator",
    ) -> None:
        self.cluster, self.kubeconfig, self.info_url, self.log = cluster, kubeconfig, info_url, log
        self.namespaces, self.module = namespaces, module
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = _free_port()
        command = [
            sys.executable, "-m", self.module, "--verbose", *(f"--namespace={n}" for n in self.namespaces),
            "--liveness", f"http://127.0.0.1:{port}/healthz", "--info-url", self.info_url, "--image", "runtime:test",
        ]  # fmt: skip
        env = {**self.cluster.env(), "KUBECONFIG": str(self.kubeconfig), "PYTHONPATH": str(ROOT)}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                dying_with_this_process(command), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
            )
        eventually(lambda: self._live(port) or self._exited(), timeout=60, what="the operator's liveness endpoint")
        assert self.process.poll() is None, self.log.read_text()[-3000:]

    def _live(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def forbidden(self) -> list[str]:
        """The lines of its log where RBAC refused it a request (403 `User "..." cannot <verb> resource`; not the
        403 of a namespace being deleted under it)."""
        lines = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        return [line for line in lines if RBAC_REFUSAL.search(line)]


@contextlib.contextmanager
def running_operator(operator: Operator) -> Iterator[Operator]:
    """The operator for the block; at its end, no request of it may have been forbidden by the chart's roles."""
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()
    refused = operator.forbidden()
    assert not refused, "the chart's roles refused the operator a request:\n" + "\n".join(refused[:5])


@pytest.fixture(scope="module")
def operator(cluster: Cluster, info_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """One operator for the module, watching every namespace under the chart's default (cluster-wide) roles."""
    folder = tmp_path_factory.mktemp("operator")
    running = Operator(cluster, chart_account(cluster, folder), info_url, folder / "operator.log")
    with running_operator(running):
        yield running


def eventually(check: Callable[[], Any], timeout: float = 60, what: str = "the condition") -> Any:
    """Poll `check` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.3)


def _model(name: str, **serving: Any) -> dict[str, Any]:
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"] = {"name": name}
    resource["spec"]["model"]["uri"] = "file:///models/tiny-mlp.safetensors"
    resource["spec"]["serving"].update(routePrefix=f"/{name}", **serving)
    return resource


def _apply(cluster: Cluster, namespace: str, resource: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(resource), check=True)


def _get(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl("get", kind, name, "-n", namespace, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def _serve_config(rayservice: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    return config


def _condition(resource: dict[str, Any] | None, kind: str = "Ready") -> dict[str, Any]:
    conditions = ((resource or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def _event(cluster: Cluster, namespace: str, name: str, reason: str) -> dict[str, Any] | None:
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout)
    return next((e for e in events["items"] if (e["involvedObject"]["name"], e["reason"]) == (name, reason)), None)


def _play_kuberay(cluster: Cluster, namespace: str, name: str, apps: dict[str, str] | None = None) -> None:
    """What KubeRay writes once the cluster is up and the Serve apps run (its CRD requires every field of a
    condition, `lastTransitionTime` included: a real API server refuses the status without it).

    `apps`: each application's Serve status; default, the one application named after the RayService, RUNNING.
    """
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    ready = {"type": "Ready", "status": "True", "reason": "RayServiceReady", "message": "ready"}
    healthy = {"ZeroCopyDeployment": {"status": "HEALTHY"}}
    statuses = {
        app: {"status": state, "serveDeploymentStatuses": healthy if state == "RUNNING" else {}}
        for app, state in (apps or {name: "RUNNING"}).items()
    }
    status = {
        "conditions": [{**ready, "lastTransitionTime": now}],
        "activeServiceStatus": {"applicationStatuses": statuses},
    }
    cluster.kubectl(
        "patch", "rayservice", name, "-n", namespace, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": status}), check=True,
    )  # fmt: skip


def test_a_model_becomes_an_owned_rayservice_then_ready_with_endpoint_and_weights(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    _apply(cluster, namespace, _model("alpha"))
    rayservice = eventually(lambda: _get(cluster, namespace, "rayservice", "alpha"), what="RayService alpha")
    model = _get(cluster, namespace, "zcm", "alpha")
    assert model is not None
    owner = rayservice["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "ZeroCopyModel", "alpha", model["metadata"]["uid"], True,
    )  # fmt: skip
    assert _serve_config(rayservice)["applications"][0]["import_path"] == "zerocopy_runtime.serve:build_app"
    eventually(lambda: _condition(_get(cluster, namespace, "zcm", "alpha")).get("reason") == "Provisioning")
    created = eventually(lambda: _event(cluster, namespace, "alpha", "Created"), what="a Normal event on alpha")
    assert (created["type"], created["message"]) == ("Normal", "RayService alpha created")

    _play_kuberay(cluster, namespace, "alpha")
    waited = cluster.kubectl("wait", "zcm/alpha", "-n", namespace, "--for=condition=Ready", "--timeout=60s")
    assert waited.returncode == 0, waited.stderr
    status = (_get(cluster, namespace, "zcm", "alpha") or {})["status"]
    assert status["phase"] == "Ready"
    assert status["endpoint"] == f"http://alpha-serve-svc.{namespace}.svc:8000/alpha"
    assert status["weights"]["bytes"] == INFO.bytes_shared
    assert _condition({"status": status}, "WeightsPublished")["status"] == "True"
    assert status["replicas"] == "2/2"


def test_a_spec_edit_changes_the_serve_config_in_place(cluster: Cluster, namespace: str, operator: Operator) -> None:
    _apply(cluster, namespace, _model("beta", replicas=1))
    first = eventually(lambda: _get(cluster, namespace, "rayservice", "beta"), what="RayService beta")
    _apply(cluster, namespace, _model("beta", replicas=3))

    def updated() -> dict[str, Any] | None:
        current = _get(cluster, namespace, "rayservice", "beta")
        deployment = _serve_config(current)["applications"][0]["deployments"][0] if current else {}
        return current if deployment.get("num_replicas") == 3 else None

    second = eventually(updated, what="num_replicas 3 in serveConfigV2")
    assert second["metadata"]["uid"] == first["metadata"]["uid"]  # updated, not replaced by a new one
    assert second["spec"]["rayClusterConfig"] == first["spec"]["rayClusterConfig"]


def test_a_rayservice_deleted_or_edited_by_hand_is_restored(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    _apply(cluster, namespace, _model("gamma"))
    original = eventually(lambda: _get(cluster, namespace, "rayservice", "gamma"), what="RayService gamma")
    cluster.kubectl("delete", "rayservice", "gamma", "-n", namespace, "--wait=false", check=True)
    restored = eventually(
        lambda: (
            (r := _get(cluster, namespace, "rayservice", "gamma"))
            and r["metadata"]["uid"] != original["metadata"]["uid"]
            and r
        ),
        what="RayService gamma re-created",
    )
    assert restored["spec"]["serveConfigV2"] == original["spec"]["serveConfigV2"]
    edit = {"spec": {"rayClusterConfig": {"rayVersion": "2.0.0"}}}
    cluster.kubectl("patch", "rayservice", "gamma", "-n", namespace, "--type=merge", "-p", json.dumps(edit), check=True)
    eventually(
        lambda: (
            (_get(cluster, namespace, "rayservice", "gamma") or {})["spec"]["rayClusterConfig"]["rayVersion"]
            == original["spec"]["rayClusterConfig"]["rayVersion"]
        ),
        what="the hand edit of rayVersion to be put back",
    )


def test_a_bad_model_gets_a_condition_and_an_event_while_others_reconcile(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    _apply(cluster, namespace, _model("broken", gpusPerReplica=2))
    _apply(cluster, namespace, _model("fine"))
    ready = eventually(
        lambda: (
            _condition(_get(cluster, namespace, "zcm", "broken")).get("reason") == "InvalidSpec"
            and _condition(_get(cluster, namespace, "zcm", "broken"))
        ),
        what="broken's InvalidSpec condition",
    )
    assert ready["status"] == "False"
    assert "gpusPerReplica is 2 but no worker group has more than 0 GPUs" in ready["message"]
    assert (_get(cluster, namespace, "zcm", "broken") or {})["status"]["phase"] == "Failed"
    eventually(lambda: _get(cluster, namespace, "rayservice", "fine"), what="RayService fine, despite broken")
    assert _get(cluster, namespace, "rayservice", "broken") is None

    event = eventually(lambda: _event(cluster, namespace, "broken", "InvalidSpec"), what="a Warning event on broken")
    assert event["type"] == "Warning"
    before = _events_of(cluster, namespace, "broken")
    _play_kuberay(cluster, namespace, "fine")  # unrelated activity: no new event for broken (no retry storm)
    cluster.kubectl("wait", "zcm/fine", "-n", namespace, "--for=condition=Ready", "--timeout=60s", check=True)
    assert _events_of(cluster, namespace, "broken") == before


def _events_of(cluster: Cluster, namespace: str, name: str) -> list[tuple[str, int]]:
    """Each event about `name`, with how many times it was posted (a repeated event counts up, it is not new)."""
    events = json.loads(cluster.kubectl("get", "events", "-n", namespace, "-o", "json", check=True).stdout)["items"]
    return sorted((e["reason"], e.get("count") or 1) for e in events if e["involvedObject"]["name"] == name)


def test_an_unexpected_failure_is_a_condition_and_an_event_not_a_retry_loop(
    request: pytest.FixtureRequest, info_url: str, tmp_path: Path
) -> None:
    """A bug in the builder (injected through the Settings.build seam) is reported once, then left alone."""
    with _own_control_plane(request, tmp_path) as cluster:
        own = cluster.new_namespace("faulty")
        faulty = Operator(
            cluster, chart_account(cluster, tmp_path), info_url, tmp_path / "faulty.log",
            module="tests.integration.faulty_operator",
        )  # fmt: skip
        with running_operator(faulty):
            _apply(cluster, own, _model("buggy"))
            ready = eventually(
                lambda: (c := _condition(_get(cluster, own, "zcm", "buggy"))).get("reason") == "OperatorError" and c,
                what="buggy's OperatorError condition",
            )
            assert ready["status"] == "False"
            assert "KeyError" in ready["message"]
            assert "injected failure building the RayService of buggy" in ready["message"]
            assert "will not retry until the spec changes" in ready["message"]
            event = eventually(lambda: _event(cluster, own, "buggy", "OperatorError"), what="a Warning event on buggy")
            assert event["type"] == "Warning"
            assert _get(cluster, own, "rayservice", "buggy") is None  # nothing half-applied
            # kopf records the spec as handled: it will not run the handler again for this spec.
            handled = eventually(
                lambda: ((_get(cluster, own, "zcm", "buggy") or {})["metadata"].get("annotations") or {}).get(
                    "zerocopy.dev/last-handled-configuration"
                ),
                what="kopf's record that this spec was handled",
            )
            model = _get(cluster, own, "zcm", "buggy") or {}
            assert json.loads(handled)["spec"] == model["spec"]
            assert model["status"]["observedGeneration"] == model["metadata"]["generation"]
            # A new spec is a new attempt.
            _apply(cluster, own, _model("buggy", replicas=3))
            eventually(
                lambda: (
                    (m := _get(cluster, own, "zcm", "buggy") or {})["status"]["observedGeneration"]
                    == m["metadata"]["generation"]
                    > model["metadata"]["generation"]
                ),
                what="the edited spec to be handled again",
            )
            assert "Traceback" not in _condition(_get(cluster, own, "zcm", "buggy"))["message"]


def test_a_namespaced_operator_leaves_other_namespaces_alone(
    request: pytest.FixtureRequest, info_url: str, tmp_path: Path
) -> None:
    """The chart's namespaced install (a Role per watched namespace, no ClusterRole): models outside the watched
    namespaces are not the operator's business, and inside them the Role is enough."""
    with _own_control_plane(request, tmp_path) as cluster:
        watched, other = cluster.new_namespace("watched"), cluster.new_namespace("other")
        account = chart_account(cluster, tmp_path, "--set", f"watchNamespaces={{{watched}}}")
        namespaced = Operator(cluster, account, info_url, tmp_path / "namespaced.log", namespaces=(watched,))
        with running_operator(namespaced):
            _apply(cluster, other, _model("outsider"))
            _apply(cluster, watched, _model("insider"))  # handled after the outsider's event, were it watched
            eventually(lambda: _get(cluster, watched, "rayservice", "insider"), what="RayService insider")
            _play_kuberay(cluster, watched, "insider")
            cluster.kubectl("wait", "zcm/insider", "-n", watched, "--for=condition=Ready", "--timeout=60s", check=True)
            assert _get(cluster, other, "rayservice", "outsider") is None
            outsider = _get(cluster, other, "zcm", "outsider")
            assert outsider is not None
            assert not outsider.get("status")
            assert not [k for k in outsider["metadata"].get("annotations", {}) if k.startswith("zerocopy.dev/")]


def test_an_operator_restart_duplicates_nothing_and_deletion_removes_everything(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    if not cluster.garbage_collected:
        pytest.skip("no kube-controller-manager beside the API server: nothing deletes what an owner leaves behind")
    _apply(cluster, namespace, _model("delta"))
    first = eventually(lambda: _get(cluster, namespace, "rayservice", "delta"), what="RayService delta")
    operator.stop()
    operator.start()
    _apply(cluster, namespace, _model("epsilon"))  # the restarted operator works
    eventually(lambda: _get(cluster, namespace, "rayservice", "epsilon"), what="RayService epsilon")
    listed = json.loads(cluster.kubectl("get", "rayservices", "-n", namespace, "-o", "json", check=True).stdout)
    names = [item["metadata"]["name"] for item in listed["items"]]
    assert names.count("delta") == 1
    assert (_get(cluster, namespace, "rayservice", "delta") or {})["metadata"]["uid"] == first["metadata"]["uid"]
    model = _get(cluster, namespace, "zcm", "delta") or {}
    assert not model["metadata"].get("finalizers"), "deletion relies on owner references, not finalizers"
    cluster.kubectl("delete", "zcm", "delta", "-n", namespace, check=True, timeout=60)
    eventually(lambda: _get(cluster, namespace, "rayservice", "delta") is None, what="RayService delta deleted")


def _pool(name: str, store: str = "512Mi") -> dict[str, Any]:
    """A ZeroCopyCluster with one CPU worker group."""
    group = {"name": "cpu", "gpus": 0, "cpu": "2", "memory": "2Gi", "objectStoreMemory": store}
    return {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ZeroCopyCluster", "metadata": {"name": name},
            "spec": {"workerGroups": [group]}}  # fmt: skip


def _on(pool: str, name: str, **serving: Any) -> dict[str, Any]:
    """A model that runs on ZeroCopyCluster `pool`."""
    resource = _model(name, **serving)
    del resource["spec"]["cluster"]
    resource["spec"]["clusterRef"] = {"name": pool}
    return resource


def _apps(rayservice: dict[str, Any] | None) -> dict[str, Any]:
    """The models' applications (not the cluster's OpenAI router)."""
    applications = _serve_config(rayservice)["applications"] if rayservice else []
    return {app["name"]: app for app in applications if app["name"] != ROUTER_APP}


def test_models_on_a_shared_cluster_are_applications_of_its_one_rayservice(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    _apply(cluster, namespace, _pool("pool"))
    _apply(cluster, namespace, _on("pool", "chat-a", task="text-generation"))
    _apply(cluster, namespace, _on("pool", "embed-b"))
    rayservice = eventually(
        lambda: (r := _get(cluster, namespace, "rayservice", "pool")) and set(_apps(r)) == {"chat-a", "embed-b"} and r,
        what="RayService pool with both models' applications",
    )
    pool = _get(cluster, namespace, "zcc", "pool") or {}
    owner = rayservice["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("ZeroCopyCluster", pool["metadata"]["uid"])
    assert _get(cluster, namespace, "rayservice", "chat-a") is None  # no cluster of its own
    assert {a["route_prefix"] for a in _apps(rayservice).values()} == {"/chat-a", "/embed-b"}

    _play_kuberay(cluster, namespace, "pool", {"chat-a": "RUNNING", "embed-b": "DEPLOYING"})
    cluster.kubectl("wait", "zcm/chat-a", "-n", namespace, "--for=condition=Ready", "--timeout=60s", check=True)
    chat = (_get(cluster, namespace, "zcm", "chat-a") or {})["status"]
    assert (chat["rayService"], chat["cluster"]) == ("pool", "pool")
    assert chat["endpoint"] == f"http://pool-serve-svc.{namespace}.svc:8000/chat-a"
    assert chat["weights"]["bytes"] == INFO.bytes_shared
    assert _condition(_get(cluster, namespace, "zcm", "embed-b"))["status"] == "False"  # its own app deploys
    status = eventually(
        lambda: (
            ((p := _get(cluster, namespace, "zcc", "pool") or {}).get("status") or {}).get("modelsReady") == "1/2"
            and p["status"]
        ),
        what="the cluster's status to count one of two models serving",
    )
    assert status["phase"] == "Ready"
    # One OpenAI endpoint for the cluster's text model, shown in its status (kept by the CRD's schema).
    assert status["openaiBaseUrl"] == f"http://pool-serve-svc.{namespace}.svc:8000/v1"
    (router,) = [a for a in _serve_config(rayservice)["applications"] if a["name"] == ROUTER_APP]
    assert (router["route_prefix"], [m["name"] for m in router["args"]["models"]]) == ("/", ["chat-a"])
    assert [(m["name"], m["application"], m["ready"]) for m in status["models"]] == [
        ("chat-a", "RUNNING", True), ("embed-b", "DEPLOYING", False),
    ]  # fmt: skip
    # Both tiny-mlp checkpoints (1Mi each, by their size) in the worker group's store.
    assert status["objectStore"][0]["weightsBytes"] == 2 * 2**20
    table = cluster.kubectl("get", "zcc", "pool", "-n", namespace, check=True).stdout
    assert "1/2" in table, table
    assert "cpu 2Mi/512Mi" in table, table

    # One model's edit changes its application only: the Ray cluster and the other application stay as they are.
    _apply(cluster, namespace, _on("pool", "chat-a", replicas=3))
    edited = eventually(
        lambda: (
            (r := _get(cluster, namespace, "rayservice", "pool"))
            and _apps(r)["chat-a"]["deployments"][0]["num_replicas"] == 3
            and r
        ),
        what="chat-a's application with 3 replicas",
    )
    assert edited["metadata"]["uid"] == rayservice["metadata"]["uid"]
    assert edited["spec"]["rayClusterConfig"] == rayservice["spec"]["rayClusterConfig"]
    assert _apps(edited)["embed-b"] == _apps(rayservice)["embed-b"]

    # A deleted model's application goes; the other stays.
    cluster.kubectl("delete", "zcm", "embed-b", "-n", namespace, check=True, timeout=60)
    remaining = eventually(
        lambda: (r := _get(cluster, namespace, "rayservice", "pool")) and set(_apps(r)) == {"chat-a"} and r,
        what="embed-b's application to be removed",
    )
    assert _apps(remaining)["chat-a"] == _apps(edited)["chat-a"]


def test_a_model_waits_for_its_cluster_and_a_model_that_does_not_fit_is_refused_alone(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    _apply(cluster, namespace, _on("late", "early-bird"))
    waiting = eventually(
        lambda: (
            (c := _condition(_get(cluster, namespace, "zcm", "early-bird"))).get("reason") == "ClusterNotFound" and c
        ),
        what="early-bird's ClusterNotFound condition",
    )
    assert "ZeroCopyCluster late does not exist" in waiting["message"]
    _apply(cluster, namespace, _pool("late", store="128Mi"))
    eventually(
        lambda: "early-bird" in _apps(_get(cluster, namespace, "rayservice", "late")),
        what="early-bird picked up when its cluster appeared",
    )
    big = _on("late", "too-big")
    big["spec"]["model"]["size"] = "128Mi"  # fits the store alone, not beside early-bird
    _apply(cluster, namespace, big)
    refused = eventually(
        lambda: (c := _condition(_get(cluster, namespace, "zcm", "too-big"))).get("reason") == "InvalidSpec" and c,
        what="too-big's InvalidSpec condition",
    )
    assert "would not fit worker group cpu of ZeroCopyCluster late" in refused["message"]
    event = eventually(lambda: _event(cluster, namespace, "too-big", "InvalidSpec"), what="a Warning event on too-big")
    assert event["type"] == "Warning"
    assert set(_apps(_get(cluster, namespace, "rayservice", "late"))) == {"early-bird"}


def test_a_model_moving_onto_a_cluster_gives_up_its_own_rayservice(
    cluster: Cluster, namespace: str, operator: Operator
) -> None:
    _apply(cluster, namespace, _pool("host"))
    _apply(cluster, namespace, _model("mover"))
    eventually(lambda: _get(cluster, namespace, "rayservice", "mover"), what="mover's own RayService")
    _apply(cluster, namespace, _on("host", "mover"))
    eventually(lambda: _get(cluster, namespace, "rayservice", "mover") is None, what="mover's own RayService deleted")
    eventually(lambda: "mover" in _apps(_get(cluster, namespace, "rayservice", "host")), what="mover on host")
    _apply(cluster, namespace, _model("mover"))  # and back to a cluster of its own
    eventually(lambda: "mover" not in _apps(_get(cluster, namespace, "rayservice", "host")), what="mover off host")
    eventually(lambda: _get(cluster, namespace, "rayservice", "mover"), what="mover's own RayService again")


def test_without_kuberay_the_operator_says_so_and_stops(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if request.config.getoption("--kubeconfig"):
        pytest.skip("needs a control plane of its own, without KubeRay's CRDs")
    with private_cluster(tmp_path, crds=False) as bare:
        bare.kubectl("apply", "-f", str(ROOT / "crds" / "zerocopymodels.zerocopy.dev.yaml"), check=True)
        command = [sys.executable, "-m", "zerocopy_operator", "--liveness", "", "--log-format", "plain"]
        env = {**bare.env(), "PYTHONPATH": str(ROOT)}
        out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode != 0
    assert "KubeRay's CRD rayservices.ray.io is not installed" in out.stdout + out.stderr


class _CuttableProxy:
    """A TCP proxy in front of the API server that a test can cut: every open connection closed at once and new
    ones dropped on arrival (counted), until it is restored. TLS passes through untouched."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_at: float | None = None
        self.dropped = 0
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            self.cut_at = time.monotonic()
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def restore(self) -> None:
        with self._lock:
            self.cut_at = None

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self.cut_at is not None:
                    self.dropped += 1
                    client.close()
                    continue
                server = socket.create_connection(self.upstream)
                self._open.update((client, server))
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


def test_a_dropped_connection_to_the_api_server_mid_reconcile_is_retried_until_the_model_is_ready(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The API server goes away in the middle of a reconcile (between reading a replica's /-/info and writing
    the status): the operator retries on its own and the model reaches Ready, with no spec change."""
    with _own_control_plane(request, tmp_path) as cluster:
        own = cluster.new_namespace("dropped")
        kubeconfig = yaml.safe_load(chart_account(cluster, tmp_path).read_text())
        entry = kubeconfig["clusters"][0]["cluster"]
        host, _, port = entry["server"].removeprefix("https://").rpartition(":")
        proxy = _CuttableProxy((host, int(port)))
        entry["server"] = f"https://{host}:{proxy.port}"
        proxied = tmp_path / "proxied.kubeconfig"
        proxied.write_text(yaml.safe_dump(kubeconfig))

        class CutOnFirstInfo(_Info):
            """The first /-/info answers, and the API server is gone for whoever asked."""

            def do_GET(self) -> None:
                if proxy.cut_at is None and not proxy.dropped:
                    proxy.cut()
                super().do_GET()

        server = ThreadingHTTPServer(("127.0.0.1", 0), CutOnFirstInfo)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        info_url = f"http://127.0.0.1:{server.server_address[1]}{{route}}/-/info"
        operator = Operator(cluster, proxied, info_url, tmp_path / "operator.log", namespaces=(own,))
        try:
            with running_operator(operator):
                _apply(cluster, own, _model("alpha"))
                eventually(lambda: _get(cluster, own, "rayservice", "alpha"), what="RayService alpha")
                _play_kuberay(cluster, own, "alpha")  # Ready: the next reconcile reads /-/info, and the cut comes
                eventually(lambda: proxy.dropped >= 1, what="the operator to find the API server gone")
                assert _condition(_get(cluster, own, "zcm", "alpha")).get("status") != "True"
                proxy.restore()
                model = eventually(
                    lambda: _condition(m := _get(cluster, own, "zcm", "alpha")).get("status") == "True" and m,
                    timeout=90,
                    what="alpha Ready after the API server came back",
                )
                assert model["status"]["weights"]["revision"] == INFO.revision
                assert model["metadata"]["generation"] == 1  # no spec change brought it back
                log = operator.log.read_text(errors="replace")
                assert "retrying" in log
                assert "OperatorError" not in log
        finally:
            server.shutdown()
            proxy.close()
