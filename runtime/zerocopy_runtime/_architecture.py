"""The model's structure, built without weights: from a factory or a transformers class.

`attach` calls the returned callable with parameters on the meta device, so
building even a large transformers model costs milliseconds and no memory.
With `model.dtype` the structure is built in that dtype (torch's default dtype
while it is built, as transformers' `from_pretrained(dtype=...)` does), to fit
the weights its owner cast when publishing.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import CheckpointError
from ._imports import import_callable
from ._source import model_dir_path, model_folder
from .config import Architecture


def architecture_factory(
    architecture: Architecture, folder: Path, dtype: str | None = None, *, gguf: bool = False
) -> Callable[[], nn.Module]:
    """A callable building the architecture (in `dtype`, where given); `folder` (the model folder:
    `_source.model_folder` of the weights) holds a transformers config.json by default; `gguf`: the weights
    are a GGUF file's, named for the causal LM transformers builds from it."""
    build: Callable[[], nn.Module]
    if architecture.transformers is not None:
        name = architecture.transformers
        if gguf and not (name == "AutoModelForCausalLM" or name.endswith("ForCausalLM")):
            raise CheckpointError(
                f"architecture.transformers {name!r} cannot hold a GGUF file's weights: they are named for the causal "
                "LM transformers builds from the file (set architecture.transformers: AutoModelForCausalLM)."
            )
        config = model_dir_path(architecture.config) if architecture.config else folder
        build = partial(_transformers_model, architecture.transformers, _config_dir(config), dtype)
    else:
        assert architecture.factory is not None  # the config type requires one of the two
        factory = import_callable(architecture.factory, "architecture.factory")
        build = partial(factory, **architecture.kwargs)
    return build if dtype is None else partial(_in_dtype, build, dtype)


def _in_dtype(build: Callable[[], nn.Module], dtype: str) -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        return build()
    finally:
        torch.set_default_dtype(previous)


def _config_dir(path: Path) -> Path:
    folder = model_folder(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(
            f"architecture.transformers needs a config.json, and there is none in {folder}. Save the model with "
            "save_pretrained() so config.json sits next to the weights, or set architecture.config."
        )
    return folder


def _transformers_model(class_name: str, config_dir: Path, dtype: str | None = None) -> nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise CheckpointError(
            "architecture.transformers needs the transformers package in the runtime: "
            "pip install 'zerocopy-operator[hf]'."
        ) from exc
    cls: Any = getattr(transformers, class_name, None)
    auto = class_name.startswith("Auto") and hasattr(cls, "from_config")
    if not auto and not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            f"architecture.transformers {class_name!r} is not a model class of transformers "
            f"{transformers.__version__}; use a class such as GPT2LMHeadModel or AutoModelForCausalLM."
        )
    from transformers.initialization import no_init_weights

    config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    # Every weight is about to be pointed at the store: random initialization (which transformers runs even
    # on meta parameters, 0.16 s for SmolLM2-135M) is skipped, as from_pretrained skips it. That also skips
    # init_weights' tying, so ties are made after.
    with no_init_weights():
        # from_config builds in config.dtype unless told; a class called directly builds in torch's default dtype.
        model: Any = (
            cls.from_config(config, **({"dtype": getattr(torch, dtype)} if dtype else {})) if auto else cls(config)
        )
    model.tie_weights()
    return model
