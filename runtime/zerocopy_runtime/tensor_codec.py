"""Request handlers: JSON bodies in, JSON results out, one call per batch.

A handler is `handler(model, bodies: list[dict]) -> list[object]`. Raising
`BadRequest` answers that request with HTTP 400 and leaves the replica serving.

The default `tensor` handler's contract: a request carries ONE example,
without a batch dimension, and the replica batches requests itself:

- `{"inputs": [...], "dtype": "float32"}`: one tensor as nested lists;
- `{"inputs": {"b64": ..., "dtype": ..., "shape": [...]}}`: the same, as raw bytes;
- `{"inputs": {"input_ids": [...], "attention_mask": [...]}, "dtype": "int64"}`:
  named tensors (each nested lists or a base64 object), passed to forward by
  keyword; `dtype` is one name for all, or an object naming one per input.

Examples with the same names, shapes and dtypes run as one forward pass
(stacked on a new first dimension); the answer is that example's row.
A transformers model's own inputs have a known rank per example
(`input_ids` is one sequence), so a request that adds its own batch
dimension, which attention would otherwise read as many one-token
sequences, is refused instead of answered wrongly.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._dtypes import DTYPES, dtype_name
from ._imports import import_callable

Handler = Callable[[nn.Module, list[dict[str, Any]]], list[Any]]

_B64_KEYS = {"b64", "dtype", "shape"}
#: Rank of one example of a transformers model's usual inputs, and the dtype they take when none is given.
_TRANSFORMERS_INPUTS: dict[str, tuple[int, str, str]] = {
    "input_ids": (1, "int64", "one sequence of token ids [id, ...]"),
    "attention_mask": (1, "int64", "one mask [1, ..., 0] as long as input_ids"),
    "token_type_ids": (1, "int64", "one sequence of segment ids"),
    "position_ids": (1, "int64", "one sequence of positions"),
    "inputs_embeds": (2, "float32", "one sequence of embeddings [[...], ...]"),
    "pixel_values": (3, "float32", "one image [channels, height, width]"),
}


class BadRequest(ValueError):
    """The request body cannot be served; the message goes back to the client."""


def load_handler(path: str) -> Handler:
    """'tensor' for the default handler, or `package.module:function`."""
    if path == "tensor":
        return tensor_handler
    return import_callable(path, "serving.handler")


@dataclass(frozen=True)
class Example:
    """One request's tensors: `positional` for a bare tensor, or named ones for forward's keywords."""

    tensors: dict[str, torch.Tensor]
    positional: bool
    as_base64: bool

    def signature(self) -> tuple[Any, ...]:
        """Examples with equal signatures can be stacked into one forward pass."""
        return (self.positional, *((k, tuple(t.shape), t.dtype) for k, t in sorted(self.tensors.items())))


def decode(body: dict[str, Any], model: nn.Module | None = None) -> Example:
    """A request body as one example's tensors (see the module's docstring for the forms)."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadRequest('the body must be a JSON object with an "inputs" field holding one example')
    inputs, dtype = body["inputs"], body.get("dtype")
    main = _main_input(model)
    if isinstance(inputs, dict) and "b64" not in inputs:
        if not inputs:
            raise BadRequest('"inputs" is an empty object: name at least one input, such as {"input_ids": [...]}')
        if isinstance(dtype, dict) and not set(dtype) <= set(inputs):
            raise BadRequest(f'"dtype" names inputs that are not sent: {sorted(set(dtype) - set(inputs))}')
        tensors = {
            str(name): _tensor(value, _dtype_for(dtype, str(name), main), str(name)) for name, value in inputs.items()
        }
        example = Example(tensors, positional=False, as_base64=any(isinstance(v, dict) for v in inputs.values()))
    else:
        if isinstance(dtype, dict):
            raise BadRequest('"dtype" names inputs, but "inputs" is a single tensor: give one dtype name')
        name = main or "inputs"
        tensor = _tensor(inputs, _dtype_for(dtype, name, main), "inputs")
        if main is not None:  # a transformers model takes its main input by keyword
            example = Example({main: tensor}, positional=False, as_base64=isinstance(inputs, dict))
        else:
            example = Example({"inputs": tensor}, positional=True, as_base64=isinstance(inputs, dict))
    if main is not None:
        _check_ranks(example)
    return example


