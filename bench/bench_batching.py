"""The transformers engine's batching: our decode loop against transformers' own continuous batching.

Issue 20 asks whether transformers 5's `ContinuousBatchingManager` (paged KV cache, streaming, the engine
behind `transformers serve`) should replace `generation.BatchGenerator`. Both run here on the same model
(SmolLM2-135M-Instruct, float32, from examples/smollm2.py), in one process, one after the other, with the same
prompts: at 1, 4 and 16 concurrent requests (greedy, `--max-tokens` new tokens each), after one unmeasured warm-up
round per engine. Recorded: tokens/s over the round, time to first token (median and worst), and whether every
answer equals `generate(do_sample=False)` token for token. Writes bench/results/batching.md and batching.json.

    python examples/smollm2.py && python bench/bench_batching.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from zerocopy_runtime.generation import BatchGenerator, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "What is 12 times 12?",
    "Give me a synonym for happy.",
    "What does a bee make?",
    "Translate 'good morning' to Spanish.",
]


def prompts(tokenizer: Any, n: int) -> list[list[int]]:
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [tokenizer(rendered[i % len(rendered)]).input_ids for i in range(n)]


def ours_round(generator: BatchGenerator, batch: list[list[int]], max_tokens: int) -> dict[str, Any]:
    async def one(ids: list[int], started: float) -> tuple[list[int], float]:
        tokens, first = [], 0.0
        async for token in generator.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
            if not first:
                first = time.perf_counter() - started
            if token.token_id is not None:
                tokens.append(token.token_id)
        return tokens, first

    async def run() -> list[tuple[list[int], float]]:
        started = time.perf_counter()
        return await asyncio.gather(*(one(ids, started) for ids in batch))

    return _summary(asyncio.run(run()))


def theirs_round(manager: Any, batch: list[list[int]], max_tokens: int) -> dict[str, Any]:
    results: list[tuple[list[int], float]] = [([], 0.0)] * len(batch)
    started = time.perf_counter()
    ids = [manager.add_request(list(p), max_new_tokens=max_tokens, streaming=True) for p in batch]

    def follow(i: int) -> None:
        first, tokens = 0.0, []
        for output in manager.request_id_iter(ids[i]):
            if not first and output.generated_tokens:
                first = time.perf_counter() - started
            tokens = list(output.generated_tokens)
            if output.is_finished():
                break
        results[i] = (tokens, first)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(len(batch))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return _summary(results)


def _summary(results: list[tuple[list[int], float]]) -> dict[str, Any]:
    """Each request's tokens and its time to first token (seconds, from when the round's requests went in)."""
    return {"answers": [tokens for tokens, _ in results], "ttft": [first for _, first in results]}


def measure(run: Any, batch: list[list[int]], max_tokens: int, eos: int) -> dict[str, Any]:
    started = time.perf_counter()
    got = run(batch, max_tokens)
    wall = time.perf_counter() - started
    tokens = sum(len([t for t in a if t != eos]) for a in got["answers"])  # transformers streams the EOS too
    return {
        "clients": len(batch),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * statistics.median(got["ttft"]),
        "ttft_max_ms": 1000 * max(got["ttft"]),
        "answers": got["answers"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    if not (FOLDER / "config.json").is_file():
        raise SystemExit(f"{FOLDER} is missing: run `python examples/smollm2.py` first")
    torch.set_num_threads(os.cpu_count() or 1)
    levels = [int(n) for n in args.clients.split(",")]
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    reference_model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    batch = prompts(tokenizer, max(levels))
    with torch.inference_mode():
        reference = [
            reference_model.generate(
                torch.tensor([ids]), max_new_tokens=args.max_tokens, do_sample=False, pad_token_id=pad
            )[0, len(ids) :].tolist()
            for ids in batch[: len(QUESTIONS)]
        ]
    reference = [[t for t in answer if t != eos] for answer in reference]
    rows: list[dict[str, Any]] = []

    decode = lambda ids: str(tokenizer.decode(ids))  # noqa: E731
    ours = BatchGenerator(reference_model, [eos], pad, decode, max_batch_size=max(levels))
    ours_round(ours, batch[:2], args.max_tokens)  # warm-up
    for n in levels:
        rows.append({"engine": "ours"} | measure(lambda b, m: ours_round(ours, b, m), batch[:n], args.max_tokens, eos))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)

    theirs_model = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    config = GenerationConfig(max_new_tokens=args.max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    manager = theirs_model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        theirs_round(manager, batch[:2], args.max_tokens)  # warm-up: the paged cache and its first step
        for n in levels:
            run = lambda b, m: theirs_round(manager, b, m)  # noqa: E731
            rows.append({"engine": "transformers"} | measure(run, batch[:n], args.max_tokens, eos))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "answers"}), flush=True)
    finally:
        manager.stop()

    for row in rows:
        answers = [[t for t in a if t != eos] for a in row.pop("answers")]
        row["equal_to_generate"] = all(a == reference[i % len(QUESTIONS)] for i, a in enumerate(answers))
    meta = {"model": "SmolLM2-135M-Instruct, float32", "cores": os.cpu_count(), "max_tokens": args.max_tokens}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "batching.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = report(rows, meta, levels)
    (RESULTS / "batching.md").write_text(text)
    print(text)


def report(rows: list[dict[str, Any]], meta: dict[str, Any], levels: list[int]) -> str:
    by = {(r["engine"], r["clients"]): r for r in rows}
    lines = [
        "# Batched generation: our decode loop against transformers' ContinuousBatchingManager",
        "",
        f"{meta['model']}; {meta['cores']} cores; greedy, {meta['max_tokens']} new tokens per request; all requests "
        "of a level sent at once, one process; `python bench/bench_batching.py`.",
        "",
        "| clients | tokens/s ours / transformers | ratio | TTFT p50 ms ours / transformers | TTFT max ms | "
        "equal to generate |",
        "|---|---|---|---|---|---|",
    ]
    for n in levels:
        o, t = by.get(("ours", n)), by.get(("transformers", n))
        if not (o and t):
            continue
        lines.append(
            f"| {n} | {o['tokens_per_s']:.1f} / {t['tokens_per_s']:.1f} | {o['tokens_per_s'] / t['tokens_per_s']:.2f}x "
            f"| {o['ttft_p50_ms']:.0f} / {t['ttft_p50_ms']:.0f} | {o['ttft_max_ms']:.0f} / {t['ttft_max_ms']:.0f} "
            f"| {'yes' if o['equal_to_generate'] else 'NO'} / {'yes' if t['equal_to_generate'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
