"""LoRA adapters on shared base weights: applied per request, never merged into the base.

The base model's weights are the node's read-only shared copy, so an adapter cannot be merged into them
(and a merged private copy per adapter is exactly what sharing avoids). Instead every linear layer an
adapter targets gets a forward hook that adds `scale * (x @ A.T) @ B.T` to the rows of the running batch
that asked for that adapter: one forward pass serves requests for different adapters, and rows that asked
for none get the base model's answer unchanged.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import CheckpointError

__all__ = ["AdapterBank", "LoraWeights", "read_adapter"]

_PREFIX = "base_model.model."
_SUFFIXES = {"A": ".lora_A.weight", "B": ".lora_B.weight"}


@dataclass(frozen=True)
class LoraWeights:
    """One adapter, checked against the model: each targeted linear layer's (A, B) and the scale."""

    name: str
    scale: float
    #: Base module path -> (A: [rank, in_features], B: [out_features, rank]).
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int


def read_adapter(name: str, folder: Path, tensors: dict[str, torch.Tensor], model: nn.Module) -> LoraWeights:
    """The adapter in `folder` (its adapter_config.json) with `tensors` (its published weights), checked to fit
    `model`: every target a linear layer of the model, every shape the layer's and the rank's. A mismatch is a
    CheckpointError naming the adapter and what does not fit, before any request uses it."""
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"adapter {name}: {folder} has no adapter_config.json; save it with PEFT's save_pretrained"
        )
    config: dict[str, Any] = json.loads(config_path.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"adapter {name}: peft_type {config.get('peft_type')} is not LORA")
    unsupported = [
        what
        for what, present in (
            ("use_dora", config.get("use_dora")),
            ("modules_to_save", config.get("modules_to_save")),
            (f"bias {config.get('bias')}", config.get("bias", "none") != "none"),
            ("fan_in_fan_out", config.get("fan_in_fan_out")),
        )
        if present
    ]
    if unsupported:
        raise CheckpointError(f"adapter {name}: {', '.join(unsupported)} is not supported; train it as plain LoRA")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        part = next((p for p, suffix in _SUFFIXES.items() if key.endswith(suffix)), None)
        if part is None or not key.startswith(_PREFIX):
            raise CheckpointError(f"adapter {name}: tensor {key} is not a LoRA A or B weight of a linear layer")
        path = key[len(_PREFIX) : -len(_SUFFIXES[part])]
        pairs.setdefault(path, {})[part] = tensor
    if not pairs:
        raise CheckpointError(f"adapter {name}: adapter_model.safetensors holds no LoRA weights")
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise CheckpointError(f"adapter {name}: {path} has lora_{''.join(set(pair))} without its pair")
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            kind = type(model).__name__
            raise CheckpointError(
                f"adapter {name}: targets {path}, which {kind} does not have: it was trained for another architecture"
            ) from None
        if not isinstance(layer, nn.Linear):
            raise CheckpointError(f"adapter {name}: targets {path}, a {type(layer).__name__}, not a linear layer")
        a, b = pair["A"], pair["B"]
        expected = ((rank, layer.in_features), (layer.out_features, rank))
        if (tuple(a.shape), tuple(b.shape)) != expected:
            raise CheckpointError(
                f"adapter {name}: {path} has A {list(a.shape)} and B {list(b.shape)}, but the model's layer and rank "
                f"{rank} need A {list(expected[0])} and B {list(expected[1])}: it was trained for another base model"
            )
        modules[path] = (a, b)
    nbytes = sum(t.numel() * t.element_size() for pair in modules.values() for t in pair)
    return LoraWeights(name, scale, modules, nbytes)


class AdapterBank:
    """The adapters a replica holds, and which adapter each row of the running forward pass asked for.

    `rows(names)` wraps one forward pass (the generation thread runs one at a time); the hooks read it.
    """

    def __init__(self) -> None:
        self.adapters: dict[str, LoraWeights] = {}
        self._model: nn.Module | None = None
        self._hooks: dict[str, Any] = {}
        self._local = threading.local()

    def use(self, model: nn.Module) -> None:
        """Hook the targeted layers of `model` (a fresh one after a re-attach: the old one's hooks go with it)."""
        self._model, self._hooks = model, {}
        for adapter in self.adapters.values():
            self._hook(adapter)

    def add(self, adapter: LoraWeights) -> None:
        self.adapters[adapter.name] = adapter
        self._hook(adapter)

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)

    @contextmanager
    def rows(self, names: Sequence[str | None]) -> Iterator[None]:
        """The adapter of each row (None: the base model) for the forward pass inside."""
        self._local.rows = list(names) if any(names) else None
        try:
            yield
        finally:
            self._local.rows = None

    def _hook(self, adapter: LoraWeights) -> None:
        assert self._model is not None, "use(model) first"
        for path in adapter.modules:
            if path not in self._hooks:
                self._hooks[path] = self._model.get_submodule(path).register_forward_hook(self._adder(path))

    def _adder(self, path: str) -> Any:
        def add_lora(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            rows: list[str | None] | None = getattr(self._local, "rows", None)
            if rows is None:
                return None
            x = inputs[0]
            for name in {n for n in rows if n is not None}:
                pair = self.adapters[name].modules.get(path)
                if pair is None:
                    continue
                a, b = pair
                index = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
                delta = (x.index_select(0, index) @ a.T) @ b.T
                output = output.index_add(0, index, delta.to(output.dtype), alpha=self.adapters[name].scale)
            return output

        return add_lora
