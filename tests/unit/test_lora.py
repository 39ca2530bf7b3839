"""LoRA adapters on a shared base model (no Ray): per-request adapters in one batch equal PEFT's merged models,
and an adapter that does not fit the model is refused by name."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.text_models import causal_lm_folder, lora_adapter_folder
from zerocopy_runtime import CheckpointError
from zerocopy_runtime.generation import BatchGenerator, SamplingParams
from zerocopy_runtime.lora import AdapterBank, read_adapter

pytest.importorskip("peft")

PROMPTS = ["hello world", "the weights are published once per node", "a chat", "tokens stream back"]


def _bank(model: Any, folders: dict[str, Path]) -> AdapterBank:
    bank = AdapterBank()
    bank.use(model)
    for name, folder in folders.items():
        bank.add(read_adapter(name, folder, load_file(folder / "adapter_model.safetensors"), model))
    return bank


def _generate(model: Any, tokenizer: Any, prompt: str, max_new: int = 10) -> list[int]:
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids) :].tolist()
    return [t for t in out if t != tokenizer.eos_token_id]


def test_mixed_adapter_batches_equal_each_adapter_merged_with_peft(tmp_path: Path) -> None:
    base, tokenizer = causal_lm_folder(tmp_path / "base")
    merged = {
        "a": lora_adapter_folder(base, tmp_path / "a", seed=1, targets=["q_proj", "v_proj"]),
        "b": lora_adapter_folder(base, tmp_path / "b", seed=2, targets=["o_proj", "down_proj"], rank=2),
    }
    bank = _bank(base, {"a": tmp_path / "a", "b": tmp_path / "b"})
    before = {name: p.clone() for name, p in base.state_dict().items()}
    generator = BatchGenerator(
        base, [tokenizer.eos_token_id], tokenizer.pad_token_id, tokenizer.decode, 8, 0.5, adapters=bank
    )
    asks = [(prompt, adapter) for prompt in PROMPTS for adapter in (None, "a", "b")]

    async def one(prompt: str, adapter: str | None) -> list[int]:
        params = SamplingParams(max_tokens=10, temperature=0, adapter=adapter)
        ids = tokenizer(prompt)["input_ids"]
        return [t.token_id async for t in generator.generate(ids, params) if t.token_id is not None]

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(one(*ask) for ask in asks)))

    got = asyncio.run(together())
    assert generator.largest_batch == 8  # rows of all three kinds shared forward passes
    for (prompt, adapter), tokens in zip(asks, got, strict=True):
        reference = base if adapter is None else merged[adapter]
        assert tokens == _generate(reference, tokenizer, prompt), (prompt, adapter)
    # The adapters changed answers, and never the base weights (they stay the shared, read-only copy).
    assert any(_generate(merged["a"], tokenizer, p) != _generate(base, tokenizer, p) for p in PROMPTS)
    assert all(torch.equal(before[n], p) for n, p in base.state_dict().items())
    generator.shutdown()


def test_an_adapter_for_another_base_model_is_refused_naming_it_and_the_mismatch(tmp_path: Path) -> None:
    base, _ = causal_lm_folder(tmp_path / "base")
    other, _ = causal_lm_folder(tmp_path / "other", hidden_size=48, num_attention_heads=4, intermediate_size=96)
    lora_adapter_folder(other, tmp_path / "wide", seed=3, targets=["q_proj"])
    with pytest.raises(CheckpointError, match=r"adapter wide: model\.layers\.0\.self_attn\.q_proj has A \[4, 48\]"):
        read_adapter("wide", tmp_path / "wide", load_file(tmp_path / "wide" / "adapter_model.safetensors"), base)
    (tmp_path / "wide" / "adapter_config.json").unlink()
    with pytest.raises(CheckpointError, match=r"adapter wide: .* has no adapter_config\.json"):
        read_adapter("wide", tmp_path / "wide", {}, base)
