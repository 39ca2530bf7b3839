"""The Serve application over real HTTP on 127.0.0.1: predictions, batching, scaling, bad input."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests.conftest import delete_model
from tests.models import MLP
from zerocopy_runtime.config import AppArgs
from zerocopy_runtime.serve import ZeroCopyDeployment, build_app

pytestmark = pytest.mark.integration


@pytest.fixture
def app(serve_port: int, tmp_path: Path) -> Iterator[Any]:
    """Deploys an MLP checkpoint under /mlp; deletes the app and releases its weights afterwards."""
    from ray import serve

    torch.manual_seed(0)
    model = MLP(16, 2).eval()
    checkpoint = tmp_path / "mlp.safetensors"
    save_file(model.state_dict(), checkpoint)

    def deploy(replicas: int = 1, architecture: dict | None = None, **overrides: Any) -> str:
        model = {
            "uri": f"file://{checkpoint}",
            "architecture": architecture or {"factory": "tests.models:MLP", "kwargs": {"width": 16, "depth": 2}},
        } | overrides.pop("model", {})
        args = {"name": "mlp", "model": model} | overrides
        options = {"num_replicas": replicas, "health_check_period_s": 1}
        bound = ZeroCopyDeployment.options(**options).bind(AppArgs.model_validate(args).model_dump())
        try:
            serve.run(bound, name="mlp", route_prefix="/mlp")
        except RuntimeError as exc:  # say why the replicas failed, not only that they did
            message = serve.status().applications["mlp"].deployments["ZeroCopyDeployment"].message
            raise RuntimeError(f"{exc}\n{message}") from exc
        return f"http://127.0.0.1:{serve_port}/mlp"

    deploy.model = model  # type: ignore[attr-defined]
    deploy.checkpoint = checkpoint  # type: ignore[attr-defined]
    yield deploy
    delete_model("mlp")


def _post(url: str, body: Any) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        text = err.read()
        try:
            return err.code, json.loads(text)
        except ValueError:  # Serve's proxy answers a dead replica's requests in plain text
            return err.code, text.decode(errors="replace")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_prediction_equals_the_plain_model(app: Any) -> None:
    url = app()
    x = torch.randn(16)
    status, body = _post(url, {"inputs": x.tolist()})
    assert status == 200
    with torch.no_grad():
        expected = app.model(x.unsqueeze(0))[0]
    assert torch.allclose(torch.tensor(body["outputs"]), expected, atol=1e-6)
    info = _get(url + "/-/info")
    assert info["shared"] is True
    assert info["tensor_count"] == len(list(app.model.parameters()))


def test_malformed_body_gets_400_and_the_replica_keeps_serving(app: Any) -> None:
    url = app()
    status, body = _post(url, {"wrong": 1})
    assert status == 400
    assert "inputs" in body["error"]
    status, body = _post(url, {"inputs": torch.randn(10).tolist()})  # the model takes 16 features
    assert status == 400
    assert "inputs [10]" in body["error"]
    status, _ = _post(url, {"inputs": torch.randn(16).tolist()})
    assert status == 200


def test_requests_are_batched(app: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = app(batching={"max_batch_size": 8, "batch_wait_timeout_s": 0.5})
    xs = [torch.randn(16) for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda x: _post(url, {"inputs": x.tolist()}), xs))
    with torch.no_grad():
        expected = app.model(torch.stack(xs))
    for (status, body), row in zip(results, expected, strict=True):
        assert status == 200
        assert torch.allclose(torch.tensor(body["outputs"]), row, atol=1e-6)
    assert _get(url + "/-/info")["largest_batch"] > 1


def test_scaling_up_attaches_new_replicas_without_republishing(app: Any) -> None:
    url = app(replicas=1)
    first = _get(url + "/-/info")
    app(replicas=3)
    seen: dict[int, dict] = {}
    for _ in range(200):
        info = _get(url + "/-/info")
        seen[info["pid"]] = info
        if len(seen) == 3:
            break
    assert len(seen) == 3
    for info in seen.values():
        assert info["object_ids"] == first["object_ids"]  # the same store objects
        assert info["owner_pid"] == first["owner_pid"]  # the same owner, never restarted
        assert info["shared"] is True


def test_checksum_mismatch_fails_the_deployment_with_the_fix(app: Any) -> None:
    from ray import serve

    with pytest.raises(RuntimeError, match="failed"):
        app(model={"uri": f"file://{app.checkpoint}", "sha256": "0" * 64})
    message = serve.status().applications["mlp"].deployments["ZeroCopyDeployment"].message
    assert "Checksum mismatch" in message
    assert "fix model.sha256" in message


def test_args_are_validated_before_deploying() -> None:
    with pytest.raises(ValueError, match="should match pattern"):
        build_app({"name": "m", "model": {"uri": "/x", "architecture": {"factory": "not a path"}}})
    with pytest.raises(ValueError, match="unsupported URI scheme"):
        build_app({"name": "m", "model": {"uri": "ftp://x", "architecture": {"factory": "a.b:c"}}})
    with pytest.raises(ValueError, match="Extra inputs"):
        build_app({"name": "m", "model": {"uri": "/x", "architecture": {"factory": "a.b:c"}}, "batchsize": 3})


def test_new_revision_publishes_once_and_releases_the_old_buffers(app: Any, tmp_path: Path) -> None:
    from zerocopy_runtime import published_names

    url = app(replicas=2)
    old = _get(url + "/-/info")
    torch.manual_seed(5)
    newer = MLP(16, 2).eval()
    save_file(newer.state_dict(), tmp_path / "mlp-v2.safetensors")
    app(replicas=2, model={"uri": f"file://{tmp_path / 'mlp-v2.safetensors'}"})
    x = torch.randn(16)
    status, body = _post(url, {"inputs": x.tolist()})
    assert status == 200
    with torch.no_grad():
        assert torch.allclose(torch.tensor(body["outputs"]), newer(x.unsqueeze(0))[0], atol=1e-6)
    new = _get(url + "/-/info")
    assert new["weights"] != old["weights"]
    assert [n for n in published_names() if n.startswith("mlp-")] == [new["weights"]] or _eventually(
        lambda: [n for n in published_names() if n.startswith("mlp-")] == [new["weights"]]
    )


def _eventually(condition: Any, timeout: float = 60) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done = condition()
        except urllib.error.URLError:  # a replica that is restarting answers 5xx for a moment
            done = False
        if done:
            return True
        time.sleep(0.5)
    return False


def test_killed_replica_restarts_and_reattaches_without_republishing(app: Any) -> None:
    import ray

    url = app(replicas=2)
    before = _get(url + "/-/info")
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "ZeroCopyDeployment" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=False)
    statuses = [_post(url, {"inputs": torch.randn(16).tolist()})[0] for _ in range(60)]
    failed = [s for s in statuses if s != 200]
    assert len(failed) <= 2, f"more requests lost than were in flight on the killed replica: {statuses}"
    assert _eventually(lambda: len({_get(url + "/-/info")["pid"] for _ in range(20)}) == 2)
    after = _get(url + "/-/info")
    assert after["object_ids"] == before["object_ids"]
    assert after["owner_pid"] == before["owner_pid"]


def test_user_handler_by_import_path(app: Any) -> None:
    url = app(handler="tests.models:argmax_handler")
    x = torch.randn(16)
    status, body = _post(url, {"features": x.tolist()})
    assert status == 200
    with torch.no_grad():
        assert body == {"label": int(app.model(x.unsqueeze(0)).argmax())}


def test_a_model_call_runs_off_the_event_loop(app: Any, tmp_path: Path) -> None:
    """While a handler is busy, the replica still answers /-/info (and Serve's health checks): the model runs in
    a worker thread, not on the replica's event loop."""
    url = app(handler="tests.models:gated_handler")
    started, gate = tmp_path / "started", tmp_path / "gate"
    answer: list[tuple[int, Any]] = []
    call = threading.Thread(target=lambda: answer.append(_post(url, {"started": str(started), "gate": str(gate)})))
    call.start()
    assert _eventually(started.exists, timeout=30), "the handler never started"
    info = _get(url + "/-/info")  # would wait for the handler if it ran on the event loop
    assert info["name"] == "mlp"
    assert call.is_alive()  # the handler is still waiting for the gate
    gate.touch()
    call.join(timeout=30)
    assert answer == [(200, {"done": True})]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"handler": "tests.models:no_such_handler"}, "cannot be imported"),
        ({"architecture": {"factory": "tests.models:MLP", "kwargs": {"width": 8, "depth": 2}}}, "net.0.weight"),
    ],
    ids=["unknown-handler", "architecture-mismatch"],
)
def test_bad_deployment_names_the_problem(app: Any, overrides: dict, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        app(**overrides)


def test_store_too_small_fails_the_deployment_with_sizes_and_publishes_nothing(app: Any, tmp_path: Path) -> None:
    from ray import serve

    from zerocopy_runtime import published_names

    # A sparse 400 MiB checkpoint: the room check must refuse it before reading a byte.
    checkpoint = _sparse_safetensors(tmp_path / "big.safetensors", "weights.0", 100 * 2**20)
    with pytest.raises(RuntimeError, match="failed"):
        app(
            model={"uri": str(checkpoint)},
            architecture={"factory": "tests.models:Sized", "kwargs": {"mib": 400, "tensors": 1}},
        )
    message = serve.status().applications["mlp"].deployments["ZeroCopyDeployment"].message
    assert "400.0 MiB of object store memory" in message
    assert "objectStoreMemory" in message
    assert not [n for n in published_names() if n.startswith("mlp-")]


def _sparse_safetensors(path: Path, key: str, floats: int) -> Path:
    header = json.dumps({key: {"dtype": "F32", "shape": [floats], "data_offsets": [0, 4 * floats]}}).encode()
    header += b" " * (-len(header) % 8)
    with path.open("wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(8 + len(header) + 4 * floats)
    return path


def test_metrics_count_requests_and_errors_by_handler(app: Any) -> None:
    import ray

    url = app(name="mlp-metrics")
    for body in ({"inputs": torch.randn(16).tolist()}, {"inputs": torch.randn(16).tolist()}, {"wrong": 1}):
        _post(url, body)
    info = _get(url + "/-/info")
    port = next(n["MetricsExportPort"] for n in ray.nodes() if n["Alive"])
    labels = {"model": "mlp-metrics", "handler": "tensor"}

    def exported() -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            "requests": _metric(text, "ray_zerocopy_requests_total", labels),
            "bad": _metric(text, "ray_zerocopy_request_errors_total", {**labels, "reason": "bad_request"}),
            "shared": _metric(text, "ray_zerocopy_shared_bytes", labels),
            "attach": _metric(text, "ray_zerocopy_attach_seconds", labels),
        }

    # Ray exports metrics every few seconds: wait for the counts to arrive.
    assert _eventually(lambda: exported()["requests"] == 3 and exported()["bad"] == 1)
    final = exported()
    assert final["shared"] == info["bytes_shared"]
    assert final["attach"] == pytest.approx(info["attach_seconds"])


def _metric(text: str, name: str, labels: dict[str, str]) -> float:
    """The sum of the samples of `name` whose labels include `labels`, in Prometheus text format."""
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if not series.startswith(name + "{"):
            continue
        found = dict(pair.split("=", 1) for pair in series[len(name) + 1 : -1].split(","))
        if all(found.get(key) == f'"{wanted}"' for key, wanted in labels.items()):
            total += float(value)
    return total


def test_transformers_model_is_built_from_its_config_json(app: Any, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(tmp_path / "tiny-gpt2")  # model.safetensors and config.json; lm_head tied to wte
    url = app(model={"uri": str(tmp_path / "tiny-gpt2")}, architecture={"transformers": "GPT2LMHeadModel"})
    ids = [3, 14, 15, 9, 2]
    status, body = _post(url, {"inputs": ids, "dtype": "int64"})
    assert status == 200, body
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert body["shape"] == [len(ids), 64]
    assert torch.allclose(torch.tensor(body["outputs"]), expected, atol=1e-5)
    info = _get(url + "/-/info")
    assert info["shared"] is True
    tied_once = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    assert info["bytes_shared"] == sum(tied_once.values())  # lm_head shares the token embedding: stored once


def _concurrently(url: str, bodies: list[dict]) -> list[tuple[int, Any]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: _post(url, body), bodies))


def test_served_causal_lm_equals_the_model_run_directly_alone_and_batched(app: Any, tmp_path: Path) -> None:
    """The README's request forms on a Llama model: one sequence per request, the replica batching them."""
    from tests.unit.test_tensor_codec import tiny_llama

    model = tiny_llama()
    model.save_pretrained(tmp_path / "llama")
    url = app(
        model={"uri": str(tmp_path / "llama")},
        architecture={"transformers": "LlamaForCausalLM"},
        batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.5},
    )
    prompts = [[1, 5, 9, 13, 2, 7], [3, 4, 5, 6, 7, 8], [9, 9, 1, 2, 3, 4], [7, 2, 5]]
    alone = _post(url, {"inputs": prompts[0]})
    together = _concurrently(url, [{"inputs": p} for p in prompts])
    padded_ids, padded_mask = [0, 0, *prompts[3]], [0, 0, 1, 1, 1]  # left padding, as for generation
    masked = _post(url, {"inputs": {"input_ids": padded_ids, "attention_mask": padded_mask}, "dtype": "int64"})
    with torch.no_grad():
        expected = [model(torch.tensor([p])).logits[0] for p in prompts]
        expected_masked = model(input_ids=torch.tensor([padded_ids]), attention_mask=torch.tensor([padded_mask]))
    assert alone[0] == 200, alone
    assert torch.allclose(torch.tensor(alone[1]["outputs"]), expected[0], atol=1e-5)
    for (status, body), want in zip(together, expected, strict=True):
        assert status == 200, body
        assert torch.allclose(torch.tensor(body["outputs"]), want, atol=1e-5)
    assert masked[0] == 200, masked
    assert torch.allclose(torch.tensor(masked[1]["outputs"]), expected_masked.logits[0], atol=1e-5)
    assert _get(url + "/-/info")["largest_batch"] > 1
    status, body = _post(url, {"inputs": [prompts[0]], "dtype": "int64"})  # a batch dimension of the client's own
    assert status == 400
    assert "without a batch dimension" in body["error"]


