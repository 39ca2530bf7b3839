"""The Ray Serve application: a replica is its weights, an engine, and an HTTP ingress.

`build_app(args)` is what a RayService's `serveConfigV2` (or `serve run`)
imports. Each replica holds `ReplicaWeights` (published once per node,
attached in milliseconds), one `Engine` for the model's task, and the routes
below: a FastAPI app under Serve's `@serve.ingress`, so routing, methods and
404s are FastAPI's, and the OpenAI bodies are the typed models of `openai_protocol`.

Routes, under the application's route prefix:

- `POST /`: JSON tensors in and out (task tensor; `tensor_codec` says how).
- `GET /v1/models`, `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`: the OpenAI-compatible
  routes of the text tasks, errors in OpenAI's shape.
- `GET /-/info`: `ReplicaInfo`, what the operator reads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ._architecture import architecture_factory
from ._errors import ZeroCopyError
from ._metrics import ReplicaMetrics
from ._source import is_gguf_source, is_remote
from .config import AppArgs, ReplicaConfig
from .contract import ReplicaInfo
from .engines import Engine, TensorEngine, build_engine, vllm_engine
from .lora import LoraWeights, read_adapter
from .openai_protocol import ApiError
from .replica_weights import ReplicaWeights, attach_adapter, find_or_publish, model_files
from .tensor_codec import BadRequest, load_handler
from .text import GenerationEngine, TextEngine
from .weights import release

__all__ = ["ZeroCopyDeployment", "build_app"]

ROUTES = "POST <route>/ (tensors), POST <route>/v1/chat/completions, /v1/completions or /v1/embeddings, " + (
    "GET <route>/v1/models, GET <route>/-/info"
)

logger = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log

app = FastAPI(title="zerocopy replica", docs_url=None, redoc_url=None, openapi_url=None)


class _PrefixIsRoot:
    """The route prefix itself (`/mlp`, no slash) is the root route: answered, not redirected to `/mlp/` (a
    client would resend a POST as a GET, or not at all)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == scope.get("root_path", ""):
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


app.add_middleware(_PrefixIsRoot)


