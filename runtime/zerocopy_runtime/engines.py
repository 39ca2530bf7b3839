"""The engines behind a replica's routes, one per kind of model, behind one small interface.

An engine turns requests into answers on weights the replica already holds. It
knows nothing of HTTP (the ingress in `serve` routes to it) nor of publishing
(`replica_weights` does that). Blocking model calls run off the event loop,
so health checks and `/-/info` are answered while a batch runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import torch
from ray import serve
from torch import nn

from .config import AppArgs
from .lora import AdapterBank
from .tensor_codec import BadRequest, Handler, load_handler
from .text import EmbeddingEngine, GenerationEngine
from .weights import PublishedModel

__all__ = ["Engine", "TensorEngine", "build_engine", "vllm_engine"]


class Engine(Protocol):
    """What the replica needs from an engine besides its routes."""

    task: str

    def use(self, model: nn.Module) -> None:
        """Serve from a re-attached copy of the weights from now on (requests in flight finish on the old)."""
        ...

    def check(self) -> None:
        """Raise when the engine can no longer serve: Serve then replaces the replica."""
        ...

    def info(self) -> dict[str, Any]:
        """The engine's fields of `ReplicaInfo`."""
        ...

    def shutdown(self) -> None:
        """Stop what the engine started (threads, processes)."""
        ...


class TensorEngine:
    """JSON tensors in and out through a handler (`tensor_codec`), requests batched by Serve's `@serve.batch`."""

    task = "tensor"

    def __init__(self, handler: Handler, model: nn.Module, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.handler, self.model = handler, model
        self.largest_batch = 0
        # serve.batch methods carry these setters; its type stubs do not say so.
        self.batched.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.batched.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    def use(self, model: nn.Module) -> None:
        self.model = model

    def check(self) -> None:
        """Nothing of its own to fail: the handler runs in the replica's threads."""

    def shutdown(self) -> None:
        """Nothing to stop."""

    def info(self) -> dict[str, Any]:
        return {"task": self.task, "largest_batch": self.largest_batch}

    async def run(self, body: Any) -> Any:
        """One request's answer, or the BadRequest that refuses it (the request's batch keeps its other answers)."""
        return await self.batched(body)

    @serve.batch(max_batch_size=1)
    async def batched(self, bodies: list[Any]) -> list[Any]:
        """One handler call per batch; a bad request fails alone, not its whole batch."""
        self.largest_batch = max(self.largest_batch, len(bodies))
        return await asyncio.to_thread(self._run_or_one_by_one, self.model, bodies)

    def _run_or_one_by_one(self, model: nn.Module, bodies: list[Any]) -> list[Any]:
        try:
            return self._run(model, bodies)
        except BadRequest:
            return [self._one(model, body) for body in bodies]

    def _one(self, model: nn.Module, body: Any) -> Any:
        try:
            return self._run(model, [body])[0]
        except BadRequest as exc:
            return exc

    def _run(self, model: nn.Module, bodies: list[Any]) -> list[Any]:
        with torch.inference_mode():
            return self.handler(model, bodies)


def build_engine(
    args: AppArgs, model: nn.Module, folder: Path, handler: Handler | None = None
) -> TensorEngine | GenerationEngine | EmbeddingEngine:
    """The engine for the args' task on an attached model (the transformers engines and the tensor engine);
    `handler`: the tensor task's handler, if the caller resolved it already. A causal LM's engine holds an
    `AdapterBank`, empty until the replica's config names adapters."""
    batching = (args.batching.max_batch_size, args.batching.batch_wait_timeout_s)
    if args.task == "tensor":
        return TensorEngine(handler or load_handler(args.handler), model, *batching)
    if args.task == "embeddings":
        return EmbeddingEngine(model, folder, args.name)
    adapters = None
    if args.task == "text-generation":
        adapters = AdapterBank()
        adapters.use(model)
    return GenerationEngine(args.task, model, folder, args.name, batching, adapters=adapters)


def vllm_engine(args: AppArgs, published: PublishedModel, folder: Path) -> GenerationEngine:
    """vLLM's engine on this revision's published weights (its own processes attach to them), behind the
    same generation routes as the transformers engine."""
    from ._vllm import PublishedVllm

    batching = (args.batching.max_batch_size, args.batching.batch_wait_timeout_s)
    return GenerationEngine(args.task, None, folder, args.name, batching, PublishedVllm(args, published, folder))
