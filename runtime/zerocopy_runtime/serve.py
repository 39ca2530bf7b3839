"""The Ray Serve application: replicas that attach to weights published once per node.

`build_app(args)` is what a RayService's `serveConfigV2` (or `serve run`)
imports. The first replica of a model revision publishes it through a
detached owner; every later replica, scale-up or restart finds the owner by
name and attaches in milliseconds.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from ray.serve import Application
from ray.serve._private.constants import SERVE_NAMESPACE
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from ._architecture import architecture_factory
from ._errors import AlreadyPublishedError, PublishInProgressError, WeightsNotFoundError, ZeroCopyError
from ._metrics import ReplicaMetrics
from ._owner import NAMESPACE, actor_name, published_names
from ._source import (
    is_gguf_source,
    is_remote,
    local_path,
    model_folder,
    published_folder,
    revision,
    verify,
    write_side_files,
)
from .config import AppArgs
from .contract import ReplicaInfo, weights_model, weights_name, weights_revision
from .handlers import BadRequest, fingerprint, load_handler
from .openai_protocol import ApiError
from .text import TextEngine
from .weights import Progress, PublishedModel, attach, attach_report, lookup, publish, release

#: How long a replica waits for another replica's publish of the same revision.
PUBLISH_WAIT_S = 1800.0
#: How long a stopping replica asks Serve's controller whether its application is going away.
CONTROLLER_TIMEOUT_S = 5.0

logger = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log, tagged with its id


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: validate the args, bind the deployment."""
    return ZeroCopyDeployment.bind(AppArgs.model_validate(args).model_dump())  # type: ignore[attr-defined]


def find_or_publish(
    args: AppArgs, progress: Progress | None = None, timeout_s: float = PUBLISH_WAIT_S, verified: bool = False
) -> PublishedModel:
    """The published weights of this revision, publishing them if no replica has yet.

    Replicas that start together (a new revision, a restart after the owner
    died) race for the owner's name: one publishes, the others wait for its
    copy, so the weights are read and stored exactly once. `verified`: the caller has already
    checked the file against model.sha256 (hashing gigabytes twice helps no one).
    A remote checkpoint is downloaded only to publish it: its revision is named from the source's listing, and
    it is published with its side files (`model_files`), so a replica on another node reads nothing from the
    source, and pulls the bytes from the publishing node's store into its own.
    """
    name = weights_name(args.name, revision(args.model))  # one published copy per model and revision
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return lookup(name)
        except PublishInProgressError:
            if time.monotonic() > deadline:
                raise ZeroCopyError(
                    f"Weights {name!r} were still being published after {timeout_s:.0f} s; "
                    "check the publishing replica's log (a stuck or very slow checkpoint read)."
                ) from None
            time.sleep(0.2)
            continue
        except WeightsNotFoundError:
            pass
        path = local_path(args.model)
        if not verified:
            verify(path, args.model)
            verified = True
        files = model_folder(path) if is_remote(args.model.uri) else None
        try:
            return publish(path, name=name, progress=progress, dtype=args.model.dtype, files=files)
        except AlreadyPublishedError:
            time.sleep(0.2)  # another replica won the race: wait for its copy
            continue


def model_files(args: AppArgs, published: PublishedModel | None) -> Path:
    """The model's folder on this node (config, tokenizer, chat template): beside a local checkpoint, or, for a
    remote one, written once into the node's cache from the files published with its weights."""
    if published is None or published.files is None:
        return model_folder(local_path(args.model))
    folder = published_folder(published.name)  # written by an earlier replica on this node
    return folder if folder.exists() else write_side_files(published.name, ray.get(published.files))


def _register_replica(published: PublishedModel) -> None:
    context = ray.get_runtime_context()
    name = context.get_actor_name()
    if name:  # Serve replicas are named actors; their owner learns who uses each revision, and for which app
        owner = ray.get_actor(actor_name(published.name), namespace=published.namespace)
        app = serve.get_replica_context().app_name
        ray.get(owner.register.remote(name, SERVE_NAMESPACE, app))  # replicas are named there, not in the job's


