"""engine: vllm in the resource: the rules the API server (CEL) and the types (pydantic) both enforce, and the
engine arguments and engine folder the runtime builds from them. No vLLM needed; the API server's side is asked of
a real one (the kube-marked tests)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from tests.kube.clusters import Cluster, Refused
from zerocopy_operator.validation import InvalidSpec, validate
from zerocopy_runtime._errors import ZeroCopyError
from zerocopy_runtime._vllm import CPU_KV_CACHE_GIB, LOAD_FORMAT, LoaderArgs, build_engine_args, engine_folder
from zerocopy_runtime.config import AppArgs

pytestmark = pytest.mark.unit

RESOURCE: dict[str, Any] = {
    "apiVersion": "zerocopy.dev/v1alpha1",
    "kind": "ZeroCopyModel",
    "metadata": {"name": "chat", "namespace": "default"},
    "spec": {
        "model": {"uri": "/models/chat"},
        "serving": {"task": "text-generation", "engine": "vllm", "gpusPerReplica": 2,
                    "vllm": {"tensorParallelSize": 2, "maxModelLen": 4096}},
        "cluster": {"workerGroups": [{"name": "gpu", "gpus": 2}]},
    },
}  # fmt: skip


def _with(change: dict[str, Any]) -> dict[str, Any]:
    resource = copy.deepcopy(RESOURCE)
    resource["spec"]["serving"] = {**resource["spec"]["serving"], **change}
    return resource


def _refusal(cluster: Cluster, resource: dict[str, Any]) -> str:
    """Why the API server refuses to create `resource` (a dry run: its schema and CEL rules), or "" if it does not."""
    try:
        cluster.dry_run_create(copy.deepcopy(resource))
    except Refused as refused:
        return refused.message
    return ""


@pytest.mark.kube
def test_a_vllm_model_needs_no_architecture_and_passes_both_sides(kube_cluster: Cluster) -> None:
    assert _refusal(kube_cluster, RESOURCE) == ""
    assert validate(copy.deepcopy(RESOURCE)).serving.engine == "vllm"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"task": "embeddings"}, "engine vllm serves task text-generation"),
        ({"engine": "transformers"}, "serving.vllm settings go with engine: vllm"),
        ({"gpusPerReplica": 1}, "or exactly vllm.tensorParallelSize"),
        ({"vllm": None, "gpusPerReplica": 2}, "at most 1 for a one-GPU engine"),
    ],
    ids=["embeddings-on-vllm", "settings-without-engine", "gpus-not-tp", "default-tp-is-one"],
)
@pytest.mark.kube
def test_rules_across_fields_refuse_on_both_sides_with_one_message(
    change: dict[str, Any], message: str, kube_cluster: Cluster
) -> None:
    resource = _with(change)
    if change.get("vllm", "") is None:
        del resource["spec"]["serving"]["vllm"]
    if change.get("engine") == "transformers":
        resource["spec"]["model"]["architecture"] = {"transformers": "LlamaForCausalLM"}
    assert message in _refusal(kube_cluster, resource)
    with pytest.raises(InvalidSpec, match=message):
        validate(resource)


@pytest.mark.kube
def test_one_gpu_engines_may_share_a_gpu(kube_cluster: Cluster) -> None:
    resource = _with({"gpusPerReplica": 0.5, "vllm": {"gpuMemoryUtilization": 0.4}})
    assert _refusal(kube_cluster, resource) == ""
    assert validate(resource).serving.gpus_per_replica == 0.5


@pytest.mark.kube
def test_engine_transformers_still_needs_an_architecture_on_both_sides(kube_cluster: Cluster) -> None:
    resource = _with({"engine": "transformers", "vllm": None, "gpusPerReplica": 0})
    del resource["spec"]["serving"]["vllm"]
    message = "set model.architecture"
    assert message in _refusal(kube_cluster, resource)
    with pytest.raises(InvalidSpec, match=message):
        validate(resource)


def test_engine_args_the_runtime_owns_are_refused_by_name() -> None:
    resource = _with({"vllm": {"tensorParallelSize": 2, "engineArgs": {"load_format": "auto", "model": "x"}}})
    with pytest.raises(InvalidSpec, match="must not set load_format, model"):
        validate(resource)


def _args(dtype: str | None = None, **vllm: Any) -> AppArgs:
    return AppArgs.model_validate(
        {
            "name": "chat",
            "model": {"uri": "/m", "dtype": dtype},
            "task": "text-generation",
            "engine": "vllm",
            "vllm": vllm,
        }
    )


LOADER = LoaderArgs(weights="chat-0123", namespace="zerocopy", address="10.0.0.1:6379", report="/tmp/r.json")


def test_engine_args_load_from_the_store_and_carry_the_settings(tmp_path: Path) -> None:
    args = _args(maxModelLen=2048, dtype="bfloat16", engineArgs={"enforce_eager": True, "max_num_seqs": 8})
    built = build_engine_args(args, tmp_path, LOADER, on_gpu=True)
    assert built["load_format"] == LOAD_FORMAT
    assert LoaderArgs.model_validate(built["model_loader_extra_config"]) == LOADER
    assert (built["model"], built["tokenizer"], built["served_model_name"]) == (str(tmp_path), str(tmp_path), "chat")
    assert (built["max_model_len"], built["dtype"], built["enforce_eager"], built["max_num_seqs"]) == (
        2048, "bfloat16", True, 8,
    )  # fmt: skip
    assert "kv_cache_memory_bytes" not in built  # on GPUs gpuMemoryUtilization sizes the cache


def test_cpu_engines_get_a_bounded_kv_cache_unless_told(tmp_path: Path) -> None:
    default = build_engine_args(_args(), tmp_path, LOADER, on_gpu=False)
    assert default["kv_cache_memory_bytes"] == int(CPU_KV_CACHE_GIB * 2**30)
    assert build_engine_args(_args(kvCacheGib=0.5), tmp_path, LOADER, on_gpu=False)["kv_cache_memory_bytes"] == 2**29


def test_the_engine_folder_links_config_and_tokenizer_but_no_weights(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ["config.json", "tokenizer.json", "generation_config.json", "model.safetensors",
                 "model.safetensors.index.json", "pytorch_model.bin", "model.gguf"]:  # fmt: skip
        (model / name).write_text("{}")
    folder = engine_folder(model, tmp_path / "engine")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json", "tokenizer.json"]
    assert (folder / "config.json").resolve() == (model / "config.json").resolve()
    (model / "config.json").unlink()
    with pytest.raises(ZeroCopyError, match="has none: save the model with save_pretrained"):
        engine_folder(model, tmp_path / "again")


def test_a_tied_weight_saved_under_the_head_name_gets_the_embedding_name_vllm_reads() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (README, Testing)")
    from types import SimpleNamespace

    from zerocopy_runtime._vllm_loader import _name_tied

    head = object()
    tensors: dict[str, Any] = {"lm_head.weight": head, "model.norm.weight": object()}
    _name_tied(tensors, SimpleNamespace(hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"])))  # type: ignore[arg-type]
    assert tensors["model.embed_tokens.weight"] is head
    untied = {"model.embed_tokens.weight": object(), "lm_head.weight": object()}
    _name_tied(untied, SimpleNamespace(hf_config=SimpleNamespace(architectures=["LlamaForCausalLM"])))  # type: ignore[arg-type]
    assert untied["model.embed_tokens.weight"] is not untied["lm_head.weight"]  # both given: nothing renamed


def test_an_engine_argument_vllm_does_not_take_is_named_with_the_fix() -> None:
    pytest.importorskip("vllm", reason="vLLM is not installed (README, Testing)")
    from zerocopy_runtime._vllm import start_engine

    with pytest.raises(ZeroCopyError, match=r"serving\.vllm\.engineArgs: .*max_num_sequences.*Python names"):
        start_engine({"model": "/nowhere", "max_num_sequences": 8})
