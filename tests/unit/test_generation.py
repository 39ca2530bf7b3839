"""The batch generator on its own (no Ray): batched greedy rows equal `generate`, rows join a running batch,
and tasks fit model kinds."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.text_models import causal_lm_folder, seq2seq_folder
from zerocopy_runtime import CheckpointError
from zerocopy_runtime.generation import BatchGenerator, SamplingParams
from zerocopy_runtime.text import GenerationEngine

PROMPTS = ["hello world", "the weights are published once per node", "a chat", "tokens stream back"]


def _batched(model: Any, tokenizer: Any) -> tuple[list[list[int]], int]:
    generator = BatchGenerator(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, tokenizer.decode, 4, 0.5)

    async def one(prompt: str) -> list[int]:
        ids = tokenizer(prompt)["input_ids"]
        params = SamplingParams(max_tokens=10, temperature=0)
        return [t.token_id async for t in generator.generate(ids, params) if t.token_id is not None]

    async def all_at_once() -> list[list[int]]:
        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))

    return asyncio.run(all_at_once()), generator.largest_batch


@pytest.mark.parametrize("make", [causal_lm_folder, seq2seq_folder], ids=["llama", "t5"])
def test_batched_greedy_rows_equal_generate_one_by_one(make: Any, tmp_path: Path) -> None:
    model, tokenizer = make(tmp_path)
    got, largest = _batched(model, tokenizer)
    assert largest == len(PROMPTS)  # the prompts (of different lengths) really shared the forward passes
    for prompt, tokens in zip(PROMPTS, got, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0].tolist()
        answer = out[1:] if model.config.is_encoder_decoder else out[len(ids) :]
        assert tokens == [t for t in answer if t != tokenizer.eos_token_id]
    assert len({tuple(t) for t in got}) > 1  # the rows are not all the same answer


def test_requests_join_a_running_batch_between_decode_steps_and_still_equal_generate(tmp_path: Path) -> None:
    model, tokenizer = causal_lm_folder(tmp_path)
    generator = BatchGenerator(model, [tokenizer.eos_token_id], tokenizer.pad_token_id, tokenizer.decode, 4, 0.0)
    asks = [("hello", 30), ("the weights are published once per node and every", 10), ("a", 12)]

    async def one(prompt: str, max_tokens: int, running: asyncio.Event | None = None) -> list[int]:
        tokens: list[int] = []
        async for token in generator.generate(tokenizer(prompt)["input_ids"], SamplingParams(max_tokens, 0)):
            tokens += [token.token_id] if token.token_id is not None else []
            if running is not None and len(tokens) == 3:
                running.set()
        return tokens

    async def late_joiners() -> list[list[int]]:
        running = asyncio.Event()
        first = asyncio.create_task(one(*asks[0], running))
        await running.wait()  # the first request is mid-generation when the others arrive
        rest = [asyncio.create_task(one(*ask)) for ask in asks[1:]]
        return [await first, *[await r for r in rest]]

    got = asyncio.run(late_joiners())
    for (prompt, max_tokens), tokens in zip(asks, got, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)[0, len(ids) :]
        assert tokens == [t for t in out.tolist() if t != tokenizer.eos_token_id]
    assert generator.joined == 2
    assert generator.largest_batch == 3
    assert generator.forward_passes < sum(n for _, n in asks)  # the joiners rode the first request's steps


def test_a_task_that_does_not_fit_the_model_is_a_start_up_error(tmp_path: Path) -> None:
    t5, _ = seq2seq_folder(tmp_path / "t5")
    llama, _ = causal_lm_folder(tmp_path / "llama")
    with pytest.raises(CheckpointError, match="encoder-decoder model: serve it with task: text2text-generation"):
        GenerationEngine("text-generation", t5, tmp_path / "t5", "t5", (1, 0.0))
    with pytest.raises(CheckpointError, match="not an encoder-decoder model: serve it with task: text-generation"):
        GenerationEngine("text2text-generation", llama, tmp_path / "llama", "llama", (1, 0.0))
