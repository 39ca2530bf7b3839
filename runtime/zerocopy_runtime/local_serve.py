"""`zerocopy serve FILE...`: the Serve applications the operator would render, run on a local Ray.

The command line turns each resource into Serve's application config (the
same function the operator uses for serveConfigV2); this module checks what
can be checked before Ray starts, publishes the weights with progress, and
deploys the applications through Serve's config path, as `serve deploy` and
KubeRay do, so `serve status` and `serve config` show them as on a cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from ._architecture import architecture_factory
from ._checkpoint import load_mapped
from ._errors import WeightsNotFoundError, ZeroCopyError
from ._gguf import check_gguf, meant_as_gguf
from ._source import local_path, model_folder, verify
from ._store import format_bytes
from .config import AppArgs
from .memory import pss_bytes
from .text import load_tokenizer


class ReplicaStartError(ZeroCopyError):
    """The application's replicas failed to start; the message is their own exception's."""


def preflight(args: AppArgs) -> Path:
    """The checkpoint's local path, checked before any Ray process starts: present, intact, the right checksum.

    Only the header of each file is read (its tensors are mapped, not loaded),
    except that a given sha256 is verified over the whole file, as the publisher would;
    the architecture's factory is imported (with the resource's folder importable) but not called;
    text tasks' tokenizer is loaded from the model folder. A GGUF file's header is checked (its tensors are
    dequantized once, by the owner), and its model folder is written into the cache here, once.
    """
    path = local_path(args.model)
    verify(path, args.model)
    if meant_as_gguf(path):
        check_gguf(path)  # its header: dequantizing is the owner's job, once
    else:
        load_mapped(path)
    if args.model.architecture is not None:  # imports the factory or checks the class; builds nothing
        architecture_factory(args.model.architecture, model_folder(path), gguf=meant_as_gguf(path))
    if args.task != "tensor":
        load_tokenizer(model_folder(path))  # text tasks need the model's own tokenizer
    return path


def serve_applications(
    applications: list[dict[str, Any]],
    base_dir: Path,
    *,
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    dashboard_port: int = 8265,
    router: dict[str, Any] | None = None,
) -> None:
    """Publish each model, deploy them all, print their endpoints and memory summaries, then serve until Ctrl-C.

    One config for every application, as KubeRay sends a shared cluster's serveConfigV2; every model is
    checked before Ray starts, so a bad one costs seconds, not the others' publish. `router`: the OpenAI router
    application in front of the text models, deployed with them (as on a ZeroCopyCluster).
    """
    models = [AppArgs.model_validate(application["args"]) for application in applications]
    os.environ.setdefault("ZEROCOPY_MODEL_DIR", str(base_dir))
    sys.path.insert(0, str(base_dir))
    for args in models:
        preflight(args)
    import ray
    from ray import serve

    from .replica_weights import find_or_publish
    from .weights import PublishedModel, release

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Files next to the resource (the architecture's module, handlers) are importable by replicas, and
    # relative model paths are taken against the resource's folder, as ZEROCOPY_MODEL_DIR is in a cluster.
    pythonpath = os.pathsep.join(filter(None, [str(base_dir), os.environ.get("PYTHONPATH")]))
    env = {
        "PYTHONPATH": pythonpath,
        "RAY_AUTH_MODE": os.environ["RAY_AUTH_MODE"],
        "ZEROCOPY_MODEL_DIR": os.environ["ZEROCOPY_MODEL_DIR"],
    }
    context = ray.init(
        address=address or "local",  # never a `ray start` cluster found unasked: we would leave our apps in it
        runtime_env={"env_vars": env},
        include_dashboard=None if address else True,
        dashboard_port=dashboard_port,
        log_to_driver=False,
    )
    published: list[PublishedModel] = []
    try:
        for args in models:
            print(f"publishing {args.model.uri} ...", flush=True)
            started = time.perf_counter()
            published.append(find_or_publish(args, progress=ProgressLine(sys.stdout), verified=True))  # preflight
            seconds = time.perf_counter() - started
            print(f"published {format_bytes(published[-1].nbytes)} as {published[-1].name} in {seconds:.1f} s")
        every = applications + ([router] if router is not None else [])
        deploy([application | {"runtime_env": {"env_vars": env}} for application in every], host, port)
        endpoints = [f"http://{host}:{port}{application['route_prefix']}" for application in applications]
        for args, endpoint in zip(models, endpoints, strict=True):
            print(serving_line(args, endpoint))
        for application, endpoint, weights in zip(applications, endpoints, published, strict=True):
            replicas = wait_running(application["name"])
            summary = memory_summary(endpoint, replicas, weights.nbytes, weights.owner_pid)
            print(f"{application['name']}: {summary}" if len(applications) > 1 else summary, flush=True)
        if router is not None:
            wait_running(router["name"])
            names = ", ".join(m["name"] for m in router["args"]["models"])
            print(f"OpenAI endpoint for {names}: base_url http://{host}:{port}/v1 (the request's model picks)")
        dashboard = f"http://{context.dashboard_url}" if context.dashboard_url else None
        if dashboard:
            gcs = ray.get_runtime_context().gcs_address
            print(f"Ray dashboard at {dashboard}: `serve status -a {dashboard}`, `serve config -a {dashboard}`, "
                  f"`ray status --address {gcs}`", flush=True)  # fmt: skip
        # Ctrl-C and `kill` (SIGTERM) both stop cleanly, even where SIGINT was inherited as ignored.
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            print("shutting down", flush=True)
    finally:
        if address is not None:  # a cluster we joined keeps running: take back what we put there
            if serve.context._get_global_client(raise_if_no_controller_running=False):
                for application in applications:
                    serve.delete(application["name"])  # its replicas release its weights as they stop
            for weights in published:
                with contextlib.suppress(WeightsNotFoundError):  # released with its application
                    release(weights)
        ray.shutdown()  # an embedded Ray stops with everything in it


def serving_line(args: AppArgs, endpoint: str) -> str:
    """Where a model answers, and how to call it."""
    if args.task == "tensor":
        return f'serving {args.name} at {endpoint} (POST JSON {{"inputs": ...}}; GET {endpoint}/-/info)'
    return (f"serving {args.name} at {endpoint}: OpenAI-compatible API with base URL {endpoint}/v1 "
            f"(POST /v1/chat/completions, /v1/completions, /v1/embeddings; GET {endpoint}/-/info)")  # fmt: skip


def deploy(applications: list[dict[str, Any]], host: str, port: int) -> None:
    """Deploy the applications in one config, the way `serve deploy` and KubeRay do."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": host, "port": port})
    config = ServeDeploySchema.model_validate({"applications": applications})
    client = serve.context._get_global_client()
    assert client is not None  # serve.start connected it
    client.deploy_apps(config)


