"""Loading one model into 4 Ray actors: ours against the usual ways and the peer packages.

One run, same weights for every method, side by side:

  zerocopy        ModelWrapper.from_model once, wrapper.load() in each actor (this project)
  torch.load      each actor: torch.load(.pt) + load_state_dict(assign=True) on a meta skeleton
  safetensors     each actor: safetensors.torch.load_file + load_state_dict(assign=True)
  ray.get         ray.put(model) once, ray.get(ref) in each actor (a private copy each)
  ray-zc-tensors  the same with RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1 in the publisher
  ray-zerocopy    ray_zerocopy.ModelWrapper (PyPI ray-zerocopy==0.2.0), actor mode
  zerocopy-0.1    zerocopy.extract_tensors / replace_tensors (PyPI zerocopy==0.1.0)

For each model size: load time in an actor (one actor at a time, so loads do not compete for
the 2 cores), and memory once all 4 actors hold the model and have read every weight: PSS
summed over the 4 actors minus 4 idle actors, plus the store pages charged to the process that
owns the shared copy (publisher or owner actor). Also publish throughput against a plain
memcpy of the same bytes. Writes bench/results/weights.{md,json,png}.

Run it with bench/run.sh (which installs the peer packages in bench/.venv only).
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

import numpy as np
import ray
import torch
from torch import nn

MiB = 2**20
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ["zerocopy", "torch.load", "safetensors", "ray.get", "ray-zc-tensors", "ray-zerocopy", "zerocopy-0.1"]


class Weights(nn.Module):
    """`count` float32 tensors adding up to `mib` MiB: size and tensor count vary independently."""

    def __init__(self, mib: int, count: int) -> None:
        super().__init__()
        per = mib * MiB // 4 // count
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(per)) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum(w[: x.numel()] @ x for w in self.weights)  # type: ignore[return-value]


def _skeleton(mib: int, count: int) -> nn.Module:
    with torch.device("meta"):
        return Weights(mib, count)


def _rollup(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    return fields


# ---------------------------------------------------------------- what each actor does


def _load(method: str, payload: Any, mib: int, count: int) -> nn.Module:
    if method == "zerocopy":
        return payload.load()
    if method == "torch.load":
        model = _skeleton(mib, count)
        model.load_state_dict(torch.load(payload, weights_only=True), assign=True)
        return model
    if method == "safetensors":
        from safetensors.torch import load_file

        model = _skeleton(mib, count)
        model.load_state_dict(load_file(payload), assign=True)
        return model
    if method in ("ray.get", "ray-zc-tensors"):
        return ray.get(payload[0])
    if method == "ray-zerocopy":
        return payload.load()
    if method == "zerocopy-0.1":
        import zerocopy

        skeleton, weights = ray.get(payload[0])
        zerocopy.replace_tensors(skeleton, weights)
        return skeleton
    raise ValueError(method)


@ray.remote(num_cpus=0.01)
class Loader:
    def __init__(self) -> None:
        import zerocopy_runtime  # noqa: F401  (same imports in every actor, idle ones included)

        self.model: nn.Module | None = None

    def pid(self) -> int:
        return os.getpid()

    def load(self, method: str, payload: Any, mib: int, count: int) -> float:
        started = time.perf_counter()
        self.model = _load(method, payload, mib, count)
        return time.perf_counter() - started

    def touch(self) -> float:
        """Read every weight, as inference would, so that lazily mapped pages count too."""
        with torch.no_grad():
            return float(sum(float(p.double().sum()) for p in self.model.parameters()))


@ray.remote(num_cpus=0.01)
class Publisher:
    """Holds the source model (loaded from the same .pt as everyone) and the shared object."""

    def __init__(self, checkpoint: str, mib: int, count: int) -> None:
        self.model = _skeleton(mib, count)
        self.model.load_state_dict(torch.load(checkpoint, weights_only=True), assign=True)
        self.keep: Any = None

    def pid(self) -> int:
        return os.getpid()

    def publish(self, method: str) -> tuple[Any, list[int], float]:
        """Returns the actors' payload, pids holding store pages, and the publish seconds."""
        started = time.perf_counter()
        pids = [os.getpid()]
        if method == "zerocopy":
            from zerocopy_runtime import ModelWrapper

            self.keep = payload = ModelWrapper.from_model(self.model)
            pids.append(payload.published.owner_pid)
        elif method in ("ray.get", "ray-zc-tensors"):
            self.keep = payload = [ray.put(self.model)]
        elif method == "ray-zerocopy":
            from ray_zerocopy import ModelWrapper as PeerWrapper

            self.keep = payload = PeerWrapper.from_model(self.model, mode="actor")
        elif method == "zerocopy-0.1":
            import zerocopy

            self.keep = payload = [ray.put(zerocopy.extract_tensors(self.model))]
        else:
            raise ValueError(method)
        return payload, pids, time.perf_counter() - started

    def release(self) -> None:
        if hasattr(self.keep, "release"):
            self.keep.release()
        self.keep = None

    def throughput(self, checkpoint: str) -> dict[str, float]:
        """Publish speed (copy phase, owner start-up excluded) against memcpy of the same bytes.

        memcpy is timed into fresh pages (the kernel must fault them in, as it does
        for store pages never used before) and into warm ones (already faulted).
        The store is warm here: the methods measured before used it.
        """
        import zerocopy_runtime as zc

        nbytes = sum(p.nbytes for p in self.model.parameters())
        sources = [p.detach().reshape(-1).view(torch.uint8).numpy() for p in self.model.parameters()]
        fresh, warm = [], []
        for _ in range(3):
            target = np.empty(nbytes, dtype=np.uint8)
            for timings in (fresh, warm):
                started = time.perf_counter()
                offset = 0
                for src in sources:
                    target[offset : offset + src.size] = src
                    offset += src.size
                timings.append(time.perf_counter() - started)
            del target
        module_s, checkpoint_s = [], []
        for _ in range(2):
            for source, timings in ((self.model, module_s), (checkpoint, checkpoint_s)):
                handle = zc.publish(source, name="bench-throughput")
                timings.append(handle.manifest.publish_seconds)
                zc.release(handle)
        gib = nbytes / 2**30
        return {
            "bytes": nbytes,
            "memcpy_fresh_gib_s": gib / min(fresh),
            "memcpy_warm_gib_s": gib / min(warm),
            "publish_module_gib_s": gib / min(module_s),
            "publish_checkpoint_gib_s": gib / min(checkpoint_s),
        }


