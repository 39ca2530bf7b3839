"""`zerocopy serve FILE`: the ZeroCopyModel a user would `kubectl apply`, served on a local Ray."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import TextIO

import ray
import yaml
from ray import serve

from ._store import format_bytes
from .config import from_resource
from .memory import pss_bytes
from .serve import ZeroCopyDeployment, find_or_publish
from .weights import release


def serve_file(path: Path, address: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Publish, deploy, print the endpoint and a memory summary, then serve until Ctrl-C."""
    resource = yaml.safe_load(path.read_text())
    base = path.resolve().parent
    args, settings = from_resource(resource, base_dir=base)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Files next to the resource (the architecture's module, handlers) are importable by replicas.
    pythonpath = os.pathsep.join(filter(None, [str(base), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": pythonpath, "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"]}
    ray.init(address=address, runtime_env={"env_vars": env}, include_dashboard=False, log_to_driver=False)
    print(f"publishing {args.model.uri} ...", flush=True)
    started = time.perf_counter()
    published = find_or_publish(args, progress=ProgressLine(sys.stdout))
    seconds = time.perf_counter() - started
    print(f"published {format_bytes(published.nbytes)} as {published.name} in {seconds:.1f} s")
    serve.start(http_options={"host": host, "port": port})
    bound = ZeroCopyDeployment.options(num_replicas=settings.replicas).bind(args.model_dump())  # type: ignore[attr-defined]
    serve.run(bound, name=args.name, route_prefix=settings.route_prefix)
    endpoint = f"http://{host}:{port}{settings.route_prefix}"
    print(f'serving {args.name} at {endpoint} (POST JSON {{"inputs": [...]}}; GET {endpoint}/-/info)')
    print(memory_summary(endpoint, settings.replicas, published.nbytes, published.owner_pid), flush=True)
    # Ctrl-C and `kill` (SIGTERM) both stop cleanly, even where SIGINT was inherited as ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        print("shutting down", flush=True)
    finally:
        serve.delete(args.name)
        release(published)
        ray.shutdown()


class ProgressLine:
    """Publishing progress: one line redrawn in place on a terminal, a line per tenth in a log."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._started = time.perf_counter()
        self._shown = -1  # percent last printed

    def __call__(self, done: int, total: int) -> None:
        if total <= 0:
            return  # the size is not known yet
        percent = 100 * done // total
        terminal = self._stream.isatty()
        if percent == self._shown or (not terminal and percent // 10 == self._shown // 10):
            return
        self._shown = percent
        rate = format_bytes(int(done / max(time.perf_counter() - self._started, 1e-6)))
        text = f"  {format_bytes(done)} of {format_bytes(total)} in the object store ({percent}%, {rate}/s)"
        end = "\n" if not terminal or done >= total else ""
        self._stream.write(("\r" if terminal else "") + text + end)
        self._stream.flush()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def replica_pids(endpoint: str, replicas: int) -> list[int]:
    """The pids of a deployment's replicas, from `<endpoint>/-/info` (requests land on random replicas)."""
    pids: set[int] = set()
    for _ in range(100 * replicas):
        with urllib.request.urlopen(endpoint + "/-/info", timeout=60) as response:
            pids.add(json.loads(response.read())["pid"])
        if len(pids) == replicas:
            break
    return sorted(pids)


def memory_summary(endpoint: str, replicas: int, model_bytes: int, owner_pid: int) -> str:
    """One line comparing what the replicas cost with what private copies would."""
    pids = replica_pids(endpoint, replicas)
    try:
        total = sum(pss_bytes(pid) for pid in [*pids, owner_pid])
    except OSError:  # replicas on other nodes: no /proc to read here
        return f"{replicas} replicas share one {format_bytes(model_bytes)} copy per node"
    extra = format_bytes((len(pids) - 1) * model_bytes)
    return (
        f"{len(pids)} replicas share one {format_bytes(model_bytes)} copy: replicas and owner use "
        f"{format_bytes(total)} in all (PSS); a private copy each would add {extra}"
    )
