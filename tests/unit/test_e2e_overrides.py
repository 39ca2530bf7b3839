"""What the kind e2e applies: every example, made CPU-only and laptop-sized, still passes the operator's checks.

Models with a cluster of their own are checked alone; models that name a ZeroCopyCluster are checked against
that cluster as the e2e applies it (from the same example file), and the cluster is planned with all of them.
"""

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

from tests.e2e.overrides import EXAMPLES_DIR, MAX_REPLICAS, SAMPLES, WORKER_CPU, documents_for_kind, for_kind
from tests.kube import kuberay
from tests.kube.clusters import Cluster as KubeCluster
from tests.kube.clusters import Refused
from zerocopy_operator import quantity
from zerocopy_operator.api import Cluster, ZeroCopyModelSpec
from zerocopy_operator.manifests import build_cluster_rayservice, build_rayservice
from zerocopy_operator.placement import cluster_ref, plan_cluster
from zerocopy_operator.validation import validate, validate_cluster

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = kuberay.crd("rayservices")
IMAGE = "zerocopy.local/zerocopy-examples:e2e"
#: What one model's pods may take in all on a laptop running kind.
LAPTOP_MEMORY = 8 * 2**30
LAPTOP_CPUS = 4


NAMESPACE = "zerocopy-e2e"
FILES = sorted((ROOT / "examples").glob("*.yaml"))


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _examples(kind: str = "ZeroCopyModel") -> list[tuple[str, dict[str, Any]]]:
    """Each example document of `kind` as written (in the e2e's namespace), named file:name."""
    found = []
    for path in FILES:
        for document in _documents(path):
            if document.get("kind") == kind:
                document.setdefault("metadata", {})["namespace"] = NAMESPACE
                found.append((f"{path.name}:{document['metadata']['name']}", document))
    return found


EXAMPLES = _examples()
CLUSTERS = _examples("ZeroCopyCluster")
#: Every example file's documents as the e2e applies them, by file:name.
APPLIED = {
    f"{path.name}:{d['metadata']['name']}": d for path in FILES for d in documents_for_kind(_documents(path), NAMESPACE)
}


def _file(where: str) -> str:
    return where.split(":")[0]


def _kind_cluster(where: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """For an example on a ZeroCopyCluster: that cluster as the e2e applies it, and the models it applies with it."""
    applied = [d for w, d in APPLIED.items() if _file(w) == _file(where)]
    model = APPLIED[where]
    (cluster,) = [d for d in applied if d["kind"] == "ZeroCopyCluster" and d["metadata"]["name"] == cluster_ref(model)]
    return cluster, [d for d in applied if d["kind"] == "ZeroCopyModel"]


def _validated(where: str) -> tuple[ZeroCopyModelSpec, Cluster, dict[str, Any], dict[str, Any]]:
    """The model as the e2e applies it, validated as the operator does; its cluster's spec, its RayService
    (its own, or its ZeroCopyCluster's), and its Serve application in that RayService."""
    kind = APPLIED[where]
    if cluster_ref(kind) is None:
        spec = validate(kind)  # the operator's own checks: schema types and semantics (stores, CPUs, GPUs)
        rayservice = build_rayservice(kind, IMAGE)
        (application,) = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
        return spec, spec.cluster, rayservice, application
    cluster, models = _kind_cluster(where)
    cluster_spec = validate_cluster(cluster)
    # As the operator checks a model on a cluster: alone against the cluster's pods, then placed beside the others.
    spec = validate(kind, models, cluster=cluster_spec)
    plan = plan_cluster(cluster["metadata"]["name"], cluster_spec, models, {})
    (member,) = [m for m in plan.members if m.name == kind["metadata"]["name"]]
    assert not member.problems, f"{where}: {member.problems}"
    rayservice = build_cluster_rayservice(cluster, plan.applications, IMAGE)
    applications = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]
    (application,) = [a for a in applications if a["name"] == kind["metadata"]["name"]]
    return spec, cluster_spec, rayservice, application


