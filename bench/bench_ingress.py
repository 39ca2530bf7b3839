"""What the replica's FastAPI ingress costs: start-up, latency and throughput of the tensor route, one run.

Issue 20 moved the replica's routing from a hand-written `__call__` to Serve's `@serve.ingress(FastAPI)`.
This measures the tree it runs in; run it on two commits to compare them (`--label` names the row):

    git worktree add /tmp/before <commit> && PYTHONPATH=/tmp/before/runtime python bench/bench_ingress.py --label before
    python bench/bench_ingress.py --label after

One replica of a 256-wide MLP (the model's own time is small, so routing is what differs), its start to
ready from `/-/info`, then `load.py` from its own process at 1 and 8 clients. Appends a row to
bench/results/ingress.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "ingress.md"
WIDTH = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--requests", type=int, default=600)
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve
    from safetensors.torch import save_file

    import zerocopy_runtime
    from tests.models import MLP
    from zerocopy_runtime.config import AppArgs
    from zerocopy_runtime.serve import ZeroCopyDeployment

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    folder = Path(tempfile.mkdtemp(prefix="bench-ingress-"))
    torch.manual_seed(0)
    save_file(MLP(WIDTH, 2).state_dict(), folder / "mlp.safetensors")
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"port": 8123})
    spec = {"factory": "tests.models:MLP", "kwargs": {"width": WIDTH, "depth": 2}}
    app = {"name": "ingress", "model": {"uri": f"file://{folder}/mlp.safetensors", "architecture": spec}}
    bound = ZeroCopyDeployment.options(num_replicas=1).bind(AppArgs.model_validate(app).model_dump())
    serve.run(bound, name="ingress", route_prefix="/ingress")
    url = "http://127.0.0.1:8123/ingress"
    with urllib.request.urlopen(url + "/-/info", timeout=30) as response:
        startup = json.loads(response.read())["startup_seconds"]
    rows = []
    for clients in (1, 8):
        out = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "load.py"), url, "--concurrency", str(clients),
             "--requests", str(args.requests), "--width", str(WIDTH)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append((clients, json.loads(out.stdout.strip().splitlines()[-1])))
    serve.shutdown()
    ray.shutdown()
    runtime = Path(zerocopy_runtime.__file__).resolve().parent
    commit = subprocess.run(["git", "-C", str(runtime), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# The replica's ingress: start-up and the tensor route under load\n\n"
            "`python bench/bench_ingress.py --label L` on 2 cores, one replica of a 256-wide MLP; rows of runs on\n"
            "different commits (their runtime on PYTHONPATH), one after the other on the same machine.\n\n"
            "| label | runtime | replica start (s) | 1 client req/s | 1 client p50 ms | 8 clients req/s "
            "| 8 clients p50 ms | 8 clients p99 ms | failed |\n|---|---|---|---|---|---|---|---|---|\n"
        )
    (_, r1), (_, r8) = rows
    line = (
        f"| {args.label} | {commit.stdout.strip()} {runtime} | {startup:.2f} | {r1['requests_per_s']:.0f} | "
        f"{r1['p50_ms']:.1f} | {r8['requests_per_s']:.0f} | {r8['p50_ms']:.1f} | {r8['p99_ms']:.1f} | "
        f"{r1['failed'] + r8['failed']} |\n"
    )
    with RESULTS.open("a") as results:
        results.write(line)
    print(line, end="")


if __name__ == "__main__":
    main()
