"""The kind cluster of the e2e tests: created (or reused), images built and loaded, KubeRay and the chart installed.

Runs only where docker (with a reachable daemon), kind, kubectl and helm exist, and only when asked for
(`script/e2e`, `make e2e` or `python -m pytest -m e2e`): a plain `python -m pytest` never builds images or
creates clusters. Elsewhere the tests skip with the reason; with ZEROCOPY_E2E_REQUIRED=1 they fail instead.

Environment:
    ZEROCOPY_E2E_REQUIRED=1   a missing tool fails the tests instead of skipping them (script/e2e sets it)
    ZEROCOPY_E2E_KEEP=1       keep the cluster the tests created (a cluster that existed before is always kept)
    ZEROCOPY_E2E_EXAMPLES     comma-separated example names to serve (default: every examples/*.yaml)
    ZEROCOPY_E2E_CLUSTER      kind cluster name (default zerocopy-e2e)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = os.environ.get("ZEROCOPY_E2E_CLUSTER", "zerocopy-e2e")
KIND_CONFIG = ROOT / "kind-config.yaml"
CHART = ROOT / "charts" / "zerocopy-operator"
KUBERAY_REPO = "https://ray-project.github.io/kuberay-helm/"
KUBERAY_VERSION = "1.7.0"
KUBERAY_NAMESPACE = "kuberay-system"
SYSTEM_NAMESPACE = "zerocopy-system"
RELEASE = "zerocopy-operator"
MODELS_NAMESPACE = "zerocopy-e2e"
#: Local names: a pull of these always fails, so a pod can only run what `kind load` put on the nodes.
IMAGES = {
    "operator": "zerocopy.local/zerocopy-operator",
    "runtime": "zerocopy.local/zerocopy-runtime",
    "examples": "zerocopy.local/zerocopy-examples",
}
TOOLS = ("docker", "kind", "kubectl", "helm")


def tool(name: str) -> str | None:
    """An executable from PATH, else from the repository's .tools/bin (where script/install_helm.py puts helm)."""
    local = ROOT / ".tools" / "bin" / name
    return shutil.which(name) or (str(local) if local.is_file() and os.access(local, os.X_OK) else None)


