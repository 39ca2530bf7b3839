"""End to end on kind: the operator image and chart, KubeRay, and every example served and answering.

Each example is applied as `tests/e2e/overrides.py:for_kind` makes it (CPU only, laptop-sized pods,
checkpoints inside the examples image), must become Ready, answers a prediction through its Serve
service (reached with `kubectl port-forward`), and leaves nothing behind once deleted. An example file
with a ZeroCopyCluster (examples/shared-cluster.yaml) is applied as a whole: the cluster and every
model on it, each model answering on its route of the cluster's one Serve service.
See tests/e2e/conftest.py for the cluster and the environment variables.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.conftest import MODELS_NAMESPACE, ROOT, SYSTEM_NAMESPACE, Cluster, tool
from tests.e2e.overrides import SAMPLES, Sample, documents_for_kind

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3 * 3600)]

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SELECTED = {n.strip() for n in os.environ.get("ZEROCOPY_E2E_EXAMPLES", "").split(",") if n.strip()}
#: Ray pods start, pull nothing (the image is loaded), publish the weights; gpt2 downloads from the hub first.
READY_TIMEOUT = os.environ.get("ZEROCOPY_E2E_READY_TIMEOUT", "20m")
SERVE_PORT = 8000


def _documents(path: Path) -> list[dict[str, Any]]:
    """The example file's ZeroCopyClusters and ZeroCopyModels, made for kind, in the models' namespace."""
    return documents_for_kind(list(yaml.safe_load_all(path.read_text())), MODELS_NAMESPACE)


def _models(path: Path) -> list[dict[str, Any]]:
    return [d for d in _documents(path) if d["kind"] == "ZeroCopyModel"]


def _has_cluster(path: Path) -> bool:
    return any(d["kind"] == "ZeroCopyCluster" for d in _documents(path))


#: Examples whose models each have a cluster of their own, served one model at a time.
OWN_CLUSTERS = [p for p in EXAMPLES if not _has_cluster(p)]
#: Examples with a ZeroCopyCluster: applied together, its models served side by side on it.
SHARED_CLUSTERS = [p for p in EXAMPLES if _has_cluster(p)]


def _apply(cluster: Cluster, resource: dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / f"{resource['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(resource, sort_keys=False))
    cluster.kubectl("apply", "-f", str(path))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _port_forward(cluster: Cluster, namespace: str, target: str, remote: int) -> Iterator[int]:
    """`kubectl port-forward` to a free local port, for as long as the block runs."""
    local = _free_port()
    command = [tool("kubectl") or "kubectl", "--kubeconfig", str(cluster.kubeconfig), "port-forward"]
    command += ["--address", "127.0.0.1", "-n", namespace, target, f"{local}:{remote}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise ConnectionError(
                    f"kubectl port-forward {target} ended: {process.stdout.read() if process.stdout else ''}"
                )
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", local), timeout=1):
                break
            if time.monotonic() > deadline:
                raise ConnectionError(f"kubectl port-forward {target} did not listen on {local} in 30 s")
            time.sleep(0.3)
        yield local
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _call(
    cluster: Cluster, name: str, path: str, body: dict[str, Any] | None, within_s: float = 300, on: str | None = None
) -> Any:
    """POST `body` (or GET) to the model's Serve service (that of ZeroCopyCluster `on`, if it names one),
    retrying while Serve routes the new application."""
    deadline, last = time.monotonic() + within_s, ""
    service = f"svc/{on or name}-serve-svc"
    while True:
        try:
            with _port_forward(cluster, MODELS_NAMESPACE, service, SERVE_PORT) as port:
                data = None if body is None else json.dumps(body).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}{path}", data=data, headers={"content-type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=120) as response:
                    assert response.status == 200
                    return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:1000]!r}"
            if exc.code == 400:  # the model refused the request: retrying will not help
                pytest.fail(f"{path} refused the sample request: {last}")
        except (OSError, ConnectionError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            diagnostics = cluster.diagnostics(MODELS_NAMESPACE, name, on)
            pytest.fail(f"{path} did not answer in {within_s:g} s; last: {last}\n{diagnostics}")
        time.sleep(5)


def _wait_gone(cluster: Cluster, name: str, within_s: float = 600) -> None:
    """Until the model, its RayService and every pod labelled with it are gone."""
    _wait_all_gone(cluster, [("zerocopymodel", name), ("rayservice", name)], f"zerocopy.dev/model={name}", within_s)


def _wait_all_gone(cluster: Cluster, objects: list[tuple[str, str]], selector: str, within_s: float = 600) -> None:
    """Until each (kind, name) of `objects` and every pod `selector` selects are gone."""
    deadline = time.monotonic() + within_s
    while True:
        found = [
            cluster.kubectl("get", kind, name, "-n", MODELS_NAMESPACE, "--ignore-not-found", "-o", "name").stdout
            for kind, name in objects
        ]
        found.append(cluster.kubectl("get", "pods", "-n", MODELS_NAMESPACE, "-l", selector, "-o", "name").stdout)
        left = " ".join(found).split()
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"still there {within_s:g} s after deleting {', '.join(n for _, n in objects)}: {left}")
        time.sleep(5)


def _wait_ready(cluster: Cluster, name: str, on: str | None = None) -> None:
    waited = cluster.kubectl(
        "wait", f"zerocopymodel/{name}", "-n", MODELS_NAMESPACE, "--for=condition=Ready",
        f"--timeout={READY_TIMEOUT}", timeout=3 * 3600, check=False,
    )  # fmt: skip
    if waited.returncode != 0:
        pytest.fail(f"{name} not Ready: {waited.stderr}\n{cluster.diagnostics(MODELS_NAMESPACE, name, on)}")


def _check_answers(cluster: Cluster, name: str, route: str, sample: Sample, on: str | None = None) -> None:
    """The model answers its sample request on `route`, from weights shared through Ray's object store."""
    base = route.rstrip("/")
    if sample.protocol == "chat":  # one of the OpenAI-compatible routes, answered with text
        answer = _call(cluster, name, f"{base}{sample.path}", sample.body, on=on)
        assert answer["choices"][0]["message"]["content"].strip(), answer
        assert answer["usage"]["completion_tokens"] > 0, answer
    elif sample.protocol == "embeddings":  # one vector per input, in input order
        answer = _call(cluster, name, f"{base}{sample.path}", sample.body, on=on)
        count, dimensions = sample.shape
        assert [item["index"] for item in answer["data"]] == list(range(count)), answer
        for item in answer["data"]:
            vector = item["embedding"]
            assert len(vector) == dimensions, f"{len(vector)} dimensions"
            assert all(isinstance(x, float) and math.isfinite(x) for x in vector)
            assert any(x != 0 for x in vector)
        assert answer["usage"]["prompt_tokens"] > 0, answer
    else:
        answer = _call(cluster, name, route, sample.body, on=on)
        assert answer["shape"] == sample.shape, answer.get("shape")
        flat = answer["outputs"]
        for _ in sample.shape[1:]:
            flat = [x for row in flat for x in row]
        assert len(flat) == math.prod(sample.shape)
        assert all(isinstance(x, float) and math.isfinite(x) for x in flat)

    # The replicas attached the weights from Ray's object store (not a private copy each).
    info = _call(cluster, name, f"{base}/-/info", None, on=on)
    assert info["shared"] is True, info
    assert info["bytes_shared"] > 0, info
    # The operator read the same report from inside the cluster into the model's status.
    cluster.kubectl(
        "wait", f"zerocopymodel/{name}", "-n", MODELS_NAMESPACE, "--for=condition=WeightsPublished",
        "--timeout=300s", timeout=400,
    )  # fmt: skip


