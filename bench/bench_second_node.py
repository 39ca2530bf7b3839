"""A second node: a remote model read from its source once, ours against plain replicas downloading it there.

Two Ray nodes on this machine (`ray.cluster_utils.Cluster`, one object store each). The model
(SmolLM2-135M-Instruct, the float32 safetensors folder from examples/smollm2.py) is served over http:// from
loopback through a 100 MiB/s cap shared by every connection: a stand-in for a hub or an object store seen
from a node. Node a's first replica has published it (ours) before the measure starts; then 1, 2 and 4
replicas start on node b, one after another, each a Ray actor doing what a replica of its kind does to get a
usable model (Serve's own start-up, the same for both, is left out):

- ours: `find_or_publish` (names the revision from the source's listing and finds node a's copy), the model
  folder from the files published with it (`model_files`), `attach` (Ray pulls the bytes from node a's store
  into node b's once; the later replicas map that copy);
- plain: what a user's replica does with a remote model: download the folder into the node's disk unless a
  replica there already has (as huggingface_hub's cache does), then `from_pretrained` on it.

Per replica count, node b starts from nothing (ours: a fresh publish on node a; plain: an empty disk cache).
Recorded: bytes node b read from the source, each replica's load time (the weights' share of its cold start),
time to its first token and the token, and the PSS of node b's replicas. Writes bench/results/second_node.md
and second_node.json.

    python examples/smollm2.py && python bench/bench_second_node.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.two_nodes import http_source  # noqa: E402  # the two-node test's byte-counting server
from zerocopy_runtime.memory import pss_by_kind  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
MiB = 2**20
PROMPT = "What is the capital of France?"
NAME = "smollm2-remote"


def plain_download(url: str, cache: Path) -> Path:
    """A user's download of a remote folder into the node's disk, once per node (the first replica's)."""
    import fsspec

    target = cache / "model"
    if target.exists():
        return target
    fs, root = fsspec.core.url_to_fs(url)
    partial_dir = Path(tempfile.mkdtemp(dir=cache))
    for entry in fs.ls(root, detail=True):
        if entry["type"] == "file":
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            with urllib.request.urlopen(entry["name"]) as response, open(partial_dir / name, "wb") as out:
                shutil.copyfileobj(response, out, 8 * MiB)
    partial_dir.rename(target)
    return target


@ray.remote(num_cpus=0)
class Replica:
    """Gets a usable model the way one kind of replica does on its node, then answers one token."""

    def __init__(self, variant: str, url: str, cache: str) -> None:
        started = time.perf_counter()
        import torch
        from ray import serve  # noqa: F401
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.models.llama import modeling_llama  # noqa: F401  # the model's code, ours or plain

        from zerocopy_runtime import attach, find_or_publish, model_files
        from zerocopy_runtime._architecture import architecture_factory
        from zerocopy_runtime.config import AppArgs

        torch.set_num_threads(1)
        self.imports_s = time.perf_counter() - started
        started = time.perf_counter()
        os.environ["ZEROCOPY_CACHE"] = cache  # this node's disk
        if variant == "ours":
            args = AppArgs.model_validate(
                {
                    "name": NAME,
                    "model": {"uri": url, "architecture": {"transformers": "LlamaForCausalLM"}},
                    "task": "text-generation",
                }
            )
            published = find_or_publish(args)
            folder = model_files(args, published)
            factory = architecture_factory(args.model.architecture, folder)  # type: ignore[arg-type]
            self.model = attach(published, factory=factory).eval()
        else:
            folder = plain_download(url, Path(cache))
            self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.load_s = time.perf_counter() - started
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt").input_ids
        begun = time.perf_counter()
        with torch.no_grad():
            self.token = int(self.model(ids).logits[0, -1].argmax())
        self.first_token_s = time.perf_counter() - begun

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "imports_s": self.imports_s,
            "load_s": self.load_s,
            "first_token_s": self.first_token_s,
            "token": self.token,
        }


def start(variant: str, node: str, url: str, cache: Path) -> tuple[Any, dict[str, Any], float]:
    begun = time.perf_counter()
    actor = Replica.options(resources={f"node_{node}": 0.01}).remote(variant, url, str(cache))  # type: ignore[attr-defined]
    stats = ray.get(actor.stats.remote())
    return actor, stats, time.perf_counter() - begun


def run_count(variant: str, n: int, url: str, sent: dict[str, int], work: Path) -> dict[str, Any]:
    """Node b from nothing: ours after a fresh publish on node a, plain with an empty disk cache."""
    from zerocopy_runtime import release_model

    cache_b = work / f"{variant}-{n}-b"
    cache_b.mkdir()
    publisher = None
    if variant == "ours":
        release_model(NAME)
        publisher, _, _ = start("ours", "a", url, work / "cache-a")  # node a reads the source and publishes
    before = sum(sent.values())
    actors, stats, whole = [], [], []
    for _ in range(n):
        actor, s, seconds = start(variant, "b", url, cache_b)
        actors.append(actor)
        stats.append(s)
        whole.append(seconds)
    memory = {kind: sum(pss_by_kind(s["pid"])[kind] for s in stats) / MiB for kind in ("pss", "anon", "file", "shmem")}
    read = sum(sent.values()) - before
    for actor in [*actors, publisher]:
        if actor is not None:
            ray.kill(actor)
    return {
        "variant": variant,
        "replicas": n,
        "read_from_source_bytes": read,
        "memory_mib": memory,
        "load_s": [s["load_s"] for s in stats],
        "whole_s": whole,
        "first_token_s": [s["first_token_s"] for s in stats],
        "tokens": [s["token"] for s in stats],
        "nodes": sorted({s["node_id"] for s in stats}),
    }


