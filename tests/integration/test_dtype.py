"""model.dtype: a checkpoint cast once, as its owner publishes it, and served as transformers would serve it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zerocopy_runtime as zc
from tests.helpers import same_bits
from tests.models import TinyTransformer
from tests.text_models import causal_lm_folder
from zerocopy_runtime._architecture import architecture_factory
from zerocopy_runtime.config import Architecture

pytestmark = pytest.mark.integration


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "f32": torch.randn(64, 33),
        "bf16": torch.randn(17).to(torch.bfloat16),
        "f16": torch.randn(3, 5).to(torch.float16),
        "ids": torch.arange(7),
        "mask": torch.tensor([True, False]),
        "empty": torch.empty(0, 4),
    }


@pytest.mark.parametrize("target", [torch.bfloat16, torch.float32, torch.float16])
def test_a_safetensors_checkpoint_is_cast_once_by_an_owner_without_torch(
    published: list, tmp_path: Path, target: torch.dtype
) -> None:
    state = _state()
    save_file(state, tmp_path / "m.safetensors")
    handle = zc.publish(tmp_path / "m.safetensors", dtype=str(target).removeprefix("torch."))
    published.append(handle.name)
    attached = zc.attach(handle)
    for name, tensor in state.items():
        expected = tensor.to(target) if tensor.is_floating_point() else tensor
        assert attached[name].dtype == expected.dtype, name
        assert same_bits(attached[name], expected), name
    assert handle.nbytes == sum(t.to(target).nbytes if t.is_floating_point() else t.nbytes for t in state.values())
    assert not _maps_torch(handle.owner_pid)


def test_a_torch_state_dict_is_cast_once_and_keeps_its_ties(published: list, tmp_path: Path) -> None:
    """A real `model.state_dict()` saved by torch: its tied weights come back as two tensors on one storage, which
    is cast once (and the architecture, built in bfloat16, attaches to it); float8 is served as stored."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    state = model.state_dict() | {"scale": torch.randn(4).to(torch.float8_e4m3fn)}
    torch.save(state, tmp_path / "m.pt")
    handle = zc.publish(tmp_path / "m.pt", dtype="bfloat16")
    published.append(handle.name)
    attached = zc.attach(handle)
    embed, head = attached["embed.weight"], attached["lm_head.weight"]
    assert embed.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()  # one cast copy for both
    assert same_bits(embed, model.embed.weight.detach().to(torch.bfloat16))
    assert same_bits(attached["scale"], state["scale"])
    unique = {t.untyped_storage().data_ptr(): t for t in state.values()}.values()
    assert handle.nbytes == sum(
        t.to(torch.bfloat16).nbytes if t.dtype in (torch.float32, torch.float16) else t.nbytes for t in unique
    )
    del state["scale"]
    torch.save(state, tmp_path / "tied.pt")
    tied = zc.publish(tmp_path / "tied.pt", dtype="bfloat16")
    published.append(tied.name)
    rebuilt = zc.attach(tied, factory=lambda: TinyTransformer().to(torch.bfloat16)).eval()  # strict: no name left
    assert rebuilt.lm_head.weight is rebuilt.embed.weight


def test_a_dtype_for_an_in_memory_model_or_a_dtype_that_is_not_floating_is_refused(ray_session: None) -> None:
    with pytest.raises(zc.ZeroCopyError, match=r"cast an in-memory model with \.to\(\) first"):
        zc.publish({"w": torch.ones(2)}, dtype="bfloat16")
    with pytest.raises(zc.ZeroCopyError, match="dtype 'int8' is not one of bfloat16, float16, float32, float64"):
        zc.publish({"w": torch.ones(2)}, dtype="int8")


def test_a_bfloat16_checkpoint_served_in_float32_answers_as_transformers_does(published: list, tmp_path: Path) -> None:
    """The user's alternative: from_pretrained(dtype=torch.float32) in every replica, each with its own cast copy."""
    from transformers import LlamaForCausalLM

    model, tokenizer = causal_lm_folder(tmp_path)
    model.to(torch.bfloat16).save_pretrained(tmp_path)  # a hub checkpoint in bfloat16
    handle = zc.publish(tmp_path, dtype="float32")
    published.append(handle.name)
    factory = architecture_factory(Architecture(transformers="LlamaForCausalLM"), tmp_path, "float32")
    ours = zc.attach(handle, factory=factory).eval()
    theirs = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert {p.dtype for p in ours.parameters()} == {torch.float32}
    prompt = tokenizer("the weights live once per node", return_tensors="pt").input_ids
    with torch.no_grad():
        assert same_bits(ours(prompt).logits, theirs(prompt).logits)
        greedy = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        assert torch.equal(ours.generate(prompt, **greedy), theirs.generate(prompt, **greedy))
