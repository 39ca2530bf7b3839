"""Text tasks over real HTTP with the real `openai` client: chat, completions, streaming, embeddings, errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import delete_model
from tests.text_models import causal_lm_folder, encoder_folder, seq2seq_folder
from zerocopy_runtime.config import AppArgs
from zerocopy_runtime.serve import ZeroCopyDeployment

pytestmark = pytest.mark.integration

openai = pytest.importorskip("openai")


def _deploy(name: str, folder: Path, task: str, architecture: str, port: int) -> str:
    from ray import serve

    args = AppArgs.model_validate(
        {
            "name": name,
            "model": {"uri": str(folder), "architecture": {"transformers": architecture}},
            "task": task,
            "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.3},
        }
    )
    serve.run(ZeroCopyDeployment.options(num_replicas=1).bind(args.model_dump()), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture(scope="module")
def chat(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    folder = tmp_path_factory.mktemp("llama")
    model, tokenizer = causal_lm_folder(folder)
    url = _deploy("chat", folder, "text-generation", "LlamaForCausalLM", serve_port)
    yield url, model, tokenizer
    delete_model("chat")


@pytest.fixture(scope="module")
def encoder(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    folder = tmp_path_factory.mktemp("bert")
    model, tokenizer = encoder_folder(folder)
    url = _deploy("enc", folder, "embeddings", "BertModel", serve_port)
    yield url, model, tokenizer
    delete_model("enc")


@pytest.fixture(scope="module")
def text2text(serve_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any, Any]]:
    folder = tmp_path_factory.mktemp("t5")
    model, tokenizer = seq2seq_folder(folder)
    url = _deploy("t5", folder, "text2text-generation", "T5ForConditionalGeneration", serve_port)
    yield url, model, tokenizer
    delete_model("t5")


def _greedy(model: Any, ids: list[int], max_new: int, eos: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos, pad_token_id=eos
        )
    return [t for t in out[0, len(ids) :].tolist() if t != eos]


def _client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/-/info", timeout=60) as response:
        info: dict[str, Any] = json.loads(response.read())
    return info


MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]


def test_chat_completion_greedy_equals_transformers_generate(chat: tuple[str, Any, Any]) -> None:
    url, model, tokenizer = chat
    reply = _client(url).chat.completions.create(model="chat", messages=MESSAGES, max_tokens=12, temperature=0)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    expected = _greedy(model, prompt, 12, tokenizer.eos_token_id)
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.choices[0].finish_reason == ("length" if len(expected) == 12 else "stop")
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(expected))
    assert reply.model == "chat"
    assert [m.id for m in _client(url).models.list().data] == ["chat"]


def test_streamed_chat_is_the_same_text_token_by_token(chat: tuple[str, Any, Any]) -> None:
    url, _, _ = chat
    client = _client(url)
    whole = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert len(chunks) > 3  # role, then a chunk per token (or so), then the finish
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_concurrent_completions_share_forward_passes_and_equal_generate(chat: tuple[str, Any, Any]) -> None:
    url, model, tokenizer = chat
    prompts = ["hello world", "the weights are published", "a chat model answers", "tokens"]
    client = _client(url)
    before = _info(url)["forward_passes"]
    with ThreadPoolExecutor(len(prompts)) as pool:
        replies = list(
            pool.map(lambda p: client.completions.create(model="chat", prompt=p, max_tokens=8, temperature=0), prompts)
        )
    info = _info(url)
    for prompt, reply in zip(prompts, replies, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        assert reply.choices[0].text == tokenizer.decode(
            _greedy(model, ids, 8, tokenizer.eos_token_id), skip_special_tokens=True
        )
    assert info["largest_batch"] > 1
    assert info["forward_passes"] - before < len(prompts) * 8  # fewer passes than one per token per request


def test_sampling_is_reproducible_with_a_seed(chat: tuple[str, Any, Any]) -> None:
    url, _, _ = chat
    client = _client(url)

    def ask(seed: int) -> str:
        reply = client.completions.create(model="chat", prompt="hello", max_tokens=8, temperature=1.0, seed=seed)
        return str(reply.choices[0].text)

    assert ask(7) == ask(7)
    assert len({ask(s) for s in range(5)}) > 1


def _post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_errors_come_in_openais_shape(chat: tuple[str, Any, Any]) -> None:
    url, _, _ = chat
    status, body = _post(url + "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1000})
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 96" in body["error"]["message"]
    status, body = _post(url + "/v1/chat/completions", {"messages": MESSAGES, "temprature": 0})
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    assert "temprature" in body["error"]["message"]
    status, body = _post(url + "/v1/embeddings", {"input": "x"})
    assert status == 404
    with pytest.raises(openai.BadRequestError, match="messages"):
        _client(url).chat.completions.create(model="chat", messages=[], max_tokens=3)


def test_a_client_that_disconnects_stops_its_generation(chat: tuple[str, Any, Any]) -> None:
    url, _, _ = chat
    before = _info(url)["forward_passes"]
    body = {"prompt": "hello", "max_tokens": 80, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        url + "/v1/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        first = response.readline()  # the first token arrived: the generation is running
        assert first.startswith(b"data: ")
    # The next request runs only once the abandoned row has left the batch loop.
    _client(url).completions.create(model="chat", prompt="hello", max_tokens=2, temperature=0)
    assert _info(url)["forward_passes"] - before < 80


def test_embeddings_are_the_models_pooled_and_normalized_states(encoder: tuple[str, Any, Any]) -> None:
    url, model, tokenizer = encoder
    texts = ["hello world", "a chat model answers a message with its history"]
    reply = _client(url).embeddings.create(model="enc", input=texts)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    got = torch.tensor([d.embedding for d in reply.data])
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert reply.usage.prompt_tokens == int(batch["attention_mask"].sum())


def test_an_encoder_decoder_answers_chats_batched_as_its_own_generate_does(text2text: tuple[str, Any, Any]) -> None:
    url, model, tokenizer = text2text
    chats = [MESSAGES, [{"role": "user", "content": "the weights are published once per node"}], MESSAGES[1:]]
    client = _client(url)
    with ThreadPoolExecutor(len(chats)) as pool:
        ask = lambda m: client.chat.completions.create(model="t5", messages=m, max_tokens=10, temperature=0)  # noqa: E731
        replies = list(pool.map(ask, chats))
    for messages, reply in zip(chats, replies, strict=True):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
        expected = [t for t in out[0, 1:].tolist() if t != tokenizer.eos_token_id]  # after the decoder start token
        assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
        assert reply.usage.completion_tokens == len(expected)
    assert _info(url)["largest_batch"] > 1


@pytest.fixture
def router(
    chat: tuple[str, Any, Any], encoder: tuple[str, Any, Any], serve_port: int
) -> Iterator[tuple[str, str, str]]:
    """The OpenAI router at `/` in front of `chat` and `enc`, and of `late`, a model whose application does
    not run: (router URL, chat URL, encoder URL)."""
    from ray import serve

    from zerocopy_runtime.contract import ROUTER_APP
    from zerocopy_runtime.router import build_router

    models = [
        {"name": "chat", "application": "chat", "task": "text-generation"},
        {"name": "enc", "application": "enc", "task": "embeddings"},
        {"name": "late", "application": "late", "task": "text-generation"},
    ]
    serve.run(build_router({"models": models}), name=ROUTER_APP, route_prefix="/")
    yield f"http://127.0.0.1:{serve_port}", chat[0], encoder[0]
    serve.delete(ROUTER_APP)


def test_one_endpoint_routes_by_model_to_every_model_streaming_included(router: tuple[str, str, str]) -> None:
    base, chat_url, enc_url = router
    client = _client(base)
    assert sorted(m.id for m in client.models.list().data) == ["chat", "enc"]  # `late` is not ready: not listed
    ask = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    routed = client.chat.completions.create(model="chat", **ask)
    direct = _client(chat_url).chat.completions.create(model="chat", **ask)
    assert routed.choices[0].message.content == direct.choices[0].message.content
    assert routed.model == "chat"
    streamed = client.chat.completions.create(model="chat", stream=True, **ask)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == direct.choices[0].message.content
    completion = client.completions.create(model="chat", prompt="hello", max_tokens=4, temperature=0)
    assert (
        completion.choices[0].text
        == _client(chat_url)
        .completions.create(model="chat", prompt="hello", max_tokens=4, temperature=0)
        .choices[0]
        .text
    )
    vectors = client.embeddings.create(model="enc", input=["hello world"]).data[0].embedding
    assert vectors == _client(enc_url).embeddings.create(model="enc", input=["hello world"]).data[0].embedding


def test_the_endpoint_names_the_models_that_do_when_a_request_cannot_be_routed(router: tuple[str, str, str]) -> None:
    base, _, _ = router
    status, body = _post(base + "/v1/chat/completions", {"model": "nope", "messages": MESSAGES})
    assert (status, body["error"]["code"]) == (404, "model_not_found")
    assert "chat, late" in body["error"]["message"]
    status, body = _post(base + "/v1/embeddings", {"model": "chat", "input": "x"})
    assert status == 400
    assert (
        "chat is a text-generation model and does not serve /v1/embeddings; models that do: enc"
        in body["error"]["message"]
    )
    status, body = _post(base + "/v1/chat/completions", {"model": "late", "messages": MESSAGES})
    assert (status, body["error"]["code"]) == (503, "model_not_ready")
    status, body = _post(base + "/v1/chat/completions", {"messages": MESSAGES})
    assert (status, body["error"]["param"]) == (400, "model")
    status, body = _post(base + "/v1/chat/completions", {"model": "chat", "messages": MESSAGES, "max_tokens": 1000})
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")  # the model's own error, passed on