def _main_input(model: nn.Module | None) -> str | None:
    """A transformers model's main input name (`input_ids`, `pixel_values`); None for a plain module."""
    if model is None or not any(c.__module__.startswith("transformers.") for c in type(model).__mro__):
        return None
    return str(getattr(model, "main_input_name", "input_ids"))


def _dtype_for(dtype: Any, name: str, main: str | None) -> str:
    if isinstance(dtype, dict):
        dtype = dtype.get(name)
    if dtype is None:
        known = _TRANSFORMERS_INPUTS.get(name) if main is not None else None
        return known[1] if known else "float32"
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadRequest(f'"dtype" {dtype!r} for {name!r} is not one of {", ".join(sorted(DTYPES))}')
    return dtype


def _tensor(value: Any, dtype: str, name: str) -> torch.Tensor:
    if isinstance(value, dict):
        if set(value) != _B64_KEYS:
            raise BadRequest(f'{name!r} as base64 needs exactly "b64", "dtype" and "shape", got {sorted(value)}')
        try:
            raw = base64.b64decode(value["b64"], validate=True)
            return torch.frombuffer(bytearray(raw), dtype=DTYPES[value["dtype"]]).reshape(value["shape"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise BadRequest(f'{name!r} as base64 needs "b64", a known "dtype" and a matching "shape": {exc}') from exc
    if not isinstance(value, list):
        raise BadRequest(f"{name!r} must be a (nested) list of numbers or a base64 object, not {type(value).__name__}")
    try:
        return torch.tensor(value, dtype=DTYPES[dtype])
    except (ValueError, TypeError, RuntimeError) as exc:
        raise BadRequest(f"{name!r} must be a rectangular (nested) list of numbers for dtype {dtype}: {exc}") from exc


def _check_ranks(example: Example) -> None:
    for name, tensor in example.tensors.items():
        known = _TRANSFORMERS_INPUTS.get(name)
        if known and tensor.dim() != known[0]:
            raise BadRequest(
                f"{name!r} must be {known[2]} (rank {known[0]} for one example), got shape {list(tensor.shape)}. "
                "Send one example per request, without a batch dimension: the replica batches requests itself."
            )
    ids, mask = example.tensors.get("input_ids"), example.tensors.get("attention_mask")
    if ids is not None and mask is not None and ids.shape != mask.shape:
        raise BadRequest(f"attention_mask has shape {list(mask.shape)} but input_ids has {list(ids.shape)}")


def encode(tensor: torch.Tensor, as_base64: bool = False) -> dict[str, Any]:
    tensor = tensor.detach().cpu().contiguous()
    if as_base64:
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {"b64": base64.b64encode(raw).decode(), "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}
    return {"outputs": tensor.tolist(), "dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape)}


def tensor_handler(model: nn.Module, bodies: list[dict[str, Any]]) -> list[Any]:
    """Run the model once per group of like examples; answer each request with its own row."""
    examples = [decode(body, model) for body in bodies]
    device = next(model.parameters(), torch.empty(0)).device
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.signature(), []).append(i)
    answers: list[Any] = [None] * len(examples)
    for members in groups.values():
        first = examples[members[0]]
        stacked = {k: torch.stack([examples[i].tensors[k] for i in members]).to(device) for k in first.tensors}
        try:
            output = model(stacked["inputs"]) if first.positional else model(**stacked)
            rows = _main_output(output)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:  # wrong shape, dtype or name for this model
            shapes = ", ".join(f"{k} {list(t.shape[1:])}" for k, t in stacked.items())
            raise BadRequest(f"the model cannot run on one example of {shapes}: {exc}") from exc
        if rows.dim() == 0 or rows.shape[0] != len(members):
            raise BadRequest(
                f"the model answered a batch of {len(members)} with shape {list(rows.shape)}, not one row per "
                "example: serve it with a custom handler"
            )
        for row, i in zip(rows.unbind(0), members, strict=True):
            answers[i] = encode(row, examples[i].as_base64)
    return answers


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
