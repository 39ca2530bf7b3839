"""The operator under many models: convergence time and CPU against a real control plane.

An envtest control plane (etcd, kube-apiserver and kube-controller-manager on loopback, as the tests start
it), our CRDs and KubeRay's RayService CRD. For each count N, a fresh namespace and a fresh operator process
(`python -m zerocopy_operator --namespace <ns>`) that watches only it. N ZeroCopyModels are created as fast as
the API takes them; recorded: the seconds from the first create until every model's RayService exists, the
operator's CPU seconds over that time (user + system, from /proc), CPU per model, and, with all N present, the
seconds from an edit of one model to its RayService carrying the change. Writes bench/results/operator.md and
operator.json.

    python bench/bench_operator.py [--counts 60,300,1000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.kube import envtest  # noqa: E402
from tests.kube.clusters import Cluster, install_crds  # noqa: E402

RESULTS = ROOT / "bench" / "results"
GROUP, VERSION = "zerocopy.dev", "v1alpha1"


def model(name: str, batch: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ZeroCopyModel",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": f"s3://models/{name}.safetensors", "architecture": {"factory": "models:MLP"}},
            "serving": {"replicas": 1, "batching": {"maxBatchSize": batch}},
        },
    }


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def wait_live(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the operator exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the operator never became live")


def run_count(cluster: Cluster, count: int, work: Path) -> dict[str, Any]:
    from kubernetes import client

    namespace = cluster.new_namespace(f"scale{count}")
    port = envtest.free_port()
    command = [
        sys.executable, "-m", "zerocopy_operator", f"--namespace={namespace}",
        "--liveness", f"http://127.0.0.1:{port}/healthz", "--image", "runtime:bench",
        "--info-url", "http://127.0.0.1:9{route}/-/info",
    ]  # fmt: skip
    log = (work / f"operator-{count}.log").open("wb")
    # This tree's operator, whatever is installed: a checkout of an older commit measures that commit.
    env = {**cluster.env(), "PYTHONPATH": os.pathsep.join(str(ROOT / part) for part in ("operator", "runtime", "."))}
    process = subprocess.Popen(envtest.dying_with_this_process(command), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_live(port, process)
        api = client.CustomObjectsApi(cluster.api)
        cpu_before = cpu_seconds(process.pid)
        started = time.monotonic()
        for i in range(count):
            api.create_namespaced_custom_object(GROUP, VERSION, namespace, "zerocopymodels", model(f"m{i:04d}"))
        created = time.monotonic() - started
        while True:
            found = api.list_namespaced_custom_object("ray.io", "v1", namespace, "rayservices")["items"]
            if len(found) >= count:
                break
            if time.monotonic() - started > 1800:
                raise SystemExit(f"{len(found)} of {count} RayServices after 30 minutes")
            time.sleep(0.25)
        converged = time.monotonic() - started
        cpu = cpu_seconds(process.pid) - cpu_before
        # One edit with all N present: until its RayService carries the new batch size.
        target = f"m{count // 2:04d}"
        edited = time.monotonic()
        edit_body = {"spec": {"serving": {"batching": {"maxBatchSize": 8}}}}
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "zerocopymodels", target, edit_body)
        while True:
            rayservice = api.get_namespaced_custom_object("ray.io", "v1", namespace, "rayservices", target)
            if "max_batch_size: 8" in rayservice["spec"]["serveConfigV2"]:
                break
            if time.monotonic() - edited > 300:
                raise SystemExit("the edit never reached its RayService")
            time.sleep(0.02)
        edit = time.monotonic() - edited
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    row = {
        "models": count,
        "create_s": created,
        "converge_s": converged,
        "operator_cpu_s": cpu,
        "cpu_ms_per_model": 1000 * cpu / count,
        "edit_to_rayservice_s": edit,
    }
    print(json.dumps(row), flush=True)
    return row


def report(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# The operator under many models (bench/bench_operator.py)",
        "",
        f"An envtest control plane on loopback ({os.cpu_count()} cores shared by etcd, the API server, the operator "
        "and this client); one namespace and one operator process per count; models created as fast as the API "
        "takes them.",
        "",
        "| models | create s | all RayServices s | operator CPU s | CPU ms per model | one edit to its RayService s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['models']} | {r['create_s']:.1f} | {r['converge_s']:.1f} | {r['operator_cpu_s']:.1f} | "
            f"{r['cpu_ms_per_model']:.1f} | {r['edit_to_rayservice_s']:.2f} |"
        )
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        lines += [
            "",
            f"CPU per model from {first['models']} to {last['models']} models: "
            f"{last['cpu_ms_per_model'] / first['cpu_ms_per_model']:.2f}x.",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="60,300,1000")
    args = parser.parse_args()
    found = envtest.find_binaries()
    if isinstance(found, str):
        raise SystemExit(found)
    work = Path(tempfile.mkdtemp(prefix="bench-operator-"))
    rows = []
    with envtest.running_control_plane(found, work / "envtest") as plane:
        cluster = Cluster(kubeconfig=plane.kubeconfig, cache_dir=work / "kube-cache", plane=plane)
        install_crds(cluster)
        for count in [int(n) for n in args.counts.split(",")]:
            rows.append(run_count(cluster, count, work))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "operator.json").write_text(json.dumps(rows, indent=1) + "\n")
    text = report(rows)
    (RESULTS / "operator.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
