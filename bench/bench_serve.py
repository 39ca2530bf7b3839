"""Scaling a Serve deployment of one ~512 MiB model from 1 to 4 replicas: ours against plain loading.

Side by side in one run, on the same checkpoint:

  zerocopy     zerocopy_runtime.serve (publish once, every replica attaches)
  torch.load   a plain Serve deployment whose replicas torch.load the .pt checkpoint
  safetensors  the same with safetensors.torch.load_file
  empty        a deployment that loads nothing: the cost of starting a replica process

For N = 1..4: total memory (PSS of the replicas plus, for ours, the owner of the shared copy)
and the time from the scale-up request to the moment the new replica answers (serve.run
returns once every replica is healthy).

Then, with 2 replicas each, throughput and p50/p99 latency under a bounded load (16
clients from a second process, bench/load.py) for ours without and with dynamic batching,
and for the torch.load deployment. Writes bench/results/serve.md and serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from safetensors.torch import save_file
from starlette.requests import Request
from torch import nn

from zerocopy_runtime import pss_bytes
from zerocopy_runtime.config import AppArgs
from zerocopy_runtime.local_serve import replica_pids
from zerocopy_runtime.serve import ZeroCopyDeployment

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"


def build(mib: int = 512, width: int = 2048) -> nn.Module:
    """Square linear layers (16 MiB each at width 2048) adding up to about `mib`."""
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(max(1, mib * MiB // (width * width * 4)))))


@serve.deployment(health_check_period_s=1)
class Plain:
    """What people write today: every replica loads its own copy."""

    def __init__(self, method: str, path: str, mib: int) -> None:
        self.model: nn.Module | None = None
        if method == "torch.load":
            self.model = build(mib)
            self.model.load_state_dict(torch.load(path, weights_only=True))
        elif method == "safetensors":
            from safetensors.torch import load_file

            with torch.device("meta"):
                self.model = build(mib)
            self.model.load_state_dict(load_file(path), assign=True)

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.method == "POST" and self.model is not None:
            inputs = torch.tensor((await request.json())["inputs"])
            with torch.inference_mode():
                return {"outputs": self.model(inputs.unsqueeze(0))[0].tolist()}
        return {"pid": os.getpid()}


def _predict(url: str, times: int) -> None:
    body = json.dumps({"inputs": [0.5] * 2048}).encode()
    for _ in range(times):
        request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


def run_method(method: str, paths: dict[str, str], mib: int, port: int, most: int) -> list[dict[str, Any]]:
    rows = []
    url = f"http://127.0.0.1:{port}/m"
    for replicas in range(1, most + 1):
        if method == "zerocopy":
            args = AppArgs.model_validate(
                {
                    "name": "bench",
                    "model": {
                        "uri": paths["st"],
                        "architecture": {"factory": "bench_serve:build", "kwargs": {"mib": mib}},
                    },
                }
            )
            app = ZeroCopyDeployment.options(num_replicas=replicas, health_check_period_s=1).bind(args.model_dump())
        else:
            app = Plain.options(num_replicas=replicas).bind(
                method, paths["pt" if method == "torch.load" else "st"], mib
            )
        started = time.perf_counter()
        serve.run(app, name="m", route_prefix="/m")
        seconds = time.perf_counter() - started
        pids = replica_pids(url, replicas)
        _predict(url, 10 * replicas)  # every replica reads every weight, as serving would
        owner = []
        if method == "zerocopy":
            with urllib.request.urlopen(url + "/-/info", timeout=60) as response:
                owner = [json.loads(response.read())["owner_pid"]]
        memory = sum(pss_bytes(pid) for pid in pids + owner)
        rows.append({"method": method, "replicas": replicas, "ready_s": seconds, "memory_mib": memory / MiB})
        print(f"{method:12s} N={replicas}  ready {seconds:6.2f} s  memory {memory / MiB:8.0f} MiB", flush=True)
    serve.delete("m")
    return rows


#: (label, deployment) pairs for the load test; batching is ours only (Plain has no @serve.batch).
LOAD_VARIANTS = [("zerocopy, no batching", 1), ("zerocopy, batches of up to 16", 16), ("torch.load", 0)]


def run_load(paths: dict[str, str], mib: int, port: int, replicas: int, concurrency: int) -> list[dict[str, Any]]:
    rows = []
    url = f"http://127.0.0.1:{port}/m"
    options = {"num_replicas": replicas, "max_ongoing_requests": 2 * concurrency}
    for label, batch in LOAD_VARIANTS:
        if batch:
            args = AppArgs.model_validate(
                {
                    "name": "bench",
                    "model": {
                        "uri": paths["st"],
                        "architecture": {"factory": "bench_serve:build", "kwargs": {"mib": mib}},
                    },
                    "batching": {"max_batch_size": batch, "batch_wait_timeout_s": 0.005},
                }
            )
            app = ZeroCopyDeployment.options(**options).bind(args.model_dump())
        else:
            app = Plain.options(**options).bind("torch.load", paths["pt"], mib)
        serve.run(app, name="m", route_prefix="/m")
        load = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("load.py")), url, "--concurrency", str(concurrency)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        row = {"variant": label, "replicas": replicas, **json.loads(load.stdout)}
        rows.append(row)
        print(
            f"{label:32s} {row['requests_per_s']:7.1f} req/s  p50 {row['p50_ms']:7.1f} ms  "
            f"p99 {row['p99_ms']:7.1f} ms  failed {row['failed']}",
            flush=True,
        )
        serve.delete("m")
    return rows


def write_report(rows: list[dict[str, Any]], load: list[dict[str, Any]], mib: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps({"scale": rows, "load": load}, indent=1))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    by = {(r["method"], r["replicas"]): r for r in rows}
    most = max(r["replicas"] for r in rows)
    lines = [
        f"# Scaling a Serve deployment of a {mib} MiB model",
        "",
        "Memory: PSS summed over the replicas (and, for zerocopy, the owner of the shared copy), after "
        "each replica served predictions (so every weight was read). "
        "Ready: seconds from the scale-up request until every replica answers. "
        "`empty` loads nothing: it is the cost of the replica processes themselves.",
        "",
        "| replicas | " + " | ".join(f"{m} memory MiB | {m} ready s" for m in methods) + " |",
        "|---|" + "---|---|" * len(methods),
    ]
    for n in range(1, most + 1):
        cells = [f"{by[(m, n)]['memory_mib']:.0f} | {by[(m, n)]['ready_s']:.2f}" for m in methods]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines += ["", "## Targets", ""]
    if ("zerocopy", most) in by and ("empty", most) in by:
        ours = by[("zerocopy", most)]["memory_mib"] - by[("zerocopy", most - 1)]["memory_mib"]
        empty = by[("empty", most)]["memory_mib"] - by[("empty", most - 1)]["memory_mib"]
        lines.append(
            f"- Replica {most} adds {ours:.0f} MiB; an empty replica adds {empty:.0f} MiB: the model's share is "
            f"{(ours - empty) / mib * 100:.1f}% of its size (target < 10%)"
        )
        lines.append(
            f"- Scale-up to {most}: {by[('zerocopy', most)]['ready_s']:.2f} s for ours, "
            f"{by[('empty', most)]['ready_s']:.2f} s for a replica that loads nothing"
        )
    if load:
        base = load[0]["requests_per_s"]
        lines += [
            "",
            f"## Under load: {load[0]['concurrency']} clients in a second process, {load[0]['replicas']} replicas",
            "",
            "| variant | requests/s | vs. no batching | p50 ms | p99 ms | failed |",
            "|---|---|---|---|---|---|",
        ]
        for r in load:
            lines.append(
                f"| {r['variant']} | {r['requests_per_s']:.1f} | {r['requests_per_s'] / base:.2f}x | "
                f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['failed']} |"
            )
    (RESULTS / "serve.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--methods", default="empty,zerocopy,safetensors,torch.load", help="for the scale-up part")
    parser.add_argument("--concurrency", type=int, default=16, help="clients of the load part; 0 skips it")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    here = str(Path(__file__).resolve().parent)
    env = {"PYTHONPATH": os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]), "RAY_AUTH_MODE": "disabled"}
    ray.init(
        num_cpus=8, object_store_memory=(2 * args.mib + 512) * MiB, include_dashboard=False,
        log_to_driver=False, runtime_env={"env_vars": env},
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        torch.manual_seed(0)
        state = build(args.mib).state_dict()
        paths = {"pt": f"{tmp}/m.pt", "st": f"{tmp}/m.safetensors"}
        torch.save(state, paths["pt"])
        save_file(state, paths["st"])
        del state
        for method in filter(None, args.methods.split(",")):
            rows += run_method(method, paths, args.mib, port, args.replicas)
        load = run_load(paths, args.mib, port, 2, args.concurrency) if args.concurrency else []
    write_report(rows, load, args.mib)
    print((RESULTS / "serve.md").read_text())


if __name__ == "__main__":
    main()