def wait_running(name: str, timeout_s: float = 900) -> int:
    """Wait for the application to run; its replica count. A failed start raises with the replica's own error."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(name)
        status = str(app.status) if app else "NOT_STARTED"
        if status.endswith("RUNNING"):
            states = [d.replica_states for d in app.deployments.values()]  # type: ignore[union-attr]
            return sum(n for s in states for state, n in s.items() if str(state).endswith("RUNNING"))
        if status.endswith(("DEPLOY_FAILED", "UNHEALTHY")):
            messages = [d.message for d in app.deployments.values() if d.message] or [app.message]  # type: ignore[union-attr]
            raise ReplicaStartError(f"the replicas of {name} failed to start: {replica_error(' '.join(messages))}")
        time.sleep(0.5)
    raise ReplicaStartError(f"the replicas of {name} were not running after {timeout_s:.0f} s; see `serve status`")


#: The last line of a Python traceback: `package.module.SomeError: message`.
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Exit)): ?(.*)$")


def replica_error(message: str) -> str:
    """The exception a replica died of, from Serve's deployment message (which embeds its traceback)."""
    lines = message.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        found = _EXCEPTION_LINE.match(lines[i].strip())
        if found and not lines[i].startswith(" "):
            rest = " ".join(line.strip() for line in lines[i + 1 :] if line.strip())
            return f"{found.group(1)}: {' '.join(filter(None, [found.group(2), rest]))}"
    return message.strip() or "no message (see the replica logs under the Ray session's logs folder)"


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
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal, even at once, must not cut the clean-up short
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
    if len(pids) == 1:
        return (
            f"1 replica attached to one {format_bytes(model_bytes)} copy: replica and owner use "
            f"{format_bytes(total)} in all (PSS); more replicas share the same copy"
        )
    extra = format_bytes((len(pids) - 1) * model_bytes)
    return (
        f"{len(pids)} replicas share one {format_bytes(model_bytes)} copy: replicas and owner use "
        f"{format_bytes(total)} in all (PSS); a private copy each would add {extra}"
    )
