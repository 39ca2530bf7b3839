"""The ZeroCopyModel resource to Serve app args: the conversion the operator and `zerocopy serve` share."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from zerocopy_runtime.config import from_resource

pytestmark = pytest.mark.unit

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-mlp.yaml"


def test_example_resource_converts_with_paths_relative_to_the_file() -> None:
    args, settings = from_resource(yaml.safe_load(EXAMPLE.read_text()), base_dir=EXAMPLE.parent)
    assert args.name == "tiny-mlp"
    assert args.model.uri == str(EXAMPLE.parent / ".cache" / "tiny-mlp.safetensors")
    assert args.architecture.factory == "tiny_mlp:build"
    assert args.batching.max_batch_size == 8
    assert (settings.route_prefix, settings.replicas) == ("/tiny-mlp", 2)


def test_absolute_and_remote_uris_are_kept() -> None:
    resource = yaml.safe_load(EXAMPLE.read_text())
    for uri in ("file:///models/m.safetensors", "s3://bucket/m.safetensors", "hf://org/m@v1"):
        resource["spec"]["model"]["uri"] = uri
        assert from_resource(resource, base_dir=Path("/elsewhere"))[0].model.uri == uri


def test_wrong_kind_and_bad_fields_are_named() -> None:
    resource = yaml.safe_load(EXAMPLE.read_text())
    with pytest.raises(ValueError, match="kind ZeroCopyModel"):
        from_resource(resource | {"kind": "Deployment"})
    resource["spec"]["serving"]["batching"]["maxBatchSize"] = 0
    with pytest.raises(ValidationError, match="max_batch_size"):
        from_resource(resource)
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["spec"]["serving"]["replicas"] = 0
    with pytest.raises(ValidationError, match="replicas"):
        from_resource(resource)


def test_transformers_architecture_takes_its_config_relative_to_the_file() -> None:
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["spec"]["model"]["architecture"] = {"transformers": "GPT2LMHeadModel", "config": "gpt2/config.json"}
    args, _ = from_resource(resource, base_dir=Path("/models"))
    assert (args.architecture.transformers, args.architecture.config) == ("GPT2LMHeadModel", "/models/gpt2/config.json")


@pytest.mark.parametrize(
    ("architecture", "message"),
    [
        ({}, "exactly one of"),
        ({"factory": "a.b:c", "transformers": "GPT2LMHeadModel"}, "exactly one of"),
        ({"transformers": "GPT2LMHeadModel", "kwargs": {"n": 1}}, "kwargs go with `factory`"),
        ({"factory": "a.b:c", "config": "c.json"}, "config goes with `transformers`"),
        ({"transformers": "gpt2"}, "should match pattern"),
    ],
    ids=["neither", "both", "kwargs-for-transformers", "config-for-factory", "lowercase-class"],
)
def test_architecture_needs_exactly_one_way_to_build(architecture: dict, message: str) -> None:
    resource = yaml.safe_load(EXAMPLE.read_text())
    resource["spec"]["model"]["architecture"] = architecture
    with pytest.raises(ValidationError, match=message):
        from_resource(resource)
