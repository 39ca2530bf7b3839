"""Share one model across 4 Ray actors and compare with each actor loading its own copy.

Run:  python examples/share_across_actors.py [--mib 256] [--actors 4]

It builds a model (no download), then measures two ways of giving it to N
actors on this machine: `ModelWrapper` (published once, attached zero-copy)
and the usual `torch.load` in every actor. Memory is PSS summed over the
actors (and the owner that holds the shared copy), minus the same number of
idle actors, so only the model's cost is counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch
from torch import nn

from zerocopy_runtime import ModelWrapper, attach_report, pss_bytes, total_pss

MiB = 2**20


def build_model(mib: int) -> nn.Sequential:
    """Square linear layers of 1024x1024 float32 (4 MiB each) adding up to about `mib`."""
    return nn.Sequential(*(nn.Linear(1024, 1024) for _ in range(max(1, mib // 4))))


class _Process:
    def pid(self) -> int:
        return os.getpid()


@ray.remote(num_cpus=0.1)
class Idle(_Process):
    """An actor holding no model: the baseline cost of a worker with torch and our runtime imported."""

    def __init__(self) -> None:
        build_model(4)(torch.randn(2, 1024))  # warm torch's allocator and kernels like the others


@ray.remote(num_cpus=0)
class Bare(_Process):
    """A Ray worker that imports nothing: the baseline of the shared copy's owner, which never imports torch."""


@ray.remote(num_cpus=0.1)
class Shared(_Process):
    def __init__(self, wrapper: ModelWrapper) -> None:
        self.model = wrapper.load()

    def load_seconds(self) -> float:
        return attach_report(self.model).attach_seconds

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


@ray.remote(num_cpus=0.1)
class PrivateCopy(_Process):
    def __init__(self, path: str, mib: int) -> None:
        started = time.perf_counter()
        self.model = build_model(mib)
        self.model.load_state_dict(torch.load(path, weights_only=True))
        self.seconds = time.perf_counter() - started

    def load_seconds(self) -> float:
        return self.seconds


def measure(actors: list, baseline: int, extra_pids: list[int] = ()) -> tuple[int, float]:
    pids = ray.get([a.pid.remote() for a in actors]) + list(extra_pids)
    seconds = max(ray.get([a.load_seconds.remote() for a in actors]))
    return total_pss(pids) - baseline, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="model size in MiB")
    parser.add_argument("--actors", type=int, default=4, help="number of actors sharing it")
    args = parser.parse_args()

    ray.init(object_store_memory=(args.mib * 2 + 256) * MiB, include_dashboard=False, log_to_driver=False)
    model = build_model(args.mib).eval()
    size = sum(p.nbytes for p in model.parameters())
    print(f"model: {len(model)} layers, {size / MiB:.0f} MiB; {args.actors} actors")

    idle = [Idle.remote() for _ in range(args.actors + 1)]
    idle_pss = total_pss(ray.get([a.pid.remote() for a in idle]))
    per_idle = idle_pss // len(idle)
    bare = Bare.remote()
    per_bare = total_pss(ray.get([bare.pid.remote()]))
    for actor in [*idle, bare]:
        ray.kill(actor)

    started = time.perf_counter()
    wrapper = ModelWrapper.from_model(model, mode="actor")
    publish_seconds = time.perf_counter() - started
    shared = [Shared.remote(wrapper) for _ in range(args.actors)]
    x = torch.randn(2, 1024)
    with torch.no_grad():
        assert all(torch.equal(y, model(x)) for y in ray.get([a.predict.remote(x) for a in shared]))
    owner = [wrapper.published.owner_pid]
    shared_mem, shared_load = measure(shared, per_idle * args.actors + per_bare, owner)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.pt"
        torch.save(model.state_dict(), path)
        private = [PrivateCopy.remote(str(path), args.mib) for _ in range(args.actors)]
        private_mem, private_load = measure(private, per_idle * args.actors)

    print(f"publish once:            {publish_seconds:6.2f} s")
    print(f"zerocopy  {args.actors} actors: load {shared_load * 1000:8.1f} ms, memory {shared_mem / MiB:7.0f} MiB")
    print(f"torch.load {args.actors} actors: load {private_load * 1000:8.1f} ms, memory {private_mem / MiB:7.0f} MiB")
    print(
        f"=> {args.actors} actors share one {size / MiB:.0f} MiB copy: {shared_mem / MiB:.0f} MiB in total instead of "
        f"{private_mem / MiB:.0f} MiB; loading is {private_load / max(shared_load, 1e-9):.0f}x faster"
    )
    print(f"(this process: {pss_bytes() / MiB:.0f} MiB PSS, holding the original model)")
    wrapper.release()
    ray.shutdown()


if __name__ == "__main__":
    main()
