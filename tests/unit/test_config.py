"""One schema: the resource's fields are declared once, and the runtime's args are derived from the typed spec."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from zerocopy_operator.api import Model, Serving, ZeroCopyModelSpec
from zerocopy_operator.manifests import build_app_args, build_serve_application
from zerocopy_operator.validation import InvalidSpec, validate
from zerocopy_runtime.config import AppArgs, Architecture, Batching, ModelSource, ReplicaSettings

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-mlp.yaml"


def _example() -> dict[str, Any]:
    resource: dict[str, Any] = yaml.safe_load(EXAMPLE.read_text())
    resource["metadata"]["namespace"] = "default"
    return resource


def test_the_spec_is_composed_of_the_runtimes_own_classes() -> None:
    """No second declaration to drift: the operator's types extend the runtime's."""
    assert issubclass(Model, ModelSource)
    assert issubclass(Serving, ReplicaSettings)
    assert issubclass(AppArgs, ReplicaSettings)
    fields = ZeroCopyModelSpec.model_fields
    assert fields["model"].annotation is Model
    assert Model.model_fields["architecture"].annotation == Architecture | None
    assert Serving.model_fields["batching"].annotation is Batching


def test_args_are_the_specs_fields_with_the_same_defaults() -> None:
    spec = ZeroCopyModelSpec.model_validate({"model": {"uri": "/m.safetensors", "architecture": {"factory": "a:b"}}})
    args = build_app_args("m", spec)
    assert args.device == spec.serving.device == "auto"  # once, in ReplicaSettings
    assert args.handler == "tensor"
    assert args.model.architecture == spec.model.architecture
    assert not hasattr(args.model, "size")  # what only the cluster needs stays out of the replicas' args


def test_example_resource_becomes_the_serve_application() -> None:
    resource = _example()
    spec = validate(resource)
    app = build_serve_application("tiny-mlp", spec, "/tiny-mlp")
    args = AppArgs.model_validate(app["args"])  # what the replica validates its args with
    assert args.name == "tiny-mlp"
    assert args.model.uri == "file://.cache/tiny-mlp.safetensors"  # relative: the runtime takes it against its dir
    assert args.model.architecture.factory == "tiny_mlp:build"
    assert args.batching.max_batch_size == 8
    assert app["route_prefix"] == "/tiny-mlp"
    assert app["deployments"][0]["num_replicas"] == 2


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ({}, "exactly one of"),
        ({"factory": "a.b:c", "transformers": "GPT2LMHeadModel"}, "exactly one of"),
        ({"transformers": "GPT2LMHeadModel", "kwargs": {"n": 1}}, "kwargs go with factory"),
        ({"factory": "a.b:c", "config": "c.json"}, "config goes with transformers"),
        ({"transformers": "gpt2"}, "should match pattern"),
    ],
    ids=["neither", "both", "kwargs-for-transformers", "config-for-factory", "lowercase-class"],
)
def test_architecture_needs_exactly_one_way_to_build(architecture: dict, message: str) -> None:
    resource = _example()
    resource["spec"]["model"]["architecture"] = architecture
    with pytest.raises(InvalidSpec, match=message):
        validate(resource)
    with pytest.raises(ValidationError, match=message):
        Architecture.model_validate(architecture)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (("serving", "replicas"), 0, r"spec\.serving\.replicas: Input should be greater than or equal to 1"),
        (("serving", "replicas"), -1, r"spec\.serving\.replicas"),
        (("serving", "batching", "maxBatchSize"), 0, r"spec\.serving\.batching\.maxBatchSize"),
        (("model", "architecture"), "tiny_mlp:build", r"spec\.model\.architecture: Input should be"),
        (("model", "uri"), "ftp://host/m.pt", "unsupported URI scheme"),
        (("serving", "device"), "tpu", r"spec\.serving\.device"),
    ],
)
def test_bad_fields_are_named_in_the_resources_spelling(field: tuple[str, ...], value: Any, message: str) -> None:
    resource = _example()
    node = resource["spec"]
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    with pytest.raises(InvalidSpec, match=message):
        validate(resource)


def test_a_missing_uri_is_named() -> None:
    resource = _example()
    del resource["spec"]["model"]["uri"]
    with pytest.raises(InvalidSpec, match=r"spec\.model\.uri: Field required"):
        validate(resource)


@pytest.mark.parametrize("length", [48, 63, 64])
def test_names_kuberay_would_refuse_are_refused_with_the_limit(length: int) -> None:
    resource = _example()
    resource["metadata"]["name"] = "m" * length
    with pytest.raises(InvalidSpec, match="more than 47"):
        validate(resource)


def test_a_47_character_name_renders() -> None:
    resource = _example()
    resource["metadata"]["name"] = "m" * 47
    validate(resource)


def test_wrong_kind_is_refused() -> None:
    with pytest.raises(InvalidSpec, match="kind ZeroCopyModel"):
        validate(_example() | {"kind": "Deployment"})
