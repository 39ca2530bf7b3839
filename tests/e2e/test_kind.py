"""End to end on kind: the operator image and chart, KubeRay, and every example served and answering.

Each example is applied as `tests/e2e/overrides.py:for_kind` makes it (CPU only, laptop-sized pods,
checkpoints inside the examples image), must become Ready, answers a prediction through its Serve
service (reached with `kubectl port-forward`), and leaves nothing behind once deleted.
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
from tests.e2e.overrides import SAMPLES, for_kind

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3 * 3600)]

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
SELECTED = {n.strip() for n in os.environ.get("ZEROCOPY_E2E_EXAMPLES", "").split(",") if n.strip()}
#: Ray pods start, pull nothing (the image is loaded), publish the weights; gpt2 downloads from the hub first.
READY_TIMEOUT = os.environ.get("ZEROCOPY_E2E_READY_TIMEOUT", "20m")
SERVE_PORT = 8000


def _models(path: Path) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == "ZeroCopyModel"]
    return [for_kind({**d, "metadata": {**d["metadata"], "namespace": MODELS_NAMESPACE}}) for d in documents]


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


def _call(cluster: Cluster, name: str, path: str, body: dict[str, Any] | None, within_s: float = 300) -> Any:
    """POST `body` (or GET) to the model's Serve service, retrying while Serve routes the new application."""
    deadline, last = time.monotonic() + within_s, ""
    while True:
        try:
            with _port_forward(cluster, MODELS_NAMESPACE, f"svc/{name}-serve-svc", SERVE_PORT) as port:
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
            pytest.fail(
                f"{path} did not answer in {within_s:g} s; last: {last}\n{cluster.diagnostics(MODELS_NAMESPACE, name)}"
            )
        time.sleep(5)


def _wait_gone(cluster: Cluster, name: str, within_s: float = 600) -> None:
    """Until the model, its RayService and every pod labelled with it are gone."""
    deadline = time.monotonic() + within_s
    while True:
        found = [
            cluster.kubectl("get", kind, name, "-n", MODELS_NAMESPACE, "--ignore-not-found", "-o", "name").stdout
            for kind in ("zerocopymodel", "rayservice")
        ]
        found.append(
            cluster.kubectl(
                "get", "pods", "-n", MODELS_NAMESPACE, "-l", f"zerocopy.dev/model={name}", "-o", "name"
            ).stdout
        )
        left = " ".join(found).split()
        if not left:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"still there {within_s:g} s after deleting {name}: {left}")
        time.sleep(5)


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


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_serves_predictions_then_goes_away(kind_cluster: Cluster, example: Path, tmp_path: Path) -> None:
    models = _models(example)
    names = [m["metadata"]["name"] for m in models]
    if SELECTED and not SELECTED & {*names, example.stem}:
        pytest.skip(f"not in ZEROCOPY_E2E_EXAMPLES={','.join(sorted(SELECTED))}")
    for resource in models:
        name = resource["metadata"]["name"]
        sample = SAMPLES[name]
        route = resource["spec"]["serving"].get("routePrefix", f"/{name}")
        path = _apply(kind_cluster, resource, tmp_path)
        try:
            waited = kind_cluster.kubectl(
                "wait", f"zerocopymodel/{name}", "-n", MODELS_NAMESPACE, "--for=condition=Ready",
                f"--timeout={READY_TIMEOUT}", timeout=3 * 3600, check=False,
            )  # fmt: skip
            if waited.returncode != 0:
                pytest.fail(f"{name} not Ready: {waited.stderr}\n{kind_cluster.diagnostics(MODELS_NAMESPACE, name)}")
            model = kind_cluster.json("get", "zerocopymodel", name, "-n", MODELS_NAMESPACE)
            assert model["status"]["endpoint"] == f"http://{name}-serve-svc.{MODELS_NAMESPACE}.svc:{SERVE_PORT}{route}"

            if sample.path:  # a text task: one of the OpenAI-compatible routes, answered with text
                answer = _call(kind_cluster, name, f"{route.rstrip('/')}{sample.path}", sample.body)
                assert answer["choices"][0]["message"]["content"].strip(), answer
                assert answer["usage"]["completion_tokens"] > 0, answer
            else:
                answer = _call(kind_cluster, name, route, sample.body)
                assert answer["shape"] == sample.shape, answer.get("shape")
                flat = answer["outputs"]
                for _ in sample.shape[1:]:
                    flat = [x for row in flat for x in row]
                assert len(flat) == math.prod(sample.shape)
                assert all(isinstance(x, float) and math.isfinite(x) for x in flat)

            # The replicas attached the weights from Ray's object store (not a private copy each).
            info = _call(kind_cluster, name, f"{route.rstrip('/')}/-/info", None)
            assert info["shared"] is True, info
            assert info["bytes_shared"] > 0, info
            # The operator read the same report from inside the cluster into the model's status.
            kind_cluster.kubectl(
                "wait", f"zerocopymodel/{name}", "-n", MODELS_NAMESPACE, "--for=condition=WeightsPublished",
                "--timeout=300s", timeout=400,
            )  # fmt: skip
        finally:
            kind_cluster.kubectl("delete", "-f", str(path), "--ignore-not-found", "--timeout=300s", timeout=400)
        _wait_gone(kind_cluster, name)
