"""Request handlers: JSON bodies in, JSON results out, one call per batch.

A handler is `handler(model, bodies: list[dict]) -> list[object]`. Raising
`BadRequest` answers that request with HTTP 400 and leaves the replica serving.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._imports import import_callable
from ._manifest import DTYPES, dtype_name

Handler = Callable[[nn.Module, list[dict[str, Any]]], list[Any]]


class BadRequest(ValueError):
    """The request body cannot be served; the message goes back to the client."""


def load_handler(path: str) -> Handler:
    """'tensor' for the default handler, or `package.module:function`."""
    if path == "tensor":
        return tensor_handler
    return import_callable(path, "serving.handler")


def decode(body: dict[str, Any]) -> torch.Tensor:
    """`{"inputs": nested lists, "dtype"?}` or `{"inputs": {"b64", "dtype", "shape"}}` to a tensor."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadRequest('the body must be a JSON object with an "inputs" field')
    inputs = body["inputs"]
    if isinstance(inputs, dict):
        try:
            dtype = DTYPES[inputs["dtype"]]
            raw = base64.b64decode(inputs["b64"], validate=True)
            return torch.frombuffer(bytearray(raw), dtype=dtype).reshape(inputs["shape"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise BadRequest(f'"inputs" as base64 needs "b64", "dtype" and a matching "shape": {exc}') from exc
    try:
        dtype = DTYPES[body.get("dtype", "float32")]
        return torch.tensor(inputs, dtype=dtype)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise BadRequest(f'"inputs" must be a (nested) list of numbers with a known "dtype": {exc}') from exc


def encode(tensor: torch.Tensor, as_base64: bool = False) -> dict[str, Any]:
    tensor = tensor.detach().cpu().contiguous()
    if as_base64:
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"b64": base64.b64encode(raw).decode(), "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    return {"outputs": tensor.tolist(), "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def tensor_handler(model: nn.Module, bodies: list[dict[str, Any]]) -> list[Any]:
    """Run the model on each request's tensor; requests of one shape run as one batch."""
    tensors = [decode(body) for body in bodies]
    device = next(model.parameters(), torch.empty(0)).device
    together = len({(t.shape, t.dtype) for t in tensors}) == 1
    try:
        if together:
            results = [model(torch.stack(tensors).to(device))]
        else:
            results = [model(t.unsqueeze(0).to(device)) for t in tensors]
    except (RuntimeError, TypeError, ValueError) as exc:  # wrong shape or dtype for this model
        shapes = sorted({str(tuple(t.shape)) for t in tensors})
        raise BadRequest(f"the model cannot run on inputs of shape {', '.join(shapes)}: {exc}") from exc
    outputs = list(_main_output(results[0]).unbind(0)) if together else [_main_output(r)[0] for r in results]
    return [encode(out, bool(isinstance(body["inputs"], dict))) for out, body in zip(outputs, bodies, strict=True)]


def _main_output(output: Any) -> torch.Tensor:
    """The tensor to answer with: a plain module returns it; a transformers model returns a
    ModelOutput (an ordered dict without its None fields) whose first field is the answer,
    such as `logits` or `last_hidden_state`."""
    if isinstance(output, dict) and output:
        output = next(iter(output.values()))
    elif isinstance(output, (tuple, list)) and output:
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"the model returned {type(output).__name__}, not a tensor; serve it with a custom handler")
    return output


def fingerprint(model: nn.Module) -> int:
    """A cheap checksum of each weight storage's address and its first and last 64 bytes.

    A health check cannot hash gigabytes every few seconds; a remapped or
    rewritten storage still changes these samples.
    """
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in [*model.parameters(), *model.buffers()]}
    total = 0
    for address, storage in sorted(storages.items()):
        data = torch.empty(0, dtype=torch.uint8).set_(storage)
        total = hash((total, address, data[:64].numpy().tobytes(), data[-64:].numpy().tobytes()))
    return total
