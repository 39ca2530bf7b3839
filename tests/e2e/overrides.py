"""The examples made to fit a kind cluster on a laptop: CPU only, small pods, checkpoints inside the image.

`for_kind` is pure (a resource in, a new resource out), so that the unit tests
can check that what the e2e applies still passes the operator's validation.
It takes ZeroCopyModels (with a cluster of their own, or naming a
ZeroCopyCluster in spec.clusterRef) and ZeroCopyClusters.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from zerocopy_operator import quantity

#: Where the Dockerfile's `examples` target puts examples/ (and where it is on PYTHONPATH).
EXAMPLES_DIR = "/home/ray/examples"

MiB = 2**20
#: Worker pods for kind: small enough that a model's whole cluster fits a laptop next to kind itself.
WORKER_CPU = "2"
WORKER_MEMORY = "3Gi"
HEAD = {"cpu": "1", "memory": "2Gi", "objectStoreMemory": "256Mi"}
#: Serve replicas at most, so that they fit one worker pod's CPUs.
MAX_REPLICAS = 2
#: Object store per worker: the model's size (a ZeroCopyCluster's: the sizes of all its models) times this
#: (for Serve's own objects), at least MIN_STORE.
STORE_FACTOR = 1.5
MIN_STORE = 256 * MiB


@dataclass(frozen=True)
class Sample:
    """A request for an example: a tensor prediction and the shape of its `outputs`, or, with `path`, a
    request to one of the OpenAI-compatible routes under the model's route: /v1/chat/completions (answered
    with text; `shape` is unused) or /v1/embeddings (answered with one vector per input; `shape` is
    [inputs, dimensions])."""

    body: dict[str, Any]
    shape: list[int]
    path: str = ""

    @property
    def protocol(self) -> Literal["tensor", "chat", "embeddings"]:
        """How the e2e reads the answer."""
        if not self.path:
            return "tensor"
        return "embeddings" if self.path == "/v1/embeddings" else "chat"


#: One request per example (by metadata.name). The unit tests fail when an example has none.
SAMPLES = {
    "tiny-mlp": Sample(body={"inputs": [0.1] * 256}, shape=[10]),
    # "Hello world" in GPT-2's tokens; the answer is the logits of each position over the vocabulary.
    "gpt2": Sample(body={"inputs": [15496, 995], "dtype": "int64"}, shape=[2, 50257]),
    "smollm2-chat": Sample(
        body={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16},
        shape=[],
        path="/v1/chat/completions",
    ),
    "smollm2-vllm": Sample(
        body={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16},
        shape=[],
        path="/v1/chat/completions",
    ),
    # examples/shared-cluster.yaml: two models on the ZeroCopyCluster `shared`.
    "chat": Sample(
        body={"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16},
        shape=[],
        path="/v1/chat/completions",
    ),
    # all-MiniLM-L6-v2: one 384-dimensional sentence embedding per input.
    "minilm": Sample(
        body={"input": ["Zero-copy weights live once per node.", "The capital of France is Paris."]},
        shape=[2, 384],
        path="/v1/embeddings",
    ),
}
#: vLLM's settings on kind's CPUs: a small KV cache that fits WORKER_MEMORY and eager mode (torch.compile would
#: take minutes on two cores).
KIND_VLLM: dict[str, Any] = {"kvCacheGib": 0.25, "engineArgs": {"enforce_eager": True}}
#: The dtype vLLM serves in on kind's CPUs (model.dtype): float32, as bfloat16 has no kernels on every laptop CPU.
KIND_VLLM_DTYPE = "float32"


#: The kinds the e2e applies from an example file.
KINDS = ("ZeroCopyCluster", "ZeroCopyModel")


def documents_for_kind(
    documents: Sequence[dict[str, Any] | None], namespace: str, image_path_root: str = EXAMPLES_DIR
) -> list[dict[str, Any]]:
    """An example file's ZeroCopyClusters and ZeroCopyModels as the e2e applies them, in file order: in
    `namespace`, each made to fit kind by `for_kind` (a cluster sized for the file's models that name it)."""
    ours = [
        {**d, "metadata": {**(d.get("metadata") or {}), "namespace": namespace}}
        for d in documents
        if d and d.get("kind") in KINDS
    ]
    return [for_kind(d, image_path_root, models=ours) for d in ours]


def for_kind(
    resource: dict[str, Any], image_path_root: str = EXAMPLES_DIR, models: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A copy of a ZeroCopyModel or ZeroCopyCluster that runs on kind: no GPU anywhere, laptop-sized pods,
    absolute checkpoint paths.

    - serving: no GPUs per replica, device cpu, at most MAX_REPLICAS replicas, CPUs per replica that fit
      (a worker pod of its own cluster, or of WORKER_CPU for a model on a ZeroCopyCluster), and vLLM's
      settings and dtype for CPUs (KIND_VLLM, KIND_VLLM_DTYPE);
    - cluster (a model's spec.cluster, or a ZeroCopyCluster's spec; a model with spec.clusterRef has none):
      the operator's runtime image (no per-model image), no autoscaler, a small head, and one pod per worker
      group without GPUs, GPU tolerations or node selectors, shrunk to WORKER_CPU / WORKER_MEMORY and an
      object store just above the weights it holds (never grown beyond what the example asks): the model's
      size, or for a ZeroCopyCluster the sizes of those of `models` that name it (on kind every replica may
      land on every group, so each group holds them all);
    - model: a relative `file://` URI (or architecture.config) becomes an absolute path under `image_path_root`.
    """
    out = copy.deepcopy(resource)
    spec = out.setdefault("spec", {})
    if out.get("kind") == "ZeroCopyCluster":
        name = out.get("metadata", {}).get("name")
        sizes = [
            (m.get("spec") or {}).get("model", {}).get("size")
            for m in models
            if m.get("kind") == "ZeroCopyModel" and ((m.get("spec") or {}).get("clusterRef") or {}).get("name") == name
        ]
        _shrink_cluster(spec, sum(quantity.to_bytes(size) for size in sizes if size))
        return out
    model = spec.setdefault("model", {})
    model["uri"] = _absolute(model.get("uri", ""), image_path_root)
    architecture = model.get("architecture") or {}
    if architecture.get("config"):
        architecture["config"] = _absolute(architecture["config"], image_path_root)

    if "clusterRef" in spec:  # served on a ZeroCopyCluster: its pods are the cluster's (shrunk on its own)
        pod_cpus = float(quantity.parse(WORKER_CPU))
    else:
        cluster = spec.setdefault("cluster", {})
        size = model.get("size")
        _shrink_cluster(cluster, quantity.to_bytes(size) if size else 0)
        pod_cpus = max(float(quantity.parse(group["cpu"])) for group in cluster["workerGroups"])

    serving = spec.setdefault("serving", {})
    serving.pop("gpusPerReplica", None)
    serving["device"] = "cpu"
    if serving.get("engine") == "vllm":
        settings = serving.setdefault("vllm", {})
        settings.update(KIND_VLLM, engineArgs={**settings.get("engineArgs", {}), **KIND_VLLM["engineArgs"]})
        model["dtype"] = KIND_VLLM_DTYPE
        serving["replicas"] = 1  # an engine's processes and private copy fill a kind worker pod by themselves
        serving.pop("autoscaling", None)
    autoscaling = serving.get("autoscaling")
    if autoscaling is not None:
        autoscaling["maxReplicas"] = min(autoscaling["maxReplicas"], MAX_REPLICAS)
        autoscaling["minReplicas"] = min(autoscaling.get("minReplicas", 1), autoscaling["maxReplicas"])
        most = autoscaling["maxReplicas"]
    else:
        serving["replicas"] = min(serving.get("replicas", 1), MAX_REPLICAS)
        most = serving["replicas"]
    cpus = float(serving.get("cpusPerReplica", 1))
    # Every replica must find its CPUs in one pod; the largest pod holds them all when scaled up.
    serving["cpusPerReplica"] = min(cpus, pod_cpus / max(most, 1))
    return out


def _shrink_cluster(cluster: dict[str, Any], weights: int) -> None:
    """A model's spec.cluster or a ZeroCopyCluster's spec, in place, for kind, with `weights` bytes per store."""
    cluster.pop("image", None)
    cluster["enableInTreeAutoscaling"] = False
    head = cluster.get("head") or {}
    cluster["head"] = {
        "cpu": _smaller(head.get("cpu", "1"), HEAD["cpu"]),
        "memory": _smaller(head.get("memory", "4Gi"), HEAD["memory"]),
        "objectStoreMemory": _smaller(head.get("objectStoreMemory", "1Gi"), HEAD["objectStoreMemory"]),
    }
    store = max(MIN_STORE, math.ceil(weights * STORE_FACTOR / MiB) * MiB)
    groups = cluster.get("workerGroups") or [{"name": "cpu"}]
    cluster["workerGroups"] = [_worker_group(group, store) for group in groups]


def _worker_group(group: dict[str, Any], store: int) -> dict[str, Any]:
    dropped = {"gpus", "gpuResource", "tolerations", "nodeSelector", "replicas", "minReplicas", "maxReplicas"}
    shrunk = {key: value for key, value in group.items() if key not in dropped}
    shrunk.update(
        gpus=0,
        cpu=_smaller(group.get("cpu", "4"), WORKER_CPU),
        memory=_smaller(group.get("memory", "16Gi"), WORKER_MEMORY),
        objectStoreMemory=_smaller(group.get("objectStoreMemory", "4Gi"), quantity.memory(store)),
        replicas=1,
        minReplicas=min(group.get("minReplicas", 1), 1),
        maxReplicas=1,
    )
    return shrunk


def _smaller(current: int | str, limit: int | str) -> int | str:
    """The smaller of two quantities, as written."""
    return limit if quantity.parse(limit) < quantity.parse(current) else current


def _absolute(path: str, root: str) -> str:
    """A relative local path (`file://relative` or `relative`) made absolute under `root`; others unchanged."""
    local = path.removeprefix("file://")
    if not path or "://" in local or local.startswith("/"):
        return path
    absolute = f"{root.rstrip('/')}/{local.removeprefix('./')}"
    return f"file://{absolute}" if path.startswith("file://") else absolute
