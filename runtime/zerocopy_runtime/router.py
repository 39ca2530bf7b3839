"""One OpenAI-compatible endpoint for many models: routes each request by its `model` field.

A ZeroCopyCluster (and `zerocopy serve` of several models) adds this application at `/`, so one `base_url`
(`.../v1`) reaches every text model of the cluster. It forwards the parsed body to the model's replicas
through Serve deployment handles (no second HTTP hop), streaming included; each model's own route keeps
working beside it. Like Ray Serve LLM's `build_openai_app`, but over applications that each hold their own
shared weights.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from ray import serve
from ray.serve import Application
from starlette.responses import JSONResponse, Response, StreamingResponse

from .contract import ROUTER_DEPLOYMENT, RoutedModel, RouterArgs
from .openai_protocol import ApiError, ModelCard, ModelList

__all__ = ["OpenAIRouter", "build_router"]

#: The deployment each model's application runs (`serve.ZeroCopyDeployment`).
MODEL_DEPLOYMENT = "ZeroCopyDeployment"
#: The OpenAI routes, and the tasks that serve each.
ROUTE_TASKS: dict[str, tuple[str, ...]] = {
    "chat": ("text-generation", "text2text-generation"),
    "completions": ("text-generation", "text2text-generation"),
    "embeddings": ("embeddings",),
}
#: How long the router trusts Serve's word on which applications are running.
STATUS_TTL_S = 2.0


def build_router(args: dict[str, Any]) -> Application:
    """Serve's application builder for the router."""
    return OpenAIRouter.bind(RouterArgs.model_validate(args).model_dump())  # type: ignore[attr-defined]


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise ApiError(400, f"the body is not JSON: {exc}") from None


async def _events(stream: AsyncIterator[Any]) -> AsyncIterator[str]:
    async for event in stream:
        yield str(event)


def _path(route: str) -> str:
    return "chat/completions" if route == "chat" else route


def _names(names: list[str]) -> str:
    return ", ".join(names) if names else "no model"


# Serve's ingress freezes a copy of the app when the class below is decorated: what its routes call must be
# defined above it.
app = FastAPI(title="zerocopy OpenAI router", docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(app)
class OpenAIRouter:
    """The cluster's `/v1`: `GET /v1/models` and the three POST routes, each to the model its body names."""

    def __init__(self, args: dict[str, Any]) -> None:
        self.models = {m.name: m for m in RouterArgs.model_validate(args).models if m.task != "tensor"}
        self.created = int(time.time())
        self._running: tuple[float, set[str]] = (0.0, set())

    @app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        running = await self._running_applications()
        names = [
            name
            for m in self.models.values()
            if m.application in running
            for name in [m.name, *(f"{m.name}:{a}" for a in m.adapters)]
        ]
        return JSONResponse(ModelList(data=[ModelCard(id=n, created=self.created) for n in names]).model_dump())

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request) -> Response:
        return await self._forward("chat", request)

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._forward("completions", request)

    @app.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        return await self._forward("embeddings", request)

    async def _forward(self, route: str, request: Request) -> Response:
        try:
            body = await _json(request)
            model = await self._model_for(route, body)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=model.application)
        stream: Any = handle.options(stream=True).openai.remote(route, body)  # a DeploymentResponseGenerator
        first: dict[str, Any] = await stream.__anext__()  # the answer, or {"stream": true} before the events
        if not first.get("stream"):
            return JSONResponse(first["body"], status_code=first["status"])
        return StreamingResponse(_events(stream), media_type="text/event-stream")

    async def _model_for(self, route: str, body: Any) -> RoutedModel:
        """The model the body names, ready and serving this route; else OpenAI's error naming those that do."""
        name = body.get("model") if isinstance(body, dict) else None
        serving = sorted(
            n
            for m in self.models.values()
            if m.task in ROUTE_TASKS[route]
            for n in [m.name, *(f"{m.name}:{a}" for a in m.adapters)]
        )
        if not isinstance(name, str) or not name:
            raise ApiError(400, f"model: required; this endpoint serves {_names(serving)}", param="model")
        base, _, adapter = name.partition(":")  # `<model>:<adapter>`: the model's own application serves it
        model = self.models.get(name if not adapter else base)
        if model is not None and adapter and adapter not in model.adapters:
            model = None
        if model is None:
            message = f"The model {name!r} does not exist here; /v1/{_path(route)} serves {_names(serving)}"
            raise ApiError(404, message, param="model", code="model_not_found")
        if model.task not in ROUTE_TASKS[route]:
            message = f"{name} is a {model.task} model and does not serve /v1/{_path(route)}"
            message += f"; models that do: {_names(serving)}"
            raise ApiError(400, message, param="model")
        if model.application not in await self._running_applications():
            message = f"{name} is not ready yet (its replicas are starting or failing); retry shortly"
            raise ApiError(503, message, kind="service_unavailable", code="model_not_ready")
        return model

    async def _running_applications(self) -> set[str]:
        """The Serve applications that are RUNNING, from Serve's public status API (cached briefly)."""
        at, running = self._running
        if time.monotonic() - at > STATUS_TTL_S:
            status = await asyncio.to_thread(serve.status)
            running = {name for name, app in status.applications.items() if app.status == "RUNNING"}
            self._running = (time.monotonic(), running)
        return running