def _containers(rayservice: dict[str, Any]) -> Iterator[tuple[dict[str, Any], int]]:
    """Each Ray container with the number of pods that run it."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    for container in cluster["headGroupSpec"]["template"]["spec"]["containers"]:
        yield container, 1
    for group in cluster["workerGroupSpecs"]:
        for container in group["template"]["spec"]["containers"]:
            yield container, group["replicas"]


def test_examples_are_found() -> None:
    assert {r["metadata"]["name"] for _, r in EXAMPLES} >= {"tiny-mlp", "gpt2", "chat", "minilm"}
    assert {r["metadata"]["name"] for _, r in CLUSTERS} >= {"shared"}
    assert set(APPLIED) == {where for where, _ in [*EXAMPLES, *CLUSTERS]}  # the e2e applies each one


def test_every_model_on_a_cluster_finds_it_in_its_own_example_file() -> None:
    for where, resource in EXAMPLES:
        if cluster_ref(resource) is not None:
            cluster, _ = _kind_cluster(where)  # the e2e applies the file as a whole
            assert cluster["metadata"]["name"] == cluster_ref(resource)


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_every_example_has_a_sample_request(where: str, resource: dict[str, Any]) -> None:
    assert resource["metadata"]["name"] in SAMPLES, f"{where}: add its request to tests/e2e/overrides.py SAMPLES"


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_example_for_kind_validates_and_asks_for_no_gpu(where: str, resource: dict[str, Any]) -> None:
    assert APPLIED[where] == for_kind(resource)  # what the e2e applies: the model alone decides its overrides
    spec, cluster_spec, rayservice, deployment = _validated(where)
    assert isinstance(spec, ZeroCopyModelSpec)
    assert spec.serving.gpus_per_replica == 0
    assert spec.serving.device == "cpu"
    assert cluster_spec.image is None  # the operator's runtime image: the e2e's examples image
    assert not cluster_spec.enable_in_tree_autoscaling
    for group in cluster_spec.worker_groups:
        assert group.gpus == 0
        assert not group.node_selector
        assert not group.tolerations

    cluster = rayservice["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert "num-gpus" not in group["rayStartParams"]
        pod = group["template"]["spec"]
        assert not pod.get("nodeSelector")
        assert "gpu" not in json.dumps(pod.get("tolerations", [])).lower()
        for container in pod["containers"]:
            resources = {**container["resources"]["requests"], **container["resources"]["limits"]}
            assert not [name for name in resources if "gpu" in name.lower()], f"{where}: GPUs in {resources}"
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
    worker_cpus = max(float(quantity.parse(g.cpu)) for g in cluster_spec.worker_groups)
    assert most * options["ray_actor_options"]["num_cpus"] <= worker_cpus


@pytest.mark.parametrize(("where", "resource"), CLUSTERS, ids=[where for where, _ in CLUSTERS])
def test_cluster_for_kind_serves_all_its_models_on_cpus_in_laptop_sized_pods(
    where: str, resource: dict[str, Any]
) -> None:
    cluster = APPLIED[where]
    spec = validate_cluster(cluster)
    assert spec.image is None
    assert not spec.enable_in_tree_autoscaling
    assert spec.head.cpu == "1"
    for group in spec.worker_groups:
        assert group.gpus == 0
        assert not group.node_selector
        assert not group.tolerations
        assert (group.replicas, group.max_replicas) == (1, 1)
        assert quantity.parse(group.cpu) <= quantity.parse(WORKER_CPU)

    models = [d for w, d in APPLIED.items() if _file(w) == _file(where) and d["kind"] == "ZeroCopyModel"]
    plan = plan_cluster(cluster["metadata"]["name"], spec, models, {})
    named = {m["metadata"]["name"] for m in models if cluster_ref(m) == cluster["metadata"]["name"]}
    assert named, f"{where}: no model of its example names it"
    assert {m.name for m in plan.members} == named
    for member in plan.members:
        assert not member.problems, f"{member.name}: {member.problems}"
        assert member.application is not None
    # Each group's object store holds every model's weights (kind has no GPUs: every replica may land anywhere),
    # and shrank from what the example asks.
    asked = {g["name"]: g.get("objectStoreMemory", "4Gi") for g in resource["spec"].get("workerGroups") or []}
    for use in plan.store:
        assert sorted(use.models) == sorted(named)
        assert 0 < use.weights_bytes < use.capacity_bytes
        assert use.group not in asked or use.capacity_bytes <= quantity.to_bytes(asked[use.group])
    # All the models' replicas, scaled up, find their CPUs in the cluster's worker pods together.
    wanted = 0.0
    rayservice = build_cluster_rayservice(cluster, plan.applications, IMAGE)
    for application in yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"]:
        options = application["deployments"][0]
        most = options.get("num_replicas") or options["autoscaling_config"]["max_replicas"]
        wanted += most * options["ray_actor_options"]["num_cpus"]
    assert wanted <= sum(float(quantity.parse(g.cpu)) * (g.replicas or 1) for g in spec.worker_groups)
    memory = sum(quantity.to_bytes(c["resources"]["limits"]["memory"]) * pods for c, pods in _containers(rayservice))
    assert memory <= LAPTOP_MEMORY, f"{where}: {quantity.memory(int(memory))} of pods does not fit a laptop"


@pytest.mark.kube
@pytest.mark.parametrize("where", sorted(APPLIED), ids=sorted(APPLIED))
def test_what_the_e2e_applies_passes_the_crd_schema_and_its_rules(where: str, kube_cluster: KubeCluster) -> None:
    """What the API server checks before the operator sees it (spec.cluster beside spec.clusterRef is refused), and
    no field it would drop: asked of a real one, with a dry run in namespace default (nothing is written)."""
    document = copy.deepcopy(APPLIED[where])
    document["metadata"]["namespace"] = "default"  # the e2e's own namespace does not exist here
    try:
        kube_cluster.dry_run_create(document)
    except Refused as refused:
        pytest.fail(f"the API server refuses {where} as the e2e applies it: {refused}")


@pytest.mark.parametrize(("where", "resource"), EXAMPLES, ids=[where for where, _ in EXAMPLES])
def test_example_for_kind_is_a_valid_rayservice_for_kuberay(where: str, resource: dict[str, Any]) -> None:
    if reason := kuberay.missing():
        pytest.skip(reason)
    crd = yaml.safe_load(KUBERAY.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    _, _, rayservice, _ = _validated(where)  # its own, or its ZeroCopyCluster's with every model of the file
    jsonschema.Draft4Validator(schema).validate(rayservice)


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
    if task == "embeddings":  # an encoder: one vector per input from /v1/embeddings
        from zerocopy_runtime import openai_protocol

        assert sample.protocol == "embeddings"
        request = openai_protocol.parse(openai_protocol.EmbeddingRequest, sample.body)
        assert sample.shape[0] == len(request.texts())
        # The folder the example's script writes (examples/minilm.py), where it has been run here.
        folder = resource["spec"]["model"]["uri"].removeprefix("file://")
        config = ROOT / "examples" / folder / "config.json"
        if config.is_file():
            assert sample.shape[1] == json.loads(config.read_text())["hidden_size"]
        return
    if task != "tensor":  # a text task: the request must be what its OpenAI-compatible route takes
        from zerocopy_runtime import openai_protocol

        assert task == "text-generation"
        assert sample.protocol == "chat"
        assert sample.path == "/v1/chat/completions"
        openai_protocol.parse(openai_protocol.ChatCompletionRequest, sample.body)
        return
    assert sample.protocol == "tensor"
    if "transformers" in architecture:
        transformers = pytest.importorskip("transformers")
        config = getattr(transformers, architecture["transformers"]).config_class()
        assert sample.body.get("dtype") == "int64"
        assert sample.shape == [len(sample.body["inputs"]), config.vocab_size]
        return
    import torch

    from zerocopy_runtime.tensor_codec import tensor_handler

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