def missing_prerequisites() -> str | None:
    """Why the e2e cannot run here, or None."""
    absent = [name for name in TOOLS if tool(name) is None]
    if absent:
        return f"the kind e2e needs {', '.join(absent)} on PATH (or in .tools/bin); not found here"
    try:
        info = subprocess.run([tool("docker") or "docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "the docker daemon does not answer (docker info timed out)"
    if info.returncode != 0:
        return f"the docker daemon is not reachable: {(info.stderr or info.stdout).strip()[-300:]}"
    return None


def require_e2e(config: pytest.Config) -> None:
    """Skip (or with ZEROCOPY_E2E_REQUIRED=1 fail) unless the tools are here and the e2e was asked for."""
    reason = missing_prerequisites()
    required = os.environ.get("ZEROCOPY_E2E_REQUIRED") == "1"
    if reason and required:
        pytest.fail(f"{reason} (ZEROCOPY_E2E_REQUIRED=1)", pytrace=False)
    if reason:
        pytest.skip(f"{reason}; run script/e2e where Docker and kind exist")
    if not (required or "e2e" in (config.getoption("markexpr") or "")):
        pytest.skip("the kind e2e builds images and creates a cluster: run it with script/e2e or pytest -m e2e")


class CommandFailed(AssertionError):
    pass


def run(
    args: Sequence[str], *, timeout: float, check: bool = True, input: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command; a failure names the command and ends with its output."""
    environment = {**os.environ, **(env or {})}
    try:
        out = subprocess.run(
            list(args), capture_output=True, text=True, timeout=timeout, input=input, cwd=ROOT, env=environment
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandFailed(
            f"{' '.join(args)} took more than {timeout:g} s:\n{_tail(exc.stdout, exc.stderr)}"
        ) from None
    if check and out.returncode != 0:
        raise CommandFailed(f"{' '.join(args)} exited with {out.returncode}:\n{_tail(out.stdout, out.stderr)}")
    return out


def _tail(stdout: str | bytes | None, stderr: str | bytes | None, chars: int = 6000) -> str:
    text = "\n".join(s.decode(errors="replace") if isinstance(s, bytes) else s for s in (stdout, stderr) if s)
    return text[-chars:]


@dataclass(frozen=True)
class Cluster:
    """A kind cluster with KubeRay and the operator installed; kubectl and helm use its own kubeconfig."""

    name: str
    kubeconfig: Path
    operator_image: str
    runtime_image: str

    def kubectl(
        self, *args: str, timeout: float = 120, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        command = [tool("kubectl") or "kubectl", "--kubeconfig", str(self.kubeconfig), *args]
        return run(command, timeout=timeout, check=check, input=input)

    def helm(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
        return run([tool("helm") or "helm", "--kubeconfig", str(self.kubeconfig), *args], timeout=timeout)

    def json(self, *args: str) -> dict:
        return dict(json.loads(self.kubectl(*args, "-o", "json").stdout))

    def diagnostics(self, namespace: str, name: str, cluster: str | None = None) -> str:
        """What to read when a model does not come up: its objects, events, the operator's and Ray's logs.

        `cluster`: the ZeroCopyCluster the model runs on, whose pods (and description) are read instead.
        """
        selector = f"zerocopy.dev/model={name}" if cluster is None else f"zerocopy.dev/cluster={cluster}"
        kinds = "zerocopymodels,zerocopyclusters,rayservices,rayclusters,pods,services"
        commands = [
            ["get", kinds, "-n", namespace, "-o", "wide"],
            ["describe", "zerocopymodel", name, "-n", namespace],
            *([["describe", "zerocopycluster", cluster, "-n", namespace]] if cluster is not None else []),
            ["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"],
            ["logs", "-n", SYSTEM_NAMESPACE, "-l", f"app.kubernetes.io/instance={RELEASE}", "--tail=80"],
            ["logs", "-n", namespace, "-l", selector, "--all-containers", "--prefix", "--tail=60"],
        ]
        heads = self.kubectl(
            "get", "pods", "-n", namespace, "-l", f"{selector},zerocopy.dev/group=head", "-o", "name", check=False
        ).stdout.split()
        for head in heads[:1]:  # Serve's controller and replica logs stay inside the pods
            commands.append(["exec", "-n", namespace, head, "--", "sh", "-c", SERVE_LOGS])
        report = []
        for command in commands:
            out = self.kubectl(*command, timeout=60, check=False)
            report.append(f"$ kubectl {' '.join(command)}\n{_tail(out.stdout, out.stderr, 4000)}")
        return "\n\n".join(report)


SERVE_LOGS = "tail -n 40 /tmp/ray/session_latest/logs/serve/*.log"


def _build(target: str) -> str:
    """`docker build --target`; returns a tag naming the image's content, so that a rebuild rolls the pods."""
    docker = tool("docker") or "docker"
    repository = IMAGES[target]
    # BuildKit (the default since Docker 23) for the Dockerfile's RUN --mount.
    run(
        [docker, "build", "--target", target, "-t", f"{repository}:e2e", str(ROOT)],
        timeout=3600,
        env={"DOCKER_BUILDKIT": "1"},
    )
    image_id = run([docker, "image", "inspect", "--format", "{{.Id}}", f"{repository}:e2e"], timeout=60).stdout
    reference = f"{repository}:e2e-{image_id.strip().removeprefix('sha256:')[:12]}"
    run([docker, "tag", f"{repository}:e2e", reference], timeout=60)
    return reference


@pytest.fixture(scope="session")
def kind_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    require_e2e(request.config)
    kind = tool("kind") or "kind"
    created = CLUSTER not in run([kind, "get", "clusters"], timeout=60).stdout.split()
    if created:
        run([kind, "create", "cluster", "--name", CLUSTER, "--config", str(KIND_CONFIG), "--wait", "5m"], timeout=900)
    try:
        kubeconfig = tmp_path_factory.mktemp("kind") / "kubeconfig"
        kubeconfig.write_text(run([kind, "get", "kubeconfig", "--name", CLUSTER], timeout=60).stdout)
        images = {target: _build(target) for target in ("operator", "runtime", "examples")}
        # The runtime image is built (checked) but not loaded: the examples image is the runtime plus examples.
        run([kind, "load", "docker-image", "--name", CLUSTER, images["operator"], images["examples"]], timeout=1800)
        cluster = Cluster(CLUSTER, kubeconfig, images["operator"], images["examples"])
        _install(cluster)
        yield cluster
    finally:
        if created and os.environ.get("ZEROCOPY_E2E_KEEP") != "1":
            run([kind, "delete", "cluster", "--name", CLUSTER], timeout=600, check=False)


def _install(cluster: Cluster) -> None:
    """KubeRay from its chart, then this repository's chart with the images just built."""
    cluster.helm(
        "upgrade", "--install", "kuberay-operator", "kuberay-operator", "--repo", KUBERAY_REPO,
        "--version", KUBERAY_VERSION, "--namespace", KUBERAY_NAMESPACE, "--create-namespace",
        "--wait", "--timeout", "10m",
    )  # fmt: skip
    repository, _, tag = cluster.operator_image.rpartition(":")
    cluster.helm(
        "upgrade", "--install", RELEASE, str(CHART), "--namespace", SYSTEM_NAMESPACE, "--create-namespace",
        "--wait", "--timeout", "5m",
        "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=IfNotPresent", "--set", f"runtimeImage={cluster.runtime_image}",
    )  # fmt: skip
    # Helm installs a chart's CRDs only the first time: keep a reused cluster's CRDs current (and add new ones).
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CHART / "crds"))
    for crd in ("zerocopymodels.zerocopy.dev", "zerocopyclusters.zerocopy.dev"):
        cluster.kubectl("wait", f"crd/{crd}", "--for=condition=Established", "--timeout=60s")
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": MODELS_NAMESPACE}}
    cluster.kubectl("apply", "-f", "-", input=json.dumps(namespace))
