"""What the owner of a published copy costs, and how fast it publishes, against a memcpy and an idle Ray worker.

One run, one real model (SmolLM2-135M-Instruct's float32 safetensors folder, written by examples/smollm2.py),
warm page cache (a node that just downloaded or read the model):

- **Publishing rate**: `zerocopy_runtime.publish(folder)`, the owner's copy only (`manifest.publish_seconds`),
  and the whole call (owner start-up included), against a memcpy of the same bytes from the mapped file into
  fresh pages in this process (the floor any copy into a new store object pays).
- **Owner's own memory**: its PSS without the store pages it shares with replicas,
  against an idle Ray actor (the floor: a worker process) and an idle actor that imported torch (what the owner
  cost while it read checkpoints through torch).

Writes bench/results/owner.md and owner.json.

    python examples/smollm2.py && python bench/bench_owner.py
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

import zerocopy_runtime as zc
from zerocopy_runtime.memory import pss_by_kind

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FOLDER = ROOT / "examples" / ".cache" / "smollm2-135m-instruct"
MiB = 2**20


def smaps(pid: int) -> dict[str, float]:
    """PSS in MiB, whole and by kind of page (`zerocopy_runtime.memory.pss_by_kind`)."""
    return {kind: size / MiB for kind, size in pss_by_kind(pid).items()}


@ray.remote(num_cpus=0)
class Idle:
    """A Ray worker that holds nothing: what any process on the node costs."""

    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0)
class IdleWithTorch:
    """An idle worker that imported torch: the owner's floor while it read checkpoints through torch."""

    def __init__(self) -> None:
        import torch

        torch.zeros(1)

    def pid(self) -> int:
        return os.getpid()


def memcpy_rate(files: list[Path]) -> float:
    """MiB/s of copying the mapped (warm) files into fresh pages of this process."""
    total, seconds = 0, 0.0
    for path in files:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            source = np.frombuffer(mmap.mmap(f.fileno(), size, flags=flags, prot=mmap.PROT_READ), dtype=np.uint8)
        started = time.perf_counter()
        target = np.empty_like(source)  # fresh pages: faulted in by the copy, as a new store object's are
        np.copyto(target, source)
        seconds += time.perf_counter() - started
        total += size
        del target, source
    return total / MiB / seconds


def publish_once(folder: Path) -> dict[str, float]:
    started = time.perf_counter()
    handle = zc.publish(folder, name=f"owner-bench-{time.monotonic_ns()}")
    whole = time.perf_counter() - started
    owner = smaps(handle.owner_pid)
    row = {
        "mib": handle.nbytes / MiB,
        "copy_s": handle.manifest.publish_seconds,
        "whole_s": whole,
        "owner_pid": handle.owner_pid,
        "owner_pss_mib": owner["pss"],
        "owner_pss_without_store_mib": owner["pss"] - owner["shmem"],
        "owner_maps_torch": "libtorch" in Path(f"/proc/{handle.owner_pid}/maps").read_text(),
    }
    zc.release(handle.name)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, default=FOLDER)
    args = parser.parse_args()
    if not any(args.folder.glob("*.safetensors")):
        raise SystemExit(f"{args.folder} holds no safetensors: run `python examples/smollm2.py` first")
    files = sorted(args.folder.glob("*.safetensors"))
    for path in files:  # warm the page cache: a node that just wrote or read the model
        path.read_bytes()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2, object_store_memory=2 * 2**30, include_dashboard=False, log_to_driver=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-owner-bench-"),
    )  # fmt: skip
    memcpy = [memcpy_rate(files) for _ in range(args.repeats)]
    publishes = [publish_once(args.folder) for _ in range(args.repeats)]
    idle = [Idle.remote(), IdleWithTorch.remote()]
    idle_pids = ray.get([actor.pid.remote() for actor in idle])
    floors = {name: smaps(pid) for name, pid in zip(("idle", "idle_with_torch"), idle_pids, strict=True)}
    ray.shutdown()

    mib = publishes[0]["mib"]
    copy_rate = statistics.median(mib / p["copy_s"] for p in publishes)
    whole_rate = statistics.median(mib / p["whole_s"] for p in publishes)
    memcpy_mib_s = statistics.median(memcpy)
    owner_pss = statistics.median(p["owner_pss_without_store_mib"] for p in publishes)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "model": str(args.folder.name),
        "weights_mib": mib,
        "memcpy_mib_s": memcpy,
        "publishes": publishes,
        "floors": floors,
        "summary": {
            "copy_rate_mib_s": copy_rate,
            "whole_rate_mib_s": whole_rate,
            "memcpy_mib_s": memcpy_mib_s,
            "copy_vs_memcpy": copy_rate / memcpy_mib_s,
            "owner_pss_without_store_mib": owner_pss,
            "idle_pss_mib": floors["idle"]["pss"],
            "idle_with_torch_pss_mib": floors["idle_with_torch"]["pss"],
            "owner_vs_idle": owner_pss / floors["idle"]["pss"],
            "owner_maps_torch": any(p["owner_maps_torch"] for p in publishes),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "owner.json").write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    table = f"""# The owner of a published copy: its cost and its publishing rate

{result["model"]}, {mib:.1f} MiB of float32 safetensors, warm page cache; {result["machine"]["cores"]} cores;
medians of {args.repeats} runs, all in one run of `python bench/bench_owner.py`.

| measure | ours | reference | ratio |
|---|---|---|---|
| copy into the store (owner's copy only) | {s["copy_rate_mib_s"]:.0f} MiB/s | memcpy into fresh pages {memcpy_mib_s:.0f} MiB/s | {s["copy_vs_memcpy"]:.2f}x |
| whole `publish()` (owner start-up included) | {s["whole_rate_mib_s"]:.0f} MiB/s | memcpy {memcpy_mib_s:.0f} MiB/s | {s["whole_rate_mib_s"] / memcpy_mib_s:.2f}x |
| owner's PSS, store pages excluded | {owner_pss:.0f} MiB | idle Ray actor {s["idle_pss_mib"]:.0f} MiB | {s["owner_vs_idle"]:.2f}x |
| owner's PSS, store pages excluded | {owner_pss:.0f} MiB | idle actor that imported torch {s["idle_with_torch_pss_mib"]:.0f} MiB | {owner_pss / s["idle_with_torch_pss_mib"]:.2f}x |

The owner maps torch: {s["owner_maps_torch"]}.
"""  # noqa: E501
    (RESULTS / "owner.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