def _condition(model: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in model.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_the_operator_runs_from_the_image_just_built(kind_cluster: Cluster) -> None:
    deployments = kind_cluster.json("get", "deployments", "-n", SYSTEM_NAMESPACE)["items"]
    assert deployments, f"no Deployment in {SYSTEM_NAMESPACE}"
    for deployment in deployments:
        images = [c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]]
        assert kind_cluster.operator_image in images
        assert deployment["status"].get("availableReplicas", 0) == deployment["spec"]["replicas"]
    for pod in kind_cluster.json("get", "pods", "-n", SYSTEM_NAMESPACE)["items"]:
        for status in pod["status"].get("containerStatuses", []):
            assert status["ready"], f"{pod['metadata']['name']}: {status}"
            assert status["restartCount"] == 0, f"{pod['metadata']['name']} restarted: {status}"


def test_a_model_too_big_for_its_object_store_is_refused(kind_cluster: Cluster, tmp_path: Path) -> None:
    [resource] = _models(ROOT / "examples" / "tiny-mlp.yaml")
    name = "e2e-too-big"
    resource["metadata"]["name"] = name
    resource["spec"]["serving"]["routePrefix"] = f"/{name}"
    resource["spec"]["model"]["size"] = "64Gi"  # the schema accepts it; the operator's semantic checks do not
    path = _apply(kind_cluster, resource, tmp_path)
    try:
        kind_cluster.kubectl(
            "wait", f"zerocopymodel/{name}", "-n", MODELS_NAMESPACE, "--for=condition=Ready=false", "--timeout=120s"
        )
        model = kind_cluster.json("get", "zerocopymodel", name, "-n", MODELS_NAMESPACE)
        ready = _condition(model, "Ready")
        assert ready["reason"] == "InvalidSpec", ready
        assert "objectStoreMemory" in ready["message"], ready
        assert model["status"]["phase"] == "Failed"
        assert not kind_cluster.kubectl(
            "get", "rayservice", name, "-n", MODELS_NAMESPACE, "--ignore-not-found", "-o", "name"
        ).stdout.strip()
    finally:
        kind_cluster.kubectl("delete", "-f", str(path), "--ignore-not-found", "--timeout=120s")
    _wait_gone(kind_cluster, name)


