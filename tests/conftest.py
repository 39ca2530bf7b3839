"""One Ray instance per test session: `ray.init` costs seconds here, tests cost milliseconds."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube.clusters import Cluster, session_cluster

ROOT = Path(__file__).resolve().parents[1]
#: Small on purpose: tests must fit a 2-core CI machine; the store-full test relies on it.
STORE_BYTES = 384 * 2**20


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--kubeconfig",
        default=None,
        help="run the kube tests against this cluster instead of a control plane of their own (envtest's binaries)",
    )


@pytest.fixture(scope="session")
def kube_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One real Kubernetes API per test session: etcd and kube-apiserver on loopback (tests/kube/envtest.py), or the
    cluster `--kubeconfig` names; our CRDs and KubeRay's are installed. Skips, saying where binaries were looked
    for, when there are none."""
    with session_cluster(request.config, tmp_path_factory.mktemp("kube")) as cluster:
        yield cluster


@pytest.fixture
def kube_namespace(kube_cluster: Cluster) -> Iterator[str]:
    """A namespace of the test's own, deleted after it (without waiting: the namespace controller finishes it)."""
    name = kube_cluster.new_namespace()
    yield name
    kube_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    # Ray workers run with one intra-op thread; so does this process, so that
    # results computed here and in workers are bitwise comparable.
    torch.set_num_threads(1)

    # Its own temp dir: never attach to (or collide with) another Ray running on the machine.
    ray.init(
        _temp_dir=tempfile.mkdtemp(prefix="ray-zc-"),
        num_cpus=4,
        object_store_memory=STORE_BYTES,
        include_dashboard=False,
        log_to_driver=False,
        namespace="zerocopy-tests",
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
    )
    yield
    ray.shutdown()


@pytest.fixture
def published(ray_session: None) -> Iterator[list]:
    """Names published during a test, released afterwards so the store is empty for the next one."""
    import zerocopy_runtime as zc

    names: list = []
    yield names
    for item in names:
        with contextlib.suppress(zc.WeightsNotFoundError):
            zc.release(item)


@pytest.fixture
def actors(ray_session: None) -> Iterator[list]:
    """Actors started by a test, killed afterwards so they free their CPUs and mappings."""
    import ray

    started: list = []
    yield started
    for actor in started:
        ray.kill(actor)


@pytest.fixture(scope="module")
def serve_port(ray_session: None) -> Iterator[int]:
    """Serve's HTTP proxy on a free port of 127.0.0.1, for one test module."""
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


def delete_model(app: str) -> None:
    """Delete a Serve app and release every published revision of its model, so the store is empty again."""
    from ray import serve

    serve.delete(app)
    release_model(app)


def release_model(model: str) -> None:
    """Release every published revision of `model` (named `<model>-<revision>` by the runtime)."""
    import zerocopy_runtime as zc
    from zerocopy_runtime import published_names

    for name in published_names():
        if name.startswith(f"{model}-"):
            with contextlib.suppress(zc.WeightsNotFoundError):
                zc.release(name)