def test_served_encoder_with_padding_equals_the_model_run_directly(app: Any, tmp_path: Path) -> None:
    from tests.unit.test_tensor_codec import tiny_bert

    model = tiny_bert()
    model.save_pretrained(tmp_path / "bert")
    url = app(
        model={"uri": str(tmp_path / "bert")},
        architecture={"transformers": "BertModel"},
        batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.5},
    )
    sequences = [[2, 7, 11, 5, 9, 3], [2, 8, 4, 0, 0, 0], [2, 6, 6, 6, 0, 0]]
    masks = [[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    answers = _concurrently(
        url, [{"inputs": {"input_ids": s, "attention_mask": m}} for s, m in zip(sequences, masks, strict=True)]
    )
    with torch.no_grad():
        for (status, body), ids, mask in zip(answers, sequences, masks, strict=True):
            assert status == 200, body
            want = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask])).last_hidden_state[0]
            assert torch.allclose(torch.tensor(body["outputs"]), want, atol=1e-5)
        real = sum(masks[1])
        alone = model(input_ids=torch.tensor([sequences[1][:real]])).last_hidden_state[0]
    # With its mask, a padded sequence's real tokens read exactly as the unpadded sequence would.
    assert torch.allclose(torch.tensor(answers[1][1]["outputs"])[:real], alone, atol=1e-4)
    assert _get(url + "/-/info")["largest_batch"] > 1