def release_unused_revisions(model: str, keep: str) -> list[str]:
    """Release revisions of `model` older than `keep` once no replica attached to them is alive.

    Runs in every new replica and health check, so the old buffers go soon
    after a rolling update has stopped the last replica of the old revision.
    Newer revisions are never touched: their first replica may still be
    publishing, before any replica has registered.
    """
    released: list[str] = []
    try:
        kept_since, _, _ = _usage(keep)
    except (ValueError, ray.exceptions.RayError):
        return released
    for name in published_names():
        if name == keep or weights_model(name) != model:
            continue
        try:
            since, in_use, _ = _usage(name)
            if since < kept_since and not in_use:
                release(name)
                released.append(name)
        except (ValueError, ZeroCopyError, ray.exceptions.RayError):
            continue  # released or replaced concurrently: nothing to do
    return released


def live_applications(timeout_s: float = CONTROLLER_TIMEOUT_S) -> set[str]:
    """The Serve applications that exist and are not being deleted, from Serve's public status API.

    Bounded: `serve.status()` takes no timeout, and a busy controller must not hold a health check or a
    replica's shutdown (raises TimeoutError).
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zerocopy-serve-status")
    try:
        status = pool.submit(serve.status).result(timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)
    return {name for name, app in status.applications.items() if app.status != "DELETING"}


def application_deleted(app: str, timeout_s: float = CONTROLLER_TIMEOUT_S) -> bool:
    """Whether Serve is deleting `app` (or has deleted it), as opposed to scaling or updating it in place."""
    return app not in live_applications(timeout_s)


def release_orphaned() -> list[str]:
    """Release published copies whose Serve applications are all gone and that no live replica uses.

    A model deleted while it has no replica (scaled to zero) has no replica to release its copy on the way
    out; the health checks of every other model's replicas on the cluster do it. Copies that no Serve replica
    ever used (a revision still being published, weights published from Python) are never touched.
    """
    released: list[str] = []
    live = live_applications()
    for name in published_names():
        try:
            _, in_use, apps = _usage(name)
            if apps and not in_use and not live.intersection(apps):
                release(name)
                released.append(name)
        except (ValueError, ZeroCopyError, ray.exceptions.RayError):
            continue  # released or replaced concurrently: nothing to do
    return released


def release_model(model: str) -> list[str]:
    """Release every published revision of `model`; another replica may have released some first."""
    released: list[str] = []
    for name in published_names():
        if weights_model(name) == model:
            try:
                release(name)
                released.append(name)
            except WeightsNotFoundError:
                continue
    return released


def _usage(name: str) -> tuple[float, bool, list[str]]:
    owner = ray.get_actor(actor_name(name), namespace=NAMESPACE)
    usage: Any = ray.get(owner.usage.remote(), timeout=10)
    return float(usage[0]), bool(usage[1]), list(usage[2])


@serve.deployment
class ZeroCopyDeployment:
    """One replica: attaches in its constructor, serves JSON over HTTP."""

    def __init__(self, args: dict[str, Any]) -> None:
        started = time.perf_counter()
        self.args = AppArgs.model_validate(args)
        self.handler = load_handler(self.args.handler)
        device = self.args.device
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.metrics = ReplicaMetrics(self.args.name, self.args.handler)
        self.reattached = 0
        self.text: TextEngine | None = None
        self.vllm: Any = None
        batching = (self.args.batching.max_batch_size, self.args.batching.batch_wait_timeout_s)
        # A local model's structure is checked before its weights are read; a remote one's folder comes with them.
        published = find_or_publish(self.args) if is_remote(self.args.model.uri) else None
        folder = model_files(self.args, published)
        if self.args.engine == "vllm":
            self._start_vllm(published or find_or_publish(self.args), folder, batching)
        else:
            assert self.args.model.architecture is not None  # AppArgs requires it for this engine
            gguf = is_gguf_source(self.args.model)
            self.factory = architecture_factory(self.args.model.architecture, folder, self.args.model.dtype, gguf=gguf)
            self._attach(published)
            if self.args.task != "tensor":
                self.text = TextEngine(self.args.task, self.model, folder, self.args.name, batching)
        release_unused_revisions(self.args.name, keep=self.published.name)
        self.largest_batch = 0
        # serve.batch methods carry these setters; its type stubs do not say so.
        self.batched.set_max_batch_size(self.args.batching.max_batch_size)  # type: ignore[attr-defined]
        self.batched.set_batch_wait_timeout_s(self.args.batching.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self.startup_seconds = time.perf_counter() - started  # replica start to ready: the cost of a scale-up
        self._serving = True

    def _start_vllm(self, published: PublishedModel, folder: Path, batching: tuple[int, float]) -> None:
        """vLLM's engine, loading this revision's published weights (its own processes attach to them)."""
        from ._vllm import PublishedVllm

        self.published = published
        _register_replica(self.published)
        self.vllm = PublishedVllm(self.args, self.published, folder)
        self.report, self.fingerprint = self.vllm.report, 0
        self.metrics.attached(self.report.attach_seconds, self.report.bytes_shared)
        self.text = TextEngine(self.args.task, None, folder, self.args.name, batching, self.vllm)

    def _attach(self, published: PublishedModel | None = None) -> None:
        """Point a fresh model at this revision's weights, finding (or publishing) them unless given."""
        published = published or find_or_publish(self.args)
        _register_replica(published)
        model = attach(published, factory=self.factory, write_guard=self.args.write_guard, device=self.device).eval()
        report = attach_report(model)
        # Swapped at once: a request in flight finishes on the model it started with.
        self.published, self.model, self.report = published, model, report
        if self.text is not None:
            self.text.use(model)
        # On a GPU the weights are a private device copy: the check below is for shared host pages.
        self.fingerprint = fingerprint(model) if self.device == "cpu" else 0
        self.metrics.attached(report.attach_seconds, report.bytes_shared)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        if path.endswith("/-/info"):
            return JSONResponse(self.info().model_dump())
        if self.text is not None:
            return await self._openai(request, path)
        try:
            body = await request.json()
        except ValueError as exc:
            self.metrics.request(error="bad_request")
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        try:
            result = await self.batched(body)
        except Exception:
            self.metrics.request(error="internal")
            raise
        if isinstance(result, BadRequest):
            self.metrics.request(error="bad_request")
            return JSONResponse({"error": str(result)}, status_code=400)
        self.metrics.request()
        return JSONResponse(result)

    async def _openai(self, request: Request, path: str) -> Response:
        """The OpenAI-compatible routes under the route prefix; errors in OpenAI's shape."""
        assert self.text is not None
        try:
            if path.endswith("/v1/models") and request.method == "GET":
                return JSONResponse(self.text.models())
            routes = {
                "/v1/chat/completions": self.text.chat,
                "/v1/completions": self.text.completions,
                "/v1/embeddings": self.text.embeddings,
            }
            route = next((r for r in routes if path.endswith(r)), None)
            if route is None or request.method != "POST":
                routes_text = (
                    "POST <route>/v1/chat/completions, /v1/completions or /v1/embeddings, GET <route>/v1/models"
                )
                raise ApiError(404, f"{request.method} {path} is not a route of {self.args.name}: {routes_text}")
            try:
                body = await request.json()
            except ValueError as exc:
                raise ApiError(400, f"the body is not JSON: {exc}") from None
            result = routes[route](body)
            answer: Any = await result if inspect.isawaitable(result) else result
        except ApiError as exc:
            self.metrics.request(error="bad_request" if exc.status < 500 else "internal")
            return JSONResponse(exc.body(), status_code=exc.status)
        self.metrics.request()
        if isinstance(answer, dict):
            return JSONResponse(answer)
        return StreamingResponse(answer, media_type="text/event-stream")

    @serve.batch(max_batch_size=1)
    async def batched(self, bodies: list[Any]) -> list[Any]:
        """One handler call per batch; a bad request fails alone, not its whole batch."""
        self.largest_batch = max(self.largest_batch, len(bodies))
        # Off the event loop: health checks, /-/info and the next batch's requests are taken meanwhile.
        return await asyncio.to_thread(self._run_or_one_by_one, bodies)

    def _run_or_one_by_one(self, bodies: list[Any]) -> list[Any]:
        try:
            return self._run(bodies)
        except BadRequest:
            return [self._one(body) for body in bodies]

    def _one(self, body: Any) -> Any:
        try:
            return self._run([body])[0]
        except BadRequest as exc:
            return exc

    def _run(self, bodies: list[Any]) -> list[Any]:
        with torch.inference_mode():
            return self.handler(self.model, bodies)

    def info(self) -> ReplicaInfo:
        """The answer at `/-/info`; a text task's engine adds its own fields (its batches count as largest)."""
        fields: dict[str, Any] = {
            "name": self.args.name,
            "weights": self.published.name,
            "revision": weights_revision(self.published.name),
            "bytes_shared": self.report.bytes_shared,
            "tensor_count": self.report.tensor_count,
            "attach_seconds": self.report.attach_seconds,
            "shared": self.report.in_object_store,
            "write_guard": self.report.write_guard,
            "node_id": self.report.node_id,
            "pid": os.getpid(),
            "owner_pid": self.published.owner_pid,
            "object_ids": [ref.hex() for ref in self.published.refs],
            "max_batch_size": self.args.batching.max_batch_size,
            "largest_batch": self.largest_batch,
            "reattached": self.reattached,
            "startup_seconds": self.startup_seconds,
        }
        return ReplicaInfo(**fields | (self.text.info() if self.text is not None else {"task": "tensor"}))

    def __del__(self) -> None:
        """Serve's shutdown hook: vLLM's engine processes go with the replica, the weights with the application.

        The owner outlives replicas so that restarts, scale-downs and in-place
        updates re-attach instead of re-publishing; only once the application
        itself is deleted does nothing use its weights any more.
        """
        if getattr(self, "vllm", None) is not None:
            self.vllm.shutdown()
        if not getattr(self, "_serving", False):  # never started, or Serve already ran this (Python may again)
            return
        self._serving = False
        try:
            if application_deleted(serve.get_replica_context().app_name):
                logger.info("application deleted: released %s", release_model(self.args.name))
        except Exception:  # a stuck or gone controller must not fail the shutdown
            logger.exception("could not tell whether %s's application is deleted; its weights stay", self.args.name)

    def check_health(self) -> None:
        """Serve restarts a replica whose weights are no longer intact; a lost owner is replaced in place.

        When the owner of the shared copy dies (killed, or its node lost), the
        pages this replica holds stay valid until it lets go of them, so it
        re-attaches instead of failing: the first replica on the node to notice
        publishes again, the others wait for that copy, and no replica stops serving.
        """
        if self.vllm is not None:  # vLLM holds its own copy: the engine's life is what matters here
            self.vllm.check()
            self._tidy()
            return
        try:
            current: PublishedModel | None = lookup(self.published.name)
        except WeightsNotFoundError:
            current = None
        # Another replica may have published again under the same name already: a new owner, a new copy.
        if current is None or [r.hex() for r in current.refs] != [r.hex() for r in self.published.refs]:
            self._attach()
            self.reattached += 1
        if self.device == "cpu" and fingerprint(self.model) != self.fingerprint:
            raise RuntimeError("The attached weights changed or moved since attach; restarting this replica.")
        self._tidy()

    def _tidy(self) -> None:
        """Release this model's superseded revisions, and copies of models deleted at zero replicas."""
        release_unused_revisions(self.args.name, keep=self.published.name)
        try:
            released = release_orphaned()
        except (ray.exceptions.RayError, TimeoutError):  # a busy or restarting controller: the next check tries again
            logger.warning("could not list Serve's applications; orphaned weights are released later")
            return
        if released:
            logger.info("released the weights of deleted applications: %s", released)
