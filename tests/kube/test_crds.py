"""Our CRDs on a real API server, as a user meets them through kubectl: installed as committed (and as the chart
and `zerocopy crd` ship them), CEL rules refusing with our messages, defaults stored, typos refused, printer
columns shown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.clusters import Cluster

pytestmark = [pytest.mark.kube]

ROOT = Path(__file__).resolve().parents[2]


def model(name: str, **serving: Any) -> dict[str, Any]:
    """A valid ZeroCopyModel (the tiny-mlp example), with `serving` fields set or (None) removed."""
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["metadata"] = {"name": name}
    for field, value in serving.items():
        if value is None:
            resource["spec"]["serving"].pop(field, None)
        else:
            resource["spec"]["serving"][field] = value
    return dict(resource)


def kubectl(cluster: Cluster, namespace: str, *args: str, obj: Any = None) -> subprocess.CompletedProcess[str]:
    return cluster.kubectl(*args, "-n", namespace, input=None if obj is None else json.dumps(obj))


def fetched(cluster: Cluster, namespace: str, kind: str, name: str) -> dict[str, Any]:
    out = kubectl(cluster, namespace, "get", kind, name, "-o", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.mark.parametrize("source", ["crds", "chart", "zerocopy crd"])
def test_every_crd_as_shipped_is_accepted(kube_cluster: Cluster, source: str) -> None:
    """The session installed crds/; the chart's copies and `zerocopy crd`'s output must be accepted as well."""
    if source == "zerocopy crd":
        text = subprocess.run(
            [sys.executable, "-m", "zerocopy_operator.cli", "crd"], capture_output=True, text=True, check=True
        ).stdout
        args = ["-f", "-"]
    else:
        text, args = None, ["-f", str(ROOT / ("crds" if source == "crds" else "charts/zerocopy-operator/crds"))]
    applied = kube_cluster.kubectl("apply", "--server-side", "--force-conflicts", "--dry-run=server", *args, input=text)
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.count("serverside-applied") == 2, applied.stdout


def test_cel_rules_refuse_with_our_messages(kube_cluster: Cluster, kube_namespace: str) -> None:
    both = model("both")
    both["spec"]["model"]["architecture"]["transformers"] = "GPT2LMHeadModel"
    refused = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=both)
    assert refused.returncode != 0
    assert "set exactly one of architecture.factory or architecture.transformers" in refused.stderr
    scaled = model("scaled", autoscaling={"maxReplicas": 3})
    too_many = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=scaled)
    assert "set serving.replicas or serving.autoscaling, not both" in too_many.stderr


@pytest.mark.parametrize(("kwargs", "accepted"), [({}, True), ({"layers": 2, "sizes": [1, 2]}, False)])
def test_a_transformers_architecture_takes_no_kwargs(
    kube_cluster: Cluster, kube_namespace: str, kwargs: dict[str, Any], accepted: bool
) -> None:
    """The rule a real API server once refused to compile (size() of a free-form object): empty kwargs are no
    kwargs, any other are refused with the rule's message."""
    resource = model("hf")
    resource["spec"]["model"]["architecture"] = {"transformers": "GPT2LMHeadModel", "kwargs": kwargs}
    created = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=resource)
    assert (created.returncode == 0) is accepted, created.stderr
    if not accepted:
        assert "architecture.kwargs go with factory; a transformers model reads its config.json" in created.stderr


def test_schema_defaults_are_stored(kube_cluster: Cluster, kube_namespace: str) -> None:
    created = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=model("defaulted", handler=None))
    assert created.returncode == 0, created.stderr
    spec = fetched(kube_cluster, kube_namespace, "zcm", "defaulted")["spec"]
    assert (spec["serving"]["handler"], spec["serving"]["task"], spec["serving"]["device"]) == (
        "tensor",
        "tensor",
        "auto",
    )
    assert spec["cluster"]["workerGroups"][0]["gpuResource"] == "nvidia.com/gpu"
    assert "upgradeStrategy" not in spec  # a default fills a field of an object that is there, never creates one


def test_a_typo_is_refused_by_kubectl_naming_the_field(kube_cluster: Cluster, kube_namespace: str) -> None:
    refused = kubectl(kube_cluster, kube_namespace, "apply", "-f", "-", obj=model("typo", replica=2))
    assert refused.returncode != 0
    assert 'unknown field "spec.serving.replica"' in refused.stderr


def test_kubectl_get_shows_the_printer_columns(kube_cluster: Cluster, kube_namespace: str) -> None:
    assert kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=model("printed")).returncode == 0
    status = {"phase": "Ready", "replicas": "2/2", "conditions": [{"type": "Ready", "status": "True"}]}
    patch = kubectl(kube_cluster, kube_namespace, "patch", "zcm", "printed", "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))  # fmt: skip
    assert patch.returncode == 0, patch.stderr
    header, *rows = kubectl(kube_cluster, kube_namespace, "get", "zcm", "printed").stdout.splitlines()
    assert header.split() == ["NAME", "READY", "PHASE", "REPLICAS", "MODEL", "ENDPOINT", "AGE"]
    assert rows[0].split()[:5] == ["printed", "True", "Ready", "2/2", "file://.cache/tiny-mlp.safetensors"]
    wide = kubectl(kube_cluster, kube_namespace, "get", "zcm", "printed", "-o", "wide").stdout.splitlines()[0].split()
    assert {"TASK", "CLUSTER"} <= set(wide)  # priority 1: shown by -o wide only

    pool = {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ZeroCopyCluster", "metadata": {"name": "pool"}, "spec": {}}
    assert kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=pool).returncode == 0
    header = kubectl(kube_cluster, kube_namespace, "get", "zcc", "pool").stdout.splitlines()[0]
    assert header.split() == ["NAME", "READY", "PHASE", "MODELS", "OBJECT-STORE", "AGE"]


def test_adapters_are_accepted_on_a_text_generation_model_and_refused_elsewhere(
    kube_cluster: Cluster, kube_namespace: str
) -> None:
    adapters = [{"name": "sql", "uri": "file://adapters/sql"}, {"name": "chat-v2", "uri": "s3://bucket/chat-v2"}]
    chat = model("with-adapters", task="text-generation", handler=None)
    chat["spec"]["model"]["architecture"] = {"transformers": "LlamaForCausalLM"}
    chat["spec"]["adapters"] = adapters
    created = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=chat)
    assert created.returncode == 0, created.stderr
    assert fetched(kube_cluster, kube_namespace, "zcm", "with-adapters")["spec"]["adapters"] == adapters
    tensor = model("tensor-adapters")
    tensor["spec"]["adapters"] = adapters
    refused = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=tensor)
    assert refused.returncode != 0
    assert "adapters go with task text-generation on engine transformers" in refused.stderr
    bad = model("bad-adapter-name", task="text-generation", handler=None)
    bad["spec"]["model"]["architecture"] = {"transformers": "LlamaForCausalLM"}
    bad["spec"]["adapters"] = [{"name": "Has Space", "uri": "file://x"}]
    refused = kubectl(kube_cluster, kube_namespace, "create", "-f", "-", obj=bad)
    assert refused.returncode != 0
    assert "spec.adapters[0].name" in refused.stderr
