"""What the kind e2e applies: every example, made CPU-only and laptop-sized, still passes the operator's checks."""

from __future__ import annotations

import copy
import importlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.e2e.overrides import EXAMPLES_DIR, MAX_REPLICAS, SAMPLES, for_kind
from tests.kube import kuberay
from zerocopy_operator import quantity
from zerocopy_operator.api import ZeroCopyModelSpec
from zerocopy_operator.manifests import build_rayservice
from zerocopy_operator.validation import validate

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = kuberay.crd("rayservices")
IMAGE = "zerocopy.local/zerocopy-examples:e2e"
#: What one model's pods may take in all on a laptop running kind.
LAPTOP_MEMORY = 8 * 2**30
LAPTOP_CPUS = 4


def _examples() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document and document.get("kind") == "ZeroCopyModel":
                document.setdefault("metadata", {})["namespace"] = "zerocopy-e2e"
                found.append((f"{path.name}:{document['metadata']['name']}", document))
    return found


EXAMPLES = _examples()


def _containers(rayservice: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """Each Ray container with the number of pods that run it."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    for container in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        yield container, 1
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            yield container, group["replicas"]


def test_examples_are_found() -> None:
    assert {name for _, name in ((n, r["metadata"]["name"]) for n, r in EXAMPLES)} >= {"tiny-mlp", "gpt2"}


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_every_example_has_a_sample_request(where: str, resource: dict[str, Any]) -> None:
    assert resource["metadata"]["name"] in SAMPLES, f"{where}: add its request to tests/e2e/overrides.py SAMPLES"


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_example_for_kind_validates_and_asks_for_no_gpu(where: str, resource: dict[str, Any]) -> None:
    kind = for_kind(resource)
    spec = validate(kind)  # the operator's own checks: schema types and semantics (stores, CPUs, GPUs)
    assert isinstance(spec, ZeroCopyModelSpec)
    assert spec.serving.gpus_per_replica == 0
    assert spec.serving.device == "cpu"
    assert spec.cluster.image is None  # the operator's runtime image: the e2e's examples image
    assert not spec.cluster.enable_in_tree_autoscaling
    for group in spec.cluster.worker_groups:
        assert group.gpus == 0
        assert not group.node_selector
        assert not group.tolerations

    rayservice = build_rayservice(kind, IMAGE)
    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert "num-gpus" not in group["rayStartParams"]
        pod = group["template"]["spec"]
        assert not pod.get("nodeSelector")
        assert "gpu" not in json.dumps(pod.get("tolerations", [])).lower()
        for container in pod["containers"]:
            resources = {**container["resources"]["requests"], **container["resources"]["limits"]}
            assert not [name for name in resources if "gpu" in name.lower()], f"{where}: GPUs in {resources}"
    deployment = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    assert deployment["args"]["device"] == "cpu"
    options = deployment["deployments"][0]
    assert options["ray_actor_options"]["num_gpus"] == 0
    most = options.get("num_replicas") or options["autoscaling_config"]["max_replicas"]
    assert most <= MAX_REPLICAS

    memory = cpus = 0.0
    for container, pods in _containers(rayservice):
        assert container["image"] == IMAGE
        limits = container["resources"]["limits"]
        memory += quantity.to_bytes(limits["memory"]) * pods
        cpus += float(quantity.parse(limits["cpu"])) * pods
    assert memory <= LAPTOP_MEMORY, f"{where}: {quantity.memory(int(memory))} of pods does not fit a laptop"
    assert cpus <= LAPTOP_CPUS
    # All replicas, scaled up, fit one worker pod's CPUs (the head runs none).
    worker_cpus = max(float(quantity.parse(g.cpu)) for g in spec.cluster.worker_groups)
    assert most * options["ray_actor_options"]["num_cpus"] <= worker_cpus


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_example_for_kind_is_a_valid_rayservice_for_kuberay(where: str, resource: dict[str, Any]) -> None:
    if reason := kuberay.missing():
        pytest.skip(reason)
    crd = yaml.safe_load(KUBERAY.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator(schema).validate(build_rayservice(for_kind(resource), IMAGE))


def test_for_kind_leaves_its_input_alone() -> None:
    resource = dict(EXAMPLES)["gpt2-gpu.yaml:gpt2"]
    before = copy.deepcopy(resource)
    assert for_kind(resource) != resource
    assert resource == before


def test_object_store_shrinks_but_still_holds_the_model() -> None:
    original = dict(EXAMPLES)["gpt2-gpu.yaml:gpt2"]
    spec = validate(for_kind(original))
    size = quantity.to_bytes(original["spec"]["model"]["size"])
    for group in spec.cluster.worker_groups:
        store = quantity.to_bytes(group.object_store_memory)
        assert size < store < quantity.to_bytes(original["spec"]["cluster"]["workerGroups"][0]["objectStoreMemory"])


def test_relative_checkpoint_points_into_the_examples_image() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        tiny_mlp = importlib.import_module("tiny_mlp")
    finally:
        sys.path.remove(str(ROOT / "examples"))
    kind = for_kind(dict(EXAMPLES)["tiny-mlp.yaml:tiny-mlp"])
    # Where examples/tiny_mlp.py writes it, inside the examples image.
    relative = tiny_mlp.CHECKPOINT.relative_to(ROOT / "examples").as_posix()
    assert kind["spec"]["model"]["uri"] == f"file://{EXAMPLES_DIR}/{relative}"


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("file://.cache/m.safetensors", "file:///models/.cache/m.safetensors"),
        ("file://./m.pt", "file:///models/m.pt"),
        ("file:///abs/m.pt", "file:///abs/m.pt"),
        ("/abs/m.pt", "/abs/m.pt"),
        ("hf://org/name@main", "hf://org/name@main"),
        ("s3://bucket/m.safetensors", "s3://bucket/m.safetensors"),
    ],
)
def test_only_relative_local_uris_are_rewritten(uri: str, expected: str) -> None:
    resource = copy.deepcopy(dict(EXAMPLES)["gpt2-gpu.yaml:gpt2"])
    resource["spec"]["model"]["uri"] = uri
    resource["spec"]["model"]["architecture"]["config"] = "conf/config.json"
    kind = for_kind(resource, "/models/")
    assert kind["spec"]["model"]["uri"] == expected
    assert kind["spec"]["model"]["architecture"]["config"] == "/models/conf/config.json"


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_sample_request_fits_the_examples_model(where: str, resource: dict[str, Any]) -> None:
    """The e2e's request is one the model answers with the expected shape (checked here without weights)."""
    sample = SAMPLES[resource["metadata"]["name"]]
    architecture = resource["spec"]["model"].get("architecture") or {}
    task = resource["spec"].get("serving", {}).get("task", "tensor")
    if task != "tensor":  # a text task: the request must be what its OpenAI-compatible route takes
        from zerocopy_runtime import openai_protocol

        assert task == "text-generation"
        assert sample.path == "/v1/chat/completions"
        openai_protocol.parse(openai_protocol.ChatCompletionRequest, sample.body)
        return
    if "transformers" in architecture:
        transformers = pytest.importorskip("transformers")
        config = getattr(transformers, architecture["transformers"]).config_class()
        assert sample.body.get("dtype") == "int64"
        assert sample.shape == [len(sample.body["inputs"]), config.vocab_size]
        return
    import torch

    from zerocopy_runtime.handlers import tensor_handler

    module_name, function = architecture["factory"].split(":")
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        factory = getattr(importlib.import_module(module_name), function)
    finally:
        sys.path.remove(str(ROOT / "examples"))
    torch.manual_seed(0)
    model = factory(**architecture.get("kwargs", {})).eval()
    with torch.inference_mode():
        [answer] = tensor_handler(model, [sample.body])
    assert answer["shape"] == sample.shape