@app.exception_handler(HTTPException)
async def _no_such_route(request: Request, exc: HTTPException) -> JSONResponse:
    """A path or method the replica does not serve: OpenAI's error shape, naming the routes it does."""
    message = f"{request.method} {request.url.path} is not a route of this model: {ROUTES}"
    body = ApiError(exc.status_code, message if exc.status_code in (404, 405) else str(exc.detail)).body()
    return JSONResponse(body, status_code=exc.status_code)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: validate the args, bind the deployment."""
    return ZeroCopyDeployment.bind(AppArgs.model_validate(args).model_dump())  # type: ignore[attr-defined]


@serve.deployment
@serve.ingress(app)
class ZeroCopyDeployment:
    """One replica: attaches in its constructor, serves the routes of its engine."""

    def __init__(self, args: dict[str, Any]) -> None:
        started = time.perf_counter()
        self.args = AppArgs.model_validate(args)
        # First: a handler that cannot be imported fails the replica before any weights are read.
        handler = load_handler(self.args.handler) if self.args.task == "tensor" else None
        device = self.args.device
        device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.metrics = ReplicaMetrics(self.args.name, self.args.handler)
        # A local model's structure is checked before its weights are read; a remote one's folder comes with them.
        published = find_or_publish(self.args) if is_remote(self.args.model.uri) else None
        folder = model_files(self.args, published)
        self.engine: Engine
        if self.args.engine == "vllm":
            self.weights = ReplicaWeights(self.args, None, device, published)
            engine = vllm_engine(self.args, self.weights.published, folder)
            self.engine, self.weights.report = engine, engine.generator.report  # type: ignore[attr-defined]
        else:
            assert self.args.model.architecture is not None  # AppArgs requires it for this engine
            gguf = is_gguf_source(self.args.model)
            factory = architecture_factory(self.args.model.architecture, folder, self.args.model.dtype, gguf=gguf)
            self.weights = ReplicaWeights(self.args, factory, device, published)
            assert self.weights.model is not None
            self.engine = build_engine(self.args, self.weights.model, folder, handler)
        self.adapter_copies: dict[str, str] = {}  # adapter name -> its published copy
        self.adapter_errors: dict[str, str] = {}  # adapter name -> why it is not served
        self._attached()
        self.startup_seconds = time.perf_counter() - started  # replica start to ready: the cost of a scale-up
        self._serving = True

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve's in-place update (the deployment's `user_config`): the LoRA adapters to serve.

        A new adapter is published once per node (the first replica to need it) and attached zero-copy; one
        no longer named is dropped and its copy released. No replica restarts and the base weights are not
        read again. An adapter that cannot be read or does not fit the model is left out with the reason
        (`/-/info` `adapter_errors`, which the operator turns into the model's AdaptersReady condition), and
        the model keeps serving its other names.
        """
        wanted = {a.name: a for a in ReplicaConfig.model_validate(config or {}).adapters}
        engine = self.engine
        bank = engine.adapters if isinstance(engine, GenerationEngine) else None
        if bank is None:
            if wanted:
                raise ZeroCopyError(f"{self.args.name} is a {engine.task} model: adapters go with text-generation")
            return
        model = self.weights.model
        assert model is not None
        loaded: dict[str, tuple[LoraWeights, str]] = {}
        errors: dict[str, str] = {}
        for name, adapter in wanted.items():
            if name not in bank.adapters:
                try:
                    published, folder, tensors = attach_adapter(self.args, adapter)
                    loaded[name] = (read_adapter(name, folder, tensors, model), published.name)
                except (ZeroCopyError, OSError, ValueError) as exc:  # unreadable or unfit: the others still serve
                    errors[name] = f"adapter {name} ({adapter.uri}) is not served: {exc}"
                    logger.warning(errors[name])
        for name in [n for n in bank.adapters if n not in wanted]:
            bank.remove(name)
            with contextlib.suppress(ZeroCopyError):
                release(self.adapter_copies.pop(name))  # another replica may have released it first
        for name, (weights, copy) in loaded.items():
            bank.add(weights)
            self.adapter_copies[name] = copy
        self.adapter_errors = errors

    def _attached(self) -> None:
        assert self.weights.report is not None
        self.metrics.attached(self.weights.report.attach_seconds, self.weights.report.bytes_shared)

    # --- routes ---------------------------------------------------------------------------------------------------

    @app.get("/-/info")
    def info_route(self) -> JSONResponse:
        return JSONResponse(self.info().model_dump())

    @app.post("/")
    async def tensors(self, request: Request) -> JSONResponse:
        """JSON tensors; errors as `{"error": "..."}` with 400."""
        if not isinstance(self.engine, TensorEngine):
            message = f"{self.args.name} serves task {self.engine.task} on the OpenAI routes: {ROUTES}"
            self.metrics.request(error="bad_request")
            return JSONResponse(ApiError(404, message, code="not_found").body(), status_code=404)
        try:
            body = await request.json()
        except ValueError as exc:
            self.metrics.request(error="bad_request")
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        try:
            result = await self.engine.run(body)
        except Exception:
            self.metrics.request(error="internal")
            raise
        if isinstance(result, BadRequest):
            self.metrics.request(error="bad_request")
            return JSONResponse({"error": str(result)}, status_code=400)
        self.metrics.request()
        return JSONResponse(result)

    @app.get("/v1/models")
    async def models(self) -> Response:
        try:
            return JSONResponse(self._text("/v1/models").models())
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._http("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._http("completions", request)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._http("embeddings", request)

    async def openai(self, route: str, body: Any) -> AsyncIterator[dict[str, Any] | str]:
        """An OpenAI route called through a deployment handle (the cluster's `router`), streamed: first
        `{"status", "body"}`, or `{"stream": true}` and then the stream's server-sent events."""
        try:
            answer = await self._answer(route, body)
        except ApiError as exc:
            yield {"status": exc.status, "body": exc.body()}
            return
        if isinstance(answer, dict):
            yield {"status": 200, "body": answer}
            return
        yield {"stream": True}
        async for event in answer:
            yield event

    async def _http(self, route: str, request: Request) -> Response:
        """An OpenAI route over HTTP: errors in OpenAI's shape, streams as server-sent events."""
        try:
            try:
                body = await request.json()
            except ValueError as exc:
                self.metrics.request(error="bad_request")
                raise ApiError(400, f"the body is not JSON: {exc}") from None
            answer = await self._answer(route, body)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        if isinstance(answer, dict):
            return JSONResponse(answer)
        return StreamingResponse(answer, media_type="text/event-stream")

    async def _answer(self, route: str, body: Any) -> dict[str, Any] | AsyncIterator[str]:
        """The engine's answer to one OpenAI request (`route`: chat, completions or embeddings), counted."""
        try:
            if route == "chat":
                answer: dict[str, Any] | AsyncIterator[str] = await self._text("/v1/chat/completions").chat(body)
            elif route == "completions":
                answer = await self._text("/v1/completions").completions(body)
            else:
                answer = await self._text("/v1/embeddings").embeddings(body)
        except ApiError as exc:
            self.metrics.request(error="bad_request" if exc.status < 500 else "internal")
            raise
        self.metrics.request()
        return answer

    def _text(self, route: str) -> TextEngine:
        """The text engine, or a 404 saying that this is a tensor model."""
        if isinstance(self.engine, TextEngine):
            return self.engine
        raise ApiError(
            404, f"{route} is not served by {self.args.name}, whose task is tensor: POST JSON tensors to its route",
            code="not_found",
        )  # fmt: skip

    # --- what Serve and the operator call -----------------------------------------------------------------------

    def info(self) -> ReplicaInfo:
        """The answer at `/-/info`: the weights' fields, then the engine's (a generator counts its own batches)."""
        assert self.weights.report is not None
        fields = self.weights.info(self.weights.report) | {
            "max_batch_size": self.args.batching.max_batch_size,
            "largest_batch": 0,
            "startup_seconds": self.startup_seconds,
        }
        errors = {"adapter_errors": self.adapter_errors} if self.adapter_errors else {}
        return ReplicaInfo(**fields | self.engine.info() | errors)

    def check_health(self) -> None:
        """Serve restarts a replica whose weights are no longer intact or whose engine died; a lost owner is
        replaced in place (`ReplicaWeights.check`)."""
        self.engine.check()
        if self.weights.check():
            assert self.weights.model is not None
            self.engine.use(self.weights.model)
            self._attached()

    def __del__(self) -> None:
        """Serve's shutdown hook: the engine's threads and processes go with the replica, the weights with the
        application."""
        if not getattr(self, "_serving", False):  # never started, or Serve already ran this (Python may again)
            return
        self._serving = False
        self.engine.shutdown()
        self.weights.close()