# ---------------------------------------------------------------- one measurement


def _idle_pss(actors: list) -> int:
    pids = ray.get([a.pid.remote() for a in actors])
    return int(statistics.median(_rollup(pid)["Pss"] for pid in pids))


def measure(method: str, checkpoints: dict[str, str], mib: int, count: int, actors: int) -> dict[str, Any]:
    env = {"RAY_ENABLE_ZERO_COPY_TORCH_TENSORS": "1" if method == "ray-zc-tensors" else "0"}
    publisher = Publisher.options(runtime_env={"env_vars": env}).remote(checkpoints["pt"], mib, count)
    if method in ("torch.load", "safetensors"):
        payload, store_pids, publish_s = checkpoints["pt" if method == "torch.load" else "st"], [], 0.0
    else:
        payload, store_pids, publish_s = ray.get(publisher.publish.remote(method))
    loaders = [Loader.remote() for _ in range(actors)]
    idle = _idle_pss(loaders)
    seconds = [ray.get(a.load.remote(method, payload, mib, count)) for a in loaders]  # one at a time
    sums = ray.get([a.touch.remote() for a in loaders])
    assert len(set(sums)) == 1, f"{method}: actors disagree on the weights"
    pids = ray.get([a.pid.remote() for a in loaders])
    holders = sum(_rollup(pid)["Pss"] - idle for pid in pids)
    store_side = sum(_rollup(pid).get("Pss_Shmem", 0) for pid in store_pids)
    for actor in loaders:
        ray.kill(actor)
    ray.get(publisher.release.remote())
    ray.kill(publisher)
    return {
        "method": method,
        "mib": mib,
        "tensors": count,
        "load_s_median": statistics.median(seconds),
        "load_s_first": seconds[0],
        "publish_s": publish_s,
        "memory_mib": (holders + store_side) / MiB,
        "checksum": sums[0],
    }


