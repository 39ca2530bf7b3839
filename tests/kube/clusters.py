"""The Kubernetes API a kube-marked test runs against: a real control plane from `envtest`, or the real cluster
`--kubeconfig` names. One place for the choice, so that every such test runs unchanged on both.

`Cluster` is what tests hold: the real kubectl, an API client for what kubectl does not show (dry-run
answers, the stored object), namespaces of their own, ServiceAccounts bound to the chart's roles.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import envtest, kuberay

__all__ = ["KUBECTL", "ROOT", "Cluster", "Refused", "install_crds", "session_cluster"]

KUBECTL = "/usr/bin/kubectl"
ROOT = Path(__file__).resolve().parents[2]


class Refused(Exception):
    """The API server refused a request: `status` is its HTTP status, `message` the `kind: Status` message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status, self.message = status, message


@dataclass
class Cluster:
    """A Kubernetes API as tests reach it: a kubeconfig for kubectl, kopf and the API client."""

    kubeconfig: Path
    #: kubectl's discovery cache, one per cluster.
    cache_dir: Path
    #: Whether owner references and namespace deletion are acted on (kube-controller-manager runs).
    garbage_collected: bool = True
    #: The envtest control plane, or None for a cluster named by --kubeconfig.
    plane: envtest.ControlPlane | None = None
    _namespaces: list[str] = field(default_factory=list)

    # -- kubectl --------------------------------------------------------------------------------------------

    def kubectl_command(self, *args: str) -> list[str]:
        """The command line for the real kubectl against this cluster, e.g. for `subprocess.Popen`."""
        return [KUBECTL, f"--kubeconfig={self.kubeconfig}", f"--cache-dir={self.cache_dir}", *args]

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl to completion; stdout and stderr are captured as text. `check` fails with kubectl's stderr."""
        done = subprocess.run(self.kubectl_command(*args), input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def env(self) -> dict[str, str]:
        """This process's environment with `KUBECONFIG` pointing here, for subprocesses such as `kopf run`."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # -- the API, without kubectl's process per call ----------------------------------------------------------

    @cached_property
    def api(self) -> Any:
        """The official client's ApiClient for this cluster (authenticated as the kubeconfig's user)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def request(self, method: str, path: str, body: Any = None, **query: str) -> dict[str, Any]:
        """One raw API request; the decoded body, or `Refused` with the server's status and message."""
        from kubernetes.client.exceptions import ApiException

        url = self.api.configuration.host + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        self.api.update_params_for_auth(headers, None, ["BearerToken"], "", method, body)
        try:
            response = self.api.call_api(method, url, header_params=headers, body=body)
            response.read()
        except ApiException as exc:
            raise Refused(int(exc.status), _message(exc.body or "")) from None
        if response.status >= 400:
            raise Refused(response.status, _message(response.data))
        return dict(json.loads(response.data))

    def dry_run_create(self, obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        """What the server would store for `obj` (schema, CEL, defaults, strict fields: unknown ones refused), or
        `Refused`. Nothing is written."""
        return self.request("POST", _collection(obj, namespace), obj, dryRun="All", fieldValidation="Strict")

    # -- namespaces and accounts ------------------------------------------------------------------------------

    def new_namespace(self, prefix: str = "zc") -> str:
        """A namespace of the caller's own, deleted when the session ends (or by `delete_namespaces`)."""
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.kubectl("create", "namespace", name, check=True)
        self._namespaces.append(name)
        return name

    def delete_namespaces(self) -> None:
        for name in self._namespaces:
            self.kubectl("delete", "namespace", name, "--wait=false")
        self._namespaces.clear()

    def token_kubeconfig(self, namespace: str, account: str, path: Path) -> Path:
        """A kubeconfig for this cluster that authenticates as ServiceAccount `namespace/account` (a bound token)."""
        token = self.kubectl("create", "token", account, "-n", namespace, "--duration=2h", check=True).stdout.strip()
        config = yaml.safe_load(self.kubectl("config", "view", "--minify", "--flatten", "--raw", check=True).stdout)
        config["users"] = [{"name": f"{namespace}-{account}", "user": {"token": token}}]
        for context in config["contexts"]:
            context["context"]["user"] = f"{namespace}-{account}"
        path.write_text(yaml.safe_dump(config))
        return path


def _message(body: str | bytes) -> str:
    """The `message` of a `kind: Status` body, or the body itself where it is not one."""
    try:
        return str(json.loads(body).get("message", body))
    except (TypeError, ValueError, AttributeError):
        return body.decode(errors="replace") if isinstance(body, bytes) else body


def _collection(obj: dict[str, Any], namespace: str) -> str:
    """The URL path of the collection `obj` is created in."""
    group_version, kind = obj["apiVersion"], obj["kind"]
    prefix = f"/api/{group_version}" if "/" not in group_version else f"/apis/{group_version}"
    plurals = {"ZeroCopyModel": "zerocopymodels", "ZeroCopyCluster": "zerocopyclusters", "RayService": "rayservices"}
    if kind not in plurals:
        raise ValueError(f"no collection known for kind {kind}")
    return f"{prefix}/namespaces/{obj.get('metadata', {}).get('namespace') or namespace}/{plurals[kind]}"


def install_crds(cluster: Cluster) -> None:
    """Our CRDs and, where present, KubeRay's RayService CRD; waits until the server serves them."""
    files = [ROOT / "crds"]
    names = ["crd/zerocopymodels.zerocopy.dev", "crd/zerocopyclusters.zerocopy.dev"]
    if kuberay.missing() is None:
        files.append(kuberay.crd("rayservices"))
        names.append("crd/rayservices.ray.io")
    for path in files:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path), check=True)
    deadline = time.monotonic() + 60
    while True:
        done = cluster.kubectl("wait", "--for=condition=Established", *names, "--timeout=60s")
        if done.returncode == 0:
            return
        # A CRD just created may have no status yet, and kubectl wait then fails at once instead of waiting.
        if "accessor error" not in done.stderr or time.monotonic() > deadline:
            raise AssertionError(f"kubectl wait for our CRDs failed: {done.stderr.strip()}")
        time.sleep(0.2)


@contextlib.contextmanager
def session_cluster(config: pytest.Config, folder: Path) -> Iterator[Cluster]:
    """The `--kubeconfig` cluster if one was given, else an envtest control plane for the block (skips the test
    with the reason when no binaries can be found). Our CRDs and KubeRay's are installed either way."""
    kubeconfig = config.getoption("--kubeconfig")
    if kubeconfig:
        cluster = Cluster(kubeconfig=Path(kubeconfig).expanduser(), cache_dir=folder / "kube-cache")
        install_crds(cluster)
        yield cluster
        cluster.delete_namespaces()
        return
    with private_cluster(folder) as cluster:
        yield cluster


@contextlib.contextmanager
def private_cluster(folder: Path, *, crds: bool = True) -> Iterator[Cluster]:
    """A fresh envtest control plane of the caller's own (skips when no binaries can be found)."""
    found = envtest.find_binaries()
    if isinstance(found, str):
        pytest.skip(found)
    with envtest.running_control_plane(found, folder / "envtest") as plane:
        cluster = Cluster(
            kubeconfig=plane.kubeconfig,
            cache_dir=folder / "kube-cache",
            garbage_collected=plane.garbage_collected,
            plane=plane,
        )
        if crds:
            install_crds(cluster)
        yield cluster
