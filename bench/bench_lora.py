"""N LoRA adapters on one base model: ours against N merged replicas, and against one replica reloading adapters.

Three ways to serve N adapters (1, 4, 16) of SmolLM2-135M-Instruct (float32, examples/smollm2.py), one after
the other in one process, on the same adapters (PEFT LoRA, rank 8 on q_proj and v_proj, random) and the same
mixed load (16 requests at once, adapter i % N, greedy, `--max-tokens` new tokens each):

    ours      one base model and an AdapterBank holding the N adapters; one batch generator serves every
              request, each row with its own adapter (what a replica of ours does on the node's shared copy)
    merged    N models, each the base with its adapter merged in (what N plain replicas hold), each with
              its own batch generator; every request goes to its adapter's model
    reload    one model; requests grouped by adapter, and before each group the adapter is read from disk
              and merged into the weights (the pristine weights restored first): one replica switching

Recorded per setup: weight bytes held (parameters plus adapters), tokens/s over the mixed load, and time to
first token for a cold adapter (one not loaded yet: read, attach or merge, then its first token). Every
answer is checked against the merged model's for the same adapter (greedy, token for token).
Writes bench/results/lora.md and lora.json.

    python examples/smollm2.py && python bench/bench_lora.py
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from zerocopy_runtime.generation import BatchGenerator, SamplingParams
from zerocopy_runtime.lora import AdapterBank, LoraWeights, read_adapter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
CACHE = ROOT / "bench" / ".cache" / "lora"
REQUESTS = 16
QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "Write a haiku about the sea.",
             "What is 12 times 12?"]  # fmt: skip


def make_adapters(base: Any, count: int) -> list[Path]:
    """`count` PEFT adapters for `base`, saved once in bench/.cache/lora."""
    from peft import LoraConfig, get_peft_model

    folders = []
    for i in range(count):
        folder = CACHE / f"adapter-{i}"
        if not (folder / "adapter_model.safetensors").exists():
            torch.manual_seed(100 + i)
            config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            peft_model = get_peft_model(copy.deepcopy(base), config)
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if "lora_" in name:
                        parameter.mul_(0.05)  # an adapter that changes answers without wrecking them
            peft_model.save_pretrained(folder)
        folders.append(folder)
    return folders


def weight_bytes(model: Any) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def load_lora(name: str, folder: Path, model: Any) -> LoraWeights:
    return read_adapter(name, folder, load_file(folder / "adapter_model.safetensors"), model)


def merge_into(model: Any, adapter: LoraWeights) -> None:
    """The adapter merged into `model`'s weights: W += scale * B @ A (PEFT's merge)."""
    with torch.no_grad():
        for path, (a, b) in adapter.modules.items():
            model.get_submodule(path).weight.add_(b @ a, alpha=adapter.scale)


def prompts(tokenizer: Any) -> list[list[int]]:
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q in QUESTIONS
    ]
    return [tokenizer(rendered[i % len(rendered)]).input_ids for i in range(REQUESTS)]


def generator_for(model: Any, tokenizer: Any, adapters: AdapterBank | None = None) -> BatchGenerator:
    eos = [tokenizer.eos_token_id]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return BatchGenerator(model, eos, pad, tokenizer.decode, 8, 0.02, adapters)


async def _one(generator: BatchGenerator, ids: list[int], params: SamplingParams) -> tuple[list[int], float]:
    started, first, tokens = time.perf_counter(), 0.0, []
    async for token in generator.generate(ids, params):
        first = first or time.perf_counter() - started
        if token.token_id is not None:
            tokens.append(token.token_id)
    return tokens, first


def run_all(asks: list[tuple[BatchGenerator, list[int], SamplingParams]]) -> tuple[list[list[int]], float]:
    """Every request at once; their tokens and the wall time."""

    async def together() -> list[tuple[list[int], float]]:
        return list(await asyncio.gather(*(_one(g, ids, p) for g, ids, p in asks)))

    started = time.perf_counter()
    done = asyncio.run(together())
    return [tokens for tokens, _ in done], time.perf_counter() - started


def first_token(generator: BatchGenerator, ids: list[int], params: SamplingParams) -> float:
    async def go() -> float:
        async for _ in generator.generate(ids, SamplingParams(1, 0.0, adapter=params.adapter)):
            break
        return 0.0

    started = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - started


def measure(n: int, base: Any, tokenizer: Any, folders: list[Path], max_tokens: int) -> dict[str, Any]:
    batch = prompts(tokenizer)
    which = [i % n for i in range(REQUESTS)]
    names = [f"a{i}" for i in range(n)]
    rows: dict[str, Any] = {"adapters": n}

    # ours: one base, every adapter in one bank, one generator.
    model = copy.deepcopy(base)
    bank = AdapterBank()
    bank.use(model)
    for name, folder in zip(names, folders, strict=False):
        bank.add(load_lora(name, folder, model))
    ours = generator_for(model, tokenizer, bank)
    asks = [(ours, ids, SamplingParams(max_tokens, 0.0, adapter=names[w])) for ids, w in zip(batch, which, strict=True)]
    ours_tokens, seconds = run_all(asks)
    started = time.perf_counter()
    bank.add(load_lora("cold", folders[n % len(folders)], model))
    cold = time.perf_counter() - started + first_token(ours, batch[0], SamplingParams(1, 0.0, adapter="cold"))
    held = weight_bytes(model) + sum(a.nbytes for a in bank.adapters.values() if a.name != "cold")
    rows["ours"] = {"weight_bytes": held, "tokens_per_s": sum(map(len, ours_tokens)) / seconds, "cold_ttft_s": cold}
    ours.shutdown()
    del model, bank, ours

    # merged: N full models, one per adapter.
    merged = []
    for name, folder in zip(names, folders, strict=False):
        copy_ = copy.deepcopy(base)
        merge_into(copy_, load_lora(name, folder, copy_))
        merged.append((copy_, generator_for(copy_, tokenizer)))
    asks = [(merged[w][1], ids, SamplingParams(max_tokens, 0.0)) for ids, w in zip(batch, which, strict=True)]
    merged_tokens, seconds = run_all(asks)
    started = time.perf_counter()
    fresh = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    merge_into(fresh, load_lora("cold", folders[n % len(folders)], fresh))
    fresh_generator = generator_for(fresh, tokenizer)
    cold = time.perf_counter() - started + first_token(fresh_generator, batch[0], SamplingParams(1, 0.0))
    fresh_generator.shutdown()
    rows["merged"] = {
        "weight_bytes": sum(weight_bytes(m) for m, _ in merged),
        "tokens_per_s": sum(map(len, merged_tokens)) / seconds,
        "cold_ttft_s": cold,
    }
    for _, generator in merged:
        generator.shutdown()
    del merged, fresh

    # reload: one model, an adapter merged in before each group of its requests.
    model = copy.deepcopy(base)
    targets = ("q_proj.weight", "v_proj.weight")
    pristine = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(targets)}
    generator = generator_for(model, tokenizer)

    def switch(folder: Path) -> None:
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in pristine:
                    parameter.copy_(pristine[name])
        merge_into(model, load_lora("current", folder, model))

    reload_tokens: list[list[int]] = [[] for _ in batch]
    started = time.perf_counter()
    for w in range(n):
        switch(folders[w])
        members = [i for i, x in enumerate(which) if x == w]
        got, _ = run_all([(generator, batch[i], SamplingParams(max_tokens, 0.0)) for i in members])
        for i, tokens in zip(members, got, strict=True):
            reload_tokens[i] = tokens
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    switch(folders[n % len(folders)])
    cold = time.perf_counter() - started + first_token(generator, batch[0], SamplingParams(1, 0.0))
    held = weight_bytes(model) + sum(t.numel() * t.element_size() for t in pristine.values())
    rows["reload"] = {"weight_bytes": held, "tokens_per_s": sum(map(len, reload_tokens)) / seconds, "cold_ttft_s": cold}
    generator.shutdown()

    rows["answers_equal"] = ours_tokens == merged_tokens
    rows["reload_equal"] = reload_tokens == merged_tokens
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    if not (FOLDER / "config.json").exists():
        raise SystemExit(f"{FOLDER} is missing: run python examples/smollm2.py first")
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(FOLDER)
    base = AutoModelForCausalLM.from_pretrained(FOLDER, dtype=torch.float32).eval()
    counts = [int(c) for c in args.counts.split(",")]
    folders = make_adapters(base, max(counts) + 1)
    results = [measure(n, base, tokenizer, folders, args.max_tokens) for n in counts]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lora.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# LoRA adapters on one base: ours against N merged replicas and one replica reloading adapters",
        "",
        f"`python bench/bench_lora.py` on 2 cores: SmolLM2-135M-Instruct float32, rank-8 adapters on q_proj and "
        f"v_proj, {REQUESTS} requests at once (adapter i % N, greedy, {args.max_tokens} new tokens each), one "
        "process, setups one after the other. Weight bytes: parameters plus adapters held. Cold TTFT: a new "
        "adapter's read (and attach or merge) plus its first token.",
        "",
        "| adapters | setup | weight MiB | ours / it | tokens/s | ours / it | cold TTFT s | ours / it "
        "| answers equal merged |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results:
        ours = row["ours"]
        for setup in ("ours", "merged", "reload"):
            r = row[setup]
            equal = {"ours": row["answers_equal"], "merged": True, "reload": row["reload_equal"]}[setup]
            lines.append(
                f"| {row['adapters']} | {setup} | {r['weight_bytes'] / 2**20:.0f} | "
                f"{ours['weight_bytes'] / r['weight_bytes']:.2f}x | {r['tokens_per_s']:.1f} | "
                f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}x | {r['cold_ttft_s']:.2f} | "
                f"{ours['cold_ttft_s'] / r['cold_ttft_s']:.2f}x | {equal} |"
            )
    (RESULTS / "lora.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
