"""Every bad input to `zerocopy serve`, `validate` and `render` gets one message and a non-zero exit, never a traceback.

The `serve` cases here all fail before Ray starts (the file, the resource, the
checkpoint, the factory are checked first); a replica that fails to start is
in tests/integration/test_cli_serve.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.models import MLP

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _resource(**spec_changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {
            "uri": "file://mlp.safetensors",
            "architecture": {"factory": "tests.models:MLP", "kwargs": {"width": 16, "depth": 1}},
        },
        "serving": {"replicas": 1},
    }
    for path, value in spec_changes.items():
        *parents, leaf = path.split("__")
        node = spec
        for key in parents:
            node = node[key]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return {"apiVersion": "zerocopy.dev/v1alpha1", "kind": "ZeroCopyModel", "metadata": {"name": "m"}, "spec": spec}


def _write(folder: Path, resource: Any) -> Path:
    path = folder / "model.yaml"
    path.write_text(resource if isinstance(resource, str) else yaml.safe_dump(resource))
    return path


def _corrupt(folder: Path) -> None:
    (folder / "mlp.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")


def _config_without_tokenizer(folder: Path) -> None:
    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))


def _truncated(folder: Path) -> None:
    data = (folder / "mlp.safetensors").read_bytes()
    (folder / "mlp.safetensors").write_bytes(data[: len(data) // 2])


def _not_gguf(folder: Path) -> None:
    (folder / "m.gguf").write_bytes(b"this is a text file, not llama.cpp's GGUF")


def _gguf_cut_in_its_header(folder: Path) -> None:
    (folder / "m.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (272).to_bytes(8, "little"))


_GGUF = {"model__uri": "file://m.gguf", "model__architecture": {"transformers": "AutoModelForCausalLM"}}

#: (case, the file's content, a change to the folder, the words the message must contain)
CASES: list[tuple[str, Any, Callable[[Path], None] | None, list[str]]] = [
    ("malformed-yaml", "apiVersion: zerocopy.dev/v1alpha1\nspec: [\n", None, ["model.yaml", "not valid YAML", "line"]),
    ("not-a-resource", "- just\n- a list\n", None, ["model.yaml", "document 1 is not a Kubernetes resource"]),
    ("architecture-string", _resource(model__architecture="tests.models:MLP"), None,
     ["spec.model.architecture", "valid dictionary"]),
    ("replicas-negative", _resource(serving__replicas=-1), None, ["spec.serving.replicas", "greater than or equal"]),
    ("replicas-zero", _resource(serving__replicas=0), None, ["spec.serving.replicas"]),
    ("missing-uri", _resource(model__uri=None), None, ["spec.model.uri", "Field required"]),
    ("transformers-kwargs", _resource(model__architecture={"transformers": "BertModel", "kwargs": {"n": 1}}), None,
     ["architecture.kwargs go with factory"]),
    ("long-name", {**_resource(), "metadata": {"name": "m" * 50}}, None, ["more than 47"]),
    ("missing-checkpoint", _resource(model__uri="file://nowhere.safetensors"), None,
     ["nowhere.safetensors", "does not exist", "check model.uri"]),
    ("corrupt-checkpoint", _resource(), _corrupt, ["mlp.safetensors"]),
    ("truncated-checkpoint", _resource(), _truncated, ["mlp.safetensors"]),
    ("checksum-mismatch", _resource(model__sha256="0" * 64), None, ["Checksum mismatch", "fix model.sha256"]),
    ("missing-factory", _resource(model__architecture={"factory": "tests.models:Nope"}), None,
     ["architecture.factory", "tests.models:Nope", "cannot be imported"]),
    ("missing-tokenizer", _resource(model__architecture={"transformers": "LlamaForCausalLM"},
                                    serving__task="text-generation"), _config_without_tokenizer,
     ["Text tasks need the model's tokenizer", "tokenizer.save_pretrained()"]),
    ("gguf-that-is-not", _resource(**_GGUF), _not_gguf, ["m.gguf", "is not a GGUF file"]),
    ("gguf-truncated", _resource(**_GGUF), _gguf_cut_in_its_header, ["m.gguf", "truncated"]),
]  # fmt: skip


def _zerocopy(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "zerocopy_operator.cli", *args],
        capture_output=True, text=True, cwd=cwd, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HOME": str(cwd)},
    )  # fmt: skip


def _no_traceback(out: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in out.stderr + out.stdout, out.stderr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    save_file(MLP(16, 1).state_dict(), tmp_path / "mlp.safetensors")
    return tmp_path


@pytest.mark.parametrize(("case", "content", "change", "words"), CASES, ids=[c[0] for c in CASES])
def test_serve_answers_a_bad_input_in_one_message(
    folder: Path, case: str, content: Any, change: Callable[[Path], None] | None, words: list[str]
) -> None:
    path = _write(folder, content)
    if change is not None:
        change(folder)
    out = _zerocopy("serve", str(path), "--port", "1")
    _no_traceback(out)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("zerocopy serve: "), out.stderr
    for word in words:
        assert word in out.stderr, out.stderr
    assert "Started a local Ray" not in out.stderr + out.stdout  # refused before any Ray process


@pytest.mark.parametrize("command", ["validate", "render"])
@pytest.mark.parametrize(
    ("case", "content", "words"),
    [c[:2] + c[3:] for c in CASES[:8]],
    ids=[c[0] for c in CASES[:8]],
)
def test_validate_and_render_answer_a_bad_resource_without_a_traceback(
    folder: Path, command: str, case: str, content: Any, words: list[str]
) -> None:
    out = _zerocopy(command, str(_write(folder, content)))
    _no_traceback(out)
    assert out.returncode in (1, 2), out.stderr
    for word in words:
        assert word in out.stdout + out.stderr


@pytest.mark.parametrize("command", ["serve", "validate", "render"])
def test_a_missing_file_is_named(command: str, tmp_path: Path) -> None:
    out = _zerocopy(command, str(tmp_path / "nope.yaml"))
    _no_traceback(out)
    assert out.returncode == 2
    assert f"{tmp_path / 'nope.yaml'}: no such file" in out.stderr


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    out = _zerocopy("--debug", "validate", str(tmp_path / "nope.yaml"))
    assert out.returncode != 0
    assert "Traceback" in out.stderr


def test_serving_several_text_models_refuses_a_route_on_their_shared_openai_endpoint(folder: Path) -> None:
    """With several models `zerocopy serve` puts one OpenAI endpoint at / and /v1: a model may not take them."""
    paths = []
    for name, route in (("a", "/a"), ("b", "/v1")):
        resource = _resource(serving__task="text-generation", serving__routePrefix=route)
        resource["spec"]["model"]["architecture"] = {"transformers": "LlamaForCausalLM"}
        resource["metadata"]["name"] = name
        paths.append(folder / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(resource))
    out = _zerocopy("serve", *map(str, paths))
    assert out.returncode != 0
    assert "route prefix /v1 is the OpenAI endpoint of several models served together" in out.stderr, out.stderr
    _no_traceback(out)
