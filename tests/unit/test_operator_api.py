"""The ZeroCopyModel API: the committed CRD matches the types, is structural, and accepts the examples."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from zerocopy_operator.crd import CLUSTER, RESOURCES, Resource, build_crd, crd_yaml
from zerocopy_operator.validation import InvalidSpec, validate

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def _schema(resource: Resource | None = None) -> dict[str, Any]:
    crd = build_crd() if resource is None else build_crd(resource)
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _example(name: str) -> dict[str, Any]:
    resource = yaml.safe_load((ROOT / "examples" / name).read_text())
    resource["metadata"]["namespace"] = "default"
    return resource


@pytest.mark.parametrize("resource", RESOURCES, ids=[r.kind for r in RESOURCES])
def test_committed_crds_match_the_types(resource: Resource) -> None:
    drifted = f"the {resource.kind} CRD drifted from zerocopy_operator.api: run `zerocopy crd --out crds`"
    assert (ROOT / "crds" / resource.file_name).read_text() == crd_yaml(resource), drifted


@pytest.mark.parametrize("resource", RESOURCES, ids=[r.kind for r in RESOURCES])
def test_crd_schema_is_structural(resource: Resource) -> None:
    """Every node says its type (or is int-or-string / free-form), and nothing Kubernetes refuses remains."""

    def walk(node: dict[str, Any], path: str) -> None:
        assert not {"$ref", "$defs", "title"} & set(node), path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, f"{path}: anyOf outside int-or-string"
        else:
            assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(_schema(resource), "")


def test_crd_names_columns_and_status_subresource() -> None:
    spec = build_crd()["spec"]
    version = spec["versions"][0]
    assert spec["names"]["shortNames"] == ["zcm"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready", "Phase", "Replicas", "Cluster", "Task", "Model", "Endpoint", "Age",
    ]  # fmt: skip
    rules = _schema()["properties"]["spec"]["properties"]["serving"]["properties"]["autoscaling"]
    assert rules["x-kubernetes-validations"][0]["rule"] == "self.minReplicas <= self.maxReplicas"


def test_cluster_crd_names_columns_and_the_cluster_fields_a_model_has() -> None:
    """ZeroCopyCluster's spec is a model's spec.cluster plus the upgrade strategy: one declaration of each field."""
    crd = build_crd(CLUSTER)
    version = crd["spec"]["versions"][0]
    assert (crd["metadata"]["name"], crd["spec"]["names"]["shortNames"]) == ("zerocopyclusters.zerocopy.dev", ["zcc"])
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Ready", "Phase", "Models", "Object-Store", "Endpoint", "Age",
    ]  # fmt: skip
    cluster = _schema(CLUSTER)["properties"]["spec"]["properties"]
    model = _schema()["properties"]["spec"]["properties"]
    assert set(cluster) == set(model["cluster"]["properties"]) | {"upgradeStrategy", "credentialsSecrets"}
    assert cluster["workerGroups"] == model["cluster"]["properties"]["workerGroups"]
    assert cluster["upgradeStrategy"] == model["upgradeStrategy"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_are_accepted_by_the_crd_schema_and_the_types(path: Path) -> None:
    kinds = {r.kind: r for r in RESOURCES}
    for resource in yaml.safe_load_all(path.read_text()):
        kind = kinds[resource["kind"]]
        jsonschema.Draft4Validator(_schema(kind)).validate(resource)
        kind.spec.model_validate(resource["spec"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["serving"].update(autoscaling={"minReplicas": 5, "maxReplicas": 2}), "must not exceed"),
        (lambda s: s["serving"].update(replicas=2, autoscaling={"maxReplicas": 4}), "not both"),
        (lambda s: s["model"]["architecture"].update(transformers="GPT2LMHeadModel"), "exactly one of"),
        (lambda s: s.update(upgradeStrategy={"type": "Rolling"}), "spec.upgradeStrategy.type"),
        (lambda s: s["cluster"]["workerGroups"][0].update(memory="lots"), "not a Kubernetes quantity"),
        (lambda s: s["serving"].update(replicaCount=3), "spec.serving.replicaCount: Extra inputs"),
    ],
    ids=["min-over-max", "replicas-and-autoscaling", "two-architectures", "unknown-strategy", "bad-quantity", "typo"],
)
def test_bad_fields_are_named(change: Any, message: str) -> None:
    resource = _example("tiny-mlp.yaml")
    change(resource["spec"])
    with pytest.raises(InvalidSpec, match=message):
        validate(resource)


def test_rules_written_twice_agree_on_the_schema_side() -> None:
    """The CRD schema rejects by itself what it can express (bounds, enums); CEL covers the rest."""
    resource = _example("tiny-mlp.yaml")
    resource["spec"]["upgradeStrategy"] = {"type": "Rolling"}
    with pytest.raises(jsonschema.ValidationError, match="Rolling"):
        jsonschema.Draft4Validator(_schema()).validate(resource)
    resource = _example("tiny-mlp.yaml")
    resource["spec"]["serving"]["gpusPerReplica"] = -1
    with pytest.raises(jsonschema.ValidationError, match="minimum"):
        jsonschema.Draft4Validator(_schema()).validate(resource)


def test_the_operator_imports_neither_torch_nor_ray() -> None:
    code = (
        "import sys, zerocopy_operator.handlers, zerocopy_operator.cli, zerocopy_operator.manifests\n"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
