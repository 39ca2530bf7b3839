"""vLLM's `zerocopy` load format: an engine's weights come from the node's published copy.

vLLM loads the `vllm.general_plugins` entry point in every process it starts
(the engine core and each worker, all spawned, none of them Ray workers), so
`register` makes the format known wherever the model is built. The loader
connects to the Ray cluster its replica runs in, attaches the published
tensors (read-only views of the object store) and hands them to the model's
own `load_weights`, which maps checkpoint names to vLLM's fused parameters.
The engine is started on a folder holding config and tokenizer files only,
so no weights file is there to be opened.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import ray
from torch import nn
from vllm.config import ModelConfig
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from ._errors import CheckpointError
from ._vllm import LOAD_FORMAT, LoaderArgs
from .weights import attach_tensors


class ZeroCopyLoader(BaseModelLoader):
    """Feeds `model.load_weights` from the object store instead of checkpoint files."""

    def download_model(self, model_config: ModelConfig) -> None:
        """Nothing to download: the replica has published the weights before the engine starts."""

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        args = LoaderArgs.model_validate(self.load_config.model_loader_extra_config)
        started = time.perf_counter()
        steps: dict[str, float] = {}  # each step's seconds, for the replica's /-/info and the benchmark
        connected = not ray.is_initialized()
        if connected:
            ray.init(address=args.address, namespace=args.namespace, log_to_driver=False, logging_level=logging.ERROR)
        steps["connect_seconds"] = time.perf_counter() - started
        try:
            tensors, report = attach_tensors(args.weights, write_guard=args.write_guard, namespace=args.namespace)
            _name_tied(tensors, model_config)
            expected = {name for name, _ in model.named_parameters()}
            vllm_model: Any = model  # vLLM's models all have load_weights; nn.Module's type does not say so
            mark = time.perf_counter()
            loaded = vllm_model.load_weights(iter(tensors.items()))
            steps["load_weights_seconds"] = time.perf_counter() - mark
            del tensors  # vLLM copied them into its own parameters; the views go before Ray does
        finally:
            mark = time.perf_counter()
            if connected:
                ray.shutdown()
            steps["disconnect_seconds"] = time.perf_counter() - mark
        missing = sorted(expected - set(loaded)) if loaded is not None else []
        if missing:
            raise CheckpointError(
                f"The published weights {args.weights!r} do not fill {len(missing)} of the engine's parameters "
                f"({', '.join(missing[:5])}...): the checkpoint does not match config.json beside it."
            )
        record = dataclasses.asdict(report) | steps | {"load_seconds": time.perf_counter() - started}
        Path(args.report).write_text(json.dumps(record))


def _name_tied(tensors: dict[str, Any], model_config: ModelConfig) -> None:
    """Give a tied weight saved under one name only the name vLLM reads (`lm_head.weight` without
    `model.embed_tokens.weight`: vLLM skips the head of a tied model and finds no embedding).
    The ties are transformers' own declaration for the architecture."""
    import transformers

    for architecture in getattr(model_config.hf_config, "architectures", None) or []:
        ties = getattr(getattr(transformers, architecture, None), "_tied_weights_keys", None)
        for target, source in (ties or {}).items() if isinstance(ties, dict) else []:
            if target in tensors and source not in tensors:
                tensors[source] = tensors[target]


def register() -> None:
    """The `vllm.general_plugins` entry point: runs in every vLLM process, so it must stay idempotent."""
    register_model_loader(LOAD_FORMAT)(ZeroCopyLoader)