def _checkpoints(folder: Path, mib: int, count: int) -> dict[str, str]:
    from safetensors.torch import save_file

    torch.manual_seed(mib * 1000 + count)
    model = Weights(mib, count)
    for p in model.parameters():
        nn.init.normal_(p)
    paths = {"pt": str(folder / f"w{mib}-{count}.pt"), "st": str(folder / f"w{mib}-{count}.safetensors")}
    torch.save(model.state_dict(), paths["pt"])
    save_file(model.state_dict(), paths["st"])
    return paths


def _wait_store_empty(timeout: float = 60) -> None:
    from zerocopy_runtime._store import local_store_usage

    deadline = time.monotonic() + timeout
    while local_store_usage().used > 16 * MiB and time.monotonic() < deadline:
        time.sleep(0.2)


# ---------------------------------------------------------------- report


def write_report(rows: list[dict[str, Any]], throughput: dict[str, float], cases: list[tuple[int, int]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "weights.json").write_text(json.dumps({"rows": rows, "throughput": throughput}, indent=1))
    by = {(r["method"], r["mib"], r["tensors"]): r for r in rows}
    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
    lines = [
        "# Loading one model into 4 Ray actors",
        "",
        f"Machine: {os.cpu_count()} cores; torch {torch.__version__}; ray {ray.__version__}. "
        "Load: median seconds for one actor to get a usable model (actors load one at a time). "
        "Memory: MiB held by the 4 actors and the owner of the shared copy, after every weight was read, "
        "beyond 4 idle actors (PSS). Ratios are against `zerocopy` in the same row.",
        "",
        "## Load time (ms) and ratio to zerocopy",
        "",
        "| size | tensors | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for mib, count in cases:
        ours = by[("zerocopy", mib, count)]["load_s_median"]
        cells = []
        for m in methods:
            r = by.get((m, mib, count))
            cells.append("n/a" if r is None else f"{r['load_s_median'] * 1000:.1f} ({r['load_s_median'] / ours:.1f}x)")
        lines.append(f"| {mib} MiB | {count} | " + " | ".join(cells) + " |")
    lines += ["", "## Memory for 4 actors (MiB) and ratio to the model size", "", lines[6], lines[7]]
    for mib, count in cases:
        cells = []
        for m in methods:
            r = by.get((m, mib, count))
            cells.append("n/a" if r is None else f"{r['memory_mib']:.0f} ({r['memory_mib'] / mib:.2f}x)")
        lines.append(f"| {mib} MiB | {count} | " + " | ".join(cells) + " |")
    t = throughput
    lines += [
        "",
        "## Publish throughput (GiB/s; copy phase, owner start-up excluded)",
        "",
        "| bytes | memcpy, fresh pages | memcpy, warm pages | publish nn.Module | publish .pt checkpoint |",
        "|---|---|---|---|---|",
        f"| {t['bytes'] / MiB:.0f} MiB | {t['memcpy_fresh_gib_s']:.2f} | {t['memcpy_warm_gib_s']:.2f} | "
        f"{t['publish_module_gib_s']:.2f} | {t['publish_checkpoint_gib_s']:.2f} |",
        "",
        "## Targets",
        "",
    ]
    lines += _targets(by, cases, t)
    (RESULTS / "weights.md").write_text("\n".join(lines) + "\n")
    _plot(rows, methods, cases)


def _targets(by: dict, cases: list[tuple[int, int]], t: dict[str, float]) -> list[str]:
    out = []
    flat = [c for c in cases if c[1] == cases[0][1]]
    small, large = flat[0], flat[-1]
    ratio = by[("zerocopy", *large)]["load_s_median"] / by[("zerocopy", *small)]["load_s_median"]
    out.append(f"- Attach time {large[0]} MiB vs {small[0]} MiB at {small[1]} tensors: {ratio:.2f}x (target <= 2x)")
    speedup = by[("torch.load", *large)]["load_s_median"] / by[("zerocopy", *large)]["load_s_median"]
    out.append(f"- Faster than torch.load at {large[0]} MiB: {speedup:.0f}x (target >= 20x)")
    for mib, count in flat:
        if mib == 512:
            mem = by[("zerocopy", mib, count)]["memory_mib"] / mib
            out.append(
                f"- 4 actors of a 512 MiB model hold {mem:.2f}x the model beyond their baseline (target <= 1.2x)"
            )
    for what in ("module", "checkpoint"):
        speed = t[f"publish_{what}_gib_s"]
        out.append(
            f"- Publish ({what}) at {speed / t['memcpy_warm_gib_s']:.2f} of warm memcpy, "
            f"{speed / t['memcpy_fresh_gib_s']:.2f} of fresh-page memcpy (target >= 0.5)"
        )
    return out


def _plot(rows: list[dict[str, Any]], methods: list[str], cases: list[tuple[int, int]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = cases[0][1]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        pts = sorted((r["mib"], r) for r in rows if r["method"] == m and r["tensors"] == count)
        sizes = [p[0] for p in pts]
        left.plot(sizes, [p[1]["load_s_median"] * 1000 for p in pts], marker="o", label=m)
        right.plot(sizes, [p[1]["memory_mib"] for p in pts], marker="o", label=m)
    right.plot(sizes, sizes, "k--", linewidth=1, label="1x model")
    for ax, title, unit in ((left, "load time per actor", "ms"), (right, "memory, 4 actors", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"model size (MiB, {count} tensors)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "weights.png", dpi=120)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,64,256,512,1024", help="model sizes in MiB")
    parser.add_argument("--tensors", type=int, default=64, help="tensor count for the size sweep")
    parser.add_argument("--many", default="64:8192", help="the many-small-tensors case, MIB:COUNT")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--actors", type=int, default=4)
    args = parser.parse_args()

    sizes = [int(s) for s in args.sizes.split(",")]
    mib, count = (int(x) for x in args.many.split(":"))
    cases = [(s, args.tensors) for s in sizes] + [(mib, count)]
    methods = args.methods.split(",")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        object_store_memory=(3 * max(sizes) + 512) * MiB,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}},
    )
    rows: list[dict[str, Any]] = []
    throughput: dict[str, float] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        for size, n in cases:
            checkpoints = _checkpoints(Path(tmp), size, n)
            for method in methods:
                row = measure(method, checkpoints, size, n, args.actors)
                rows.append(row)
                print(
                    f"{size:5d} MiB {n:5d} tensors {method:15s} load {row['load_s_median'] * 1000:9.1f} ms"
                    f"  memory {row['memory_mib']:7.0f} MiB",
                    flush=True,
                )
                _wait_store_empty()
            if size == max(sizes) and n == args.tensors:
                publisher = Publisher.remote(checkpoints["pt"], size, n)
                throughput = ray.get(publisher.throughput.remote(checkpoints["pt"]))
                ray.kill(publisher)
                print(f"throughput: {throughput}", flush=True)
            for path in checkpoints.values():
                Path(path).unlink()
    sums = {}
    for r in rows:
        sums.setdefault((r["mib"], r["tensors"]), set()).add(r["checksum"])
    assert all(len(s) == 1 for s in sums.values()), "methods loaded different weights"
    write_report(rows, throughput, cases)
    print((RESULTS / "weights.md").read_text())


if __name__ == "__main__":
    main()