def ratio(ours: float, plain: float) -> str:
    return f"{ours / plain:.2f}x" if plain else "-"


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {(r["variant"], r["replicas"]): r for r in rows}
    lines = [
        "# A second node: a remote model, ours against plain replicas downloading it there",
        "",
        f"{meta['model']} ({meta['model_mib']:.0f} MiB of files) over http:// from loopback through a "
        f"{meta['rate_mib_s']:.0f} MiB/s cap (a stand-in for a hub or an object store); two Ray nodes on "
        f"{meta['cores']} cores; one run of `python bench/bench_second_node.py`.",
        "Node a has published the model (ours) before node b's replicas start; plain replicas download it to node",
        "b's disk once (the first replica) and load it with `from_pretrained`. Load: the weights' share of a",
        "replica's cold start (from the imports every Serve replica has done to a usable model), seconds: the",
        "first replica on node b, and the median of the later ones. Memory: PSS of node b's replicas, MiB.",
        "",
        "| replicas on node b | read from source ours / plain (MiB) | first load ours / plain | ratio "
        "| later loads ours / plain | ratio | all ready ours / plain (s) | ratio | memory ours / plain | ratio "
        "| same token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for n in meta["replicas"]:
        ours, plain = by.get(("ours", n)), by.get(("plain", n))
        if not (ours and plain):
            continue
        ro, rp = ours["read_from_source_bytes"] / MiB, plain["read_from_source_bytes"] / MiB
        fo, fp = ours["load_s"][0], plain["load_s"][0]
        lo = statistics.median(ours["load_s"][1:]) if n > 1 else None
        lp = statistics.median(plain["load_s"][1:]) if n > 1 else None
        later = f"{lo:.2f} / {lp:.2f}" if lo is not None and lp is not None else "-"
        later_ratio = ratio(lo, lp) if lo is not None and lp else "-"
        wo, wp = sum(ours["whole_s"]), sum(plain["whole_s"])
        mo, mp = ours["memory_mib"]["pss"], plain["memory_mib"]["pss"]
        same = len(set(ours["tokens"]) | set(plain["tokens"])) == 1
        lines.append(
            f"| {n} | {ro:.0f} / {rp:.0f} | {fo:.2f} / {fp:.2f} | {ratio(fo, fp)} | {later} | {later_ratio} "
            f"| {wo:.1f} / {wp:.1f} | {ratio(wo, wp)} | {mo:.0f} / {mp:.0f} | {ratio(mo, mp)} | "
            f"{'yes' if same else 'NO'} |"
        )
        verdicts.append(
            f"- {n} replica(s) on node b: {ro:.0f} MiB read from the source against {rp:.0f}; the first replica's "
            f"load {ratio(fo, fp)} of plain, all ready {ratio(wo, wp)}, memory {ratio(mo, mp)}"
        )
    lines += ["", "Verdicts:", "", *verdicts, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--rate-mib-s", type=float, default=100.0)
    parser.add_argument("--store-gib", type=float, default=1.5)
    args = parser.parse_args()
    if not (FOLDER / "config.json").is_file():
        raise SystemExit(f"{FOLDER} is missing: run `python examples/smollm2.py` first")
    from ray.cluster_utils import Cluster

    counts = [int(n) for n in args.replicas.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench-2n-"))
    site = work / "site"
    site.mkdir()
    os.symlink(FOLDER, site / "smollm2")
    env = {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    os.environ["RAY_TMPDIR"] = str(work)
    common = {"object_store_memory": int(args.store_gib * 2**30), "num_cpus": 2, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args=common | {"resources": {"node_a": 1}})
    cluster.add_node(**common, resources={"node_b": 1})
    rows: list[dict[str, Any]] = []
    try:
        ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": env})
        with http_source(site, args.rate_mib_s * MiB) as (base, sent):
            url = f"{base}/smollm2/"
            for n in counts:
                for variant in ("ours", "plain"):
                    rows.append(run_count(variant, n, url, sent, work))
                    print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    meta = {
        "model": "SmolLM2-135M-Instruct, float32 safetensors",
        "model_mib": sum(f.stat().st_size for f in FOLDER.iterdir()) / MiB,
        "rate_mib_s": args.rate_mib_s,
        "cores": os.cpu_count(),
        "replicas": counts,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "second_node.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    text = report(rows, meta)
    (RESULTS / "second_node.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
