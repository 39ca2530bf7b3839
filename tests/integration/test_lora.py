"""LoRA adapters over Serve and HTTP: each adapter is its own OpenAI model on the shared base weights, and
adding or removing one restarts nothing and publishes no base weights again."""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.text_models import causal_lm_folder, lora_adapter_folder
from zerocopy_runtime.config import AppArgs

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")
pytest.importorskip("peft")

APP = "lora"


def _info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/-/info", timeout=60) as response:
        info: dict[str, Any] = json.loads(response.read())
    return info


def _greedy(model: Any, tokenizer: Any, prompt: str, max_new: int = 8) -> str:
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids) :].tolist()
    return str(tokenizer.decode([t for t in out if t != tokenizer.eos_token_id], skip_special_tokens=True))


@pytest.fixture(scope="module")
def served(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from ray import serve

    import zerocopy_runtime
    from zerocopy_runtime.local_serve import deploy as deploy_config

    folder = tmp_path_factory.mktemp("lora")
    base, tokenizer = causal_lm_folder(folder / "base")
    merged = {
        "a": lora_adapter_folder(base, folder / "a", seed=1, targets=["q_proj", "v_proj"]),
        "b": lora_adapter_folder(base, folder / "b", seed=2, targets=["o_proj", "down_proj"], rank=2),
    }
    args = AppArgs.model_validate(
        {
            "name": APP,
            "model": {"uri": str(folder / "base"), "architecture": {"transformers": "LlamaForCausalLM"}},
            "task": "text-generation",
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3},
        }
    ).model_dump(mode="json", exclude_none=True)

    def deploy(*names: str) -> None:
        """As KubeRay does: a Serve config, where a change to user_config alone is an in-place update."""
        adapters = [{"name": n, "uri": str(folder / n)} for n in names]
        options = {"name": "ZeroCopyDeployment", "num_replicas": 1, "user_config": {"adapters": adapters}}
        application = {"name": APP, "route_prefix": f"/{APP}", "import_path": "zerocopy_runtime.serve:build_app",
                       "args": args, "deployments": [options]}  # fmt: skip
        deploy_config([application], "127.0.0.1", serve_port)
        deadline = time.monotonic() + 300
        while (status := serve.status().applications.get(APP)) is None or status.status != "RUNNING":
            assert time.monotonic() < deadline, status
            time.sleep(0.2)

    deploy("a", "b")
    yield {"url": f"http://127.0.0.1:{serve_port}/{APP}", "deploy": deploy, "base": base, "merged": merged,
           "tokenizer": tokenizer}  # fmt: skip
    serve.delete(APP)
    zerocopy_runtime.release_model(APP)


def test_each_adapter_is_an_openai_model_answering_as_peft_merged_it(served: dict[str, Any]) -> None:
    url, tokenizer = served["url"], served["tokenizer"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [APP, f"{APP}:a", f"{APP}:b"]
    prompts = ["hello world", "the weights are published once per node"]
    for model, reference in (
        (APP, served["base"]),
        (f"{APP}:a", served["merged"]["a"]),
        (f"{APP}:b", served["merged"]["b"]),
    ):
        for prompt in prompts:
            answer = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
            assert answer.choices[0].text == _greedy(reference, tokenizer, prompt), (model, prompt)
            assert answer.model == model
    with pytest.raises(openai.NotFoundError, match="lora:c"):
        client.completions.create(model=f"{APP}:c", prompt="x", max_tokens=2)


def test_adding_and_removing_an_adapter_restarts_nothing_and_releases_the_removed_copy(served: dict[str, Any]) -> None:
    from zerocopy_runtime import published_names

    url = served["url"]
    before = _info(url)
    assert before["adapters"] == [f"{APP}:a", f"{APP}:b"]
    copies = sorted(n for n in published_names() if n.startswith(f"{APP}."))
    assert [c.rpartition("-")[0] for c in copies] == [f"{APP}.a", f"{APP}.b"]  # one copy each on this node
    served["deploy"]("a")  # b removed: Serve's in-place update (reconfigure), not a new replica
    deadline = time.monotonic() + 60
    while (info := _info(url))["adapters"] != [f"{APP}:a"]:
        assert time.monotonic() < deadline, info["adapters"]
        time.sleep(0.2)
    assert (info["pid"], info["weights"], info["owner_pid"]) == (before["pid"], before["weights"], before["owner_pid"])
    assert sorted(n for n in published_names() if n.startswith(f"{APP}.")) == [c for c in copies if ".a-" in c]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=f"{APP}:b", prompt="x", max_tokens=2)
    served["deploy"]("a", "b")  # and back, in place again
    deadline = time.monotonic() + 60
    while (info := _info(url))["adapters"] != [f"{APP}:a", f"{APP}:b"]:
        assert time.monotonic() < deadline, info["adapters"]
        time.sleep(0.2)
    assert info["pid"] == before["pid"]


def test_an_adapter_that_cannot_be_read_is_named_and_the_others_keep_serving(served: dict[str, Any]) -> None:
    url = served["url"]
    pid = _info(url)["pid"]
    served["deploy"]("a", "missing")  # b removed, and a folder that does not exist
    deadline = time.monotonic() + 60
    while not (info := _info(url)).get("adapter_errors"):
        assert time.monotonic() < deadline, info
        time.sleep(0.2)
    assert list(info["adapter_errors"]) == ["missing"]
    assert info["adapter_errors"]["missing"].startswith("adapter missing (")
    assert (info["adapters"], info["pid"]) == ([f"{APP}:a"], pid)  # still serving, the same replica
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    answer = client.completions.create(model=f"{APP}:a", prompt="hello world", max_tokens=4, temperature=0)
    assert answer.choices[0].text == _greedy(served["merged"]["a"], served["tokenizer"], "hello world", 4)
    served["deploy"]("a", "b")
    while (info := _info(url))["adapters"] != [f"{APP}:a", f"{APP}:b"] or info.get("adapter_errors"):
        assert time.monotonic() < deadline + 60, info
        time.sleep(0.2)
