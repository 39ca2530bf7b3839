"""The cluster a kube-marked test runs against: the emulator, or the real one `--kubeconfig` names.

One place for the choice, so that every such test runs unchanged on both; `ApiProxy` gives raw HTTP to
either (through `kubectl proxy`, which adds a real cluster's credentials) for what kubectl does not show:
status codes and `kind: Status` bodies.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.emulator import Cluster, running_emulator


@contextlib.contextmanager
def target_cluster(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The `--kubeconfig` cluster if one was given, else a fresh emulator for the block."""
    kubeconfig = config.getoption("--kubeconfig")
    if kubeconfig:
        yield Cluster(kubeconfig=Path(kubeconfig), url="", cache_dir=tmp_path_factory.mktemp("kube-cache"))
        return
    with running_emulator(tmp_path_factory.mktemp("emulator")) as emulated:
        yield emulated


class ApiProxy:
    """`kubectl proxy` on a free port for the block: raw requests to the cluster, authenticated as kubectl is."""

    def __init__(self, cluster: Cluster) -> None:
        self._command = cluster.kubectl_command("proxy", "--port=0", "--address=127.0.0.1")
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> ApiProxy:
        self._process = subprocess.Popen(self._command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None  # started with stdout=PIPE
        line = self._process.stdout.readline()  # "Starting to serve on 127.0.0.1:PORT"
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if match is None:
            self._process.kill()
            raise RuntimeError(f"kubectl proxy did not start: {line!r}")
        self.url = f"http://127.0.0.1:{match[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
        """(HTTP status, decoded JSON body) of one request through the proxy."""
        return call(self.url, method, path, body, content_type)


def call(url: str, method: str, path: str, body: Any = None, content_type: str = "application/json") -> tuple[int, Any]:
    """(HTTP status, decoded JSON body) of one raw API request; bodies that are not str are sent as JSON."""
    data = None if body is None else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method)
    request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