@pytest.mark.parametrize("example", OWN_CLUSTERS, ids=[p.stem for p in OWN_CLUSTERS])
def test_example_serves_predictions_then_goes_away(kind_cluster: Cluster, example: Path, tmp_path: Path) -> None:
    models = _models(example)
    names = [m["metadata"]["name"] for m in models]
    if SELECTED and not SELECTED & {*names, example.stem}:
        pytest.skip(f"not in ZEROCOPY_E2E_EXAMPLES={','.join(sorted(SELECTED))}")
    for resource in models:
        name = resource["metadata"]["name"]
        route = resource["spec"]["serving"].get("routePrefix", f"/{name}")
        path = _apply(kind_cluster, resource, tmp_path)
        try:
            _wait_ready(kind_cluster, name)
            model = kind_cluster.json("get", "zerocopymodel", name, "-n", MODELS_NAMESPACE)
            assert model["status"]["endpoint"] == f"http://{name}-serve-svc.{MODELS_NAMESPACE}.svc:{SERVE_PORT}{route}"
            _check_answers(kind_cluster, name, route, SAMPLES[name])
        finally:
            kind_cluster.kubectl("delete", "-f", str(path), "--ignore-not-found", "--timeout=300s", timeout=400)
        _wait_gone(kind_cluster, name)


@pytest.mark.parametrize("example", SHARED_CLUSTERS, ids=[p.stem for p in SHARED_CLUSTERS])
def test_shared_cluster_serves_each_of_its_models_then_goes_away(
    kind_cluster: Cluster, example: Path, tmp_path: Path
) -> None:
    documents = _documents(example)
    clusters = [d["metadata"]["name"] for d in documents if d["kind"] == "ZeroCopyCluster"]
    models = [d for d in documents if d["kind"] == "ZeroCopyModel"]
    if SELECTED and not SELECTED & {*(d["metadata"]["name"] for d in documents), example.stem}:
        pytest.skip(f"not in ZEROCOPY_E2E_EXAMPLES={','.join(sorted(SELECTED))}")
    path = tmp_path / example.name
    path.write_text(yaml.safe_dump_all(documents, sort_keys=False))
    on = {m["metadata"]["name"]: m["spec"]["clusterRef"]["name"] for m in models}
    try:
        kind_cluster.kubectl("apply", "-f", str(path))  # the cluster and its models at once, as a person would
        for name in on:  # they come up together, as applications of one RayService
            _wait_ready(kind_cluster, name, on[name])
        for resource in models:
            name = resource["metadata"]["name"]
            route = resource["spec"]["serving"].get("routePrefix", f"/{name}")
            status = kind_cluster.json("get", "zerocopymodel", name, "-n", MODELS_NAMESPACE)["status"]
            assert (status["cluster"], status["rayService"]) == (on[name], on[name]), status
            assert status["endpoint"] == f"http://{on[name]}-serve-svc.{MODELS_NAMESPACE}.svc:{SERVE_PORT}{route}"
            _check_answers(kind_cluster, name, route, SAMPLES[name], on=on[name])

        for cluster in clusters:
            members = sorted(name for name in on if on[name] == cluster)
            for condition in ("Ready", "ModelsReady"):
                kind_cluster.kubectl(
                    "wait", f"zerocopycluster/{cluster}", "-n", MODELS_NAMESPACE, f"--for=condition={condition}",
                    "--timeout=300s", timeout=400,
                )  # fmt: skip
            status = kind_cluster.json("get", "zerocopycluster", cluster, "-n", MODELS_NAMESPACE)["status"]
            assert status["phase"] == "Ready", status
            assert status["modelsReady"] == f"{len(members)}/{len(members)}", status
            assert sorted(m["name"] for m in status["models"]) == members, status["models"]
            assert all(m["ready"] for m in status["models"]), status["models"]
            # What a person reads: `kubectl get zcc shared` says Ready, every model serving.
            (row,) = kind_cluster.kubectl("get", "zcc", cluster, "-n", MODELS_NAMESPACE, "--no-headers").stdout.split(
                "\n", 1
            )[:1]
            assert row.split()[:4] == [cluster, "True", "Ready", f"{len(members)}/{len(members)}"], row
            # One RayService for the cluster, none of the models' own.
            rayservices = kind_cluster.json("get", "rayservices", "-n", MODELS_NAMESPACE)["items"]
            names = sorted(r["metadata"]["name"] for r in rayservices)
            assert cluster in names, names
            assert not set(names) & set(members), names
            (owned,) = [r for r in rayservices if r["metadata"]["name"] == cluster]
            assert owned["metadata"]["labels"]["zerocopy.dev/cluster"] == cluster
            assert [o["kind"] for o in owned["metadata"]["ownerReferences"]] == ["ZeroCopyCluster"]
    finally:
        kind_cluster.kubectl("delete", "-f", str(path), "--ignore-not-found", "--timeout=300s", timeout=400)
    for cluster in clusters:
        objects = [("zerocopycluster", cluster), ("rayservice", cluster)]
        objects += [("zerocopymodel", name) for name in on if on[name] == cluster]
        _wait_all_gone(kind_cluster, objects, f"zerocopy.dev/cluster={cluster}")
