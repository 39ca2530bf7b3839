"""`ModelWrapper`: the API of the public zero-copy guide, on top of publish/attach.

Actor mode: `ModelWrapper.from_model(m)` publishes once; `wrapper.load()` in
each actor attaches. Task mode: `ModelWrapper.for_tasks(m)` returns an object
callable like the model whose calls run as Ray tasks on the shared weights.
The wrapper pickles to a few kilobytes: a manifest and object references.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Generic, Literal, TypeVar

import ray
import torch
from torch import nn

from ._collect import models_in, replace_at, resolve
from .weights import PublishedModel, attach, load_skeleton, meta_tensors, publish, release

T = TypeVar("T")
Mode = Literal["actor", "task"]


class ModelWrapper(Generic[T]):
    """A published model or pipeline, ready to be loaded in any process of the cluster."""

    def __init__(
        self, published: PublishedModel, mode: Mode, method_names: tuple[str, ...], ray_options: dict[str, Any]
    ) -> None:
        self.published = published
        self.mode = mode
        self.method_names = method_names
        self.ray_options = ray_options

    @classmethod
    def from_model(
        cls,
        model_or_pipeline: T,
        mode: Mode = "actor",
        model_attr_names: Sequence[str] | None = None,
        method_names: Sequence[str] | None = None,
        *,
        name: str | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
    ) -> ModelWrapper[T]:
        """Publish the weights of a model, or of every model reachable from a pipeline.

        `model_attr_names` limits sharing to those pipeline attributes (the rest
        is copied); by default every nn.Module reachable from the pipeline's
        attributes, containers and private attributes is shared.
        `method_names` (task mode) are the model methods that run remotely;
        `num_cpus`/`num_gpus` are the resources of each of those tasks.
        """
        if mode not in ("actor", "task"):
            raise ValueError(f"mode must be 'actor' or 'task', not {mode!r}")
        if mode == "task" and (isinstance(model_or_pipeline, (str, os.PathLike, Mapping))):
            raise TypeError("Task mode runs a model's methods: pass a model or pipeline, not a state dict or path.")
        published = publish(model_or_pipeline, name=name, only=model_attr_names)
        methods = tuple(method_names or ("__call__",))
        return cls(published, mode, methods, {"num_cpus": num_cpus, "num_gpus": num_gpus})

    @classmethod
    def for_tasks(
        cls,
        model_or_pipeline: T,
        method_names: Sequence[str] | None = None,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
    ) -> T:
        """Publish, then return an object used like the original whose model calls run as Ray tasks."""
        wrapper = cls.from_model(
            model_or_pipeline, "task", method_names=method_names, num_cpus=num_cpus, num_gpus=num_gpus
        )
        return wrapper.load()

    def load(self, device: str | torch.device = "cpu") -> T:
        """Actor mode: attach here (zero-copy, read-only) and return the model or pipeline.

        Every model comes back in eval mode, as in the guide: the weights are
        read-only, and a module in train mode (BatchNorm statistics) would
        write to them. Models are on CPU unless `device` says otherwise;
        moving them later with `.to()` works too.
        Task mode: return the task-backed stand-in.
        """
        if self.mode == "actor":
            return _load_for_inference(self.published, device)
        local = _skeleton_on_meta(self.published)
        if self.published.manifest.kind == "module":
            return TaskModel(self, "", local)  # type: ignore[return-value]
        for path, module in models_in(local):
            replace_at(local, path, TaskModel(self, path, module))
        return local

    def release(self) -> None:
        """Free the published weights (attached processes keep their pages until they let go)."""
        release(self.published)

    def __repr__(self) -> str:
        return f"ModelWrapper(name={self.published.name!r}, mode={self.mode!r}, bytes={self.published.nbytes})"


class TaskModel:
    """Stands in for a model: calls to `method_names` run as Ray tasks, other attributes read locally.

    Attributes (such as a `config`) come from a weight-free copy of the model
    whose tensors are on the meta device, so reading them costs nothing.
    """

    def __init__(self, wrapper: ModelWrapper[Any], path: str, local: Any) -> None:
        self._wrapper = wrapper
        self._path = path
        self._local = local

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote("__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_wrapper", "_path", "_local"):
            raise AttributeError(name)
        if name in self._wrapper.method_names:
            return lambda *args, **kwargs: self._remote(name, args, kwargs)
        value = getattr(self._local, name)
        if callable(value) and not isinstance(value, (nn.Module, type)):
            raise AttributeError(
                f"{name!r} is a method, and only {self._wrapper.method_names} run remotely: "
                f"add it to method_names (ModelWrapper.for_tasks(model, method_names=(..., {name!r})))."
            )
        return value

    def release(self) -> None:
        """Free the published weights behind this stand-in (what `ModelWrapper.release` does)."""
        self._wrapper.release()

    def _remote(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method not in self._wrapper.method_names:
            raise AttributeError(f"{method!r} is not in method_names {self._wrapper.method_names}")
        task = _run_method.options(**self._wrapper.ray_options)
        return ray.get(task.remote(self._wrapper.published, self._path, method, args, kwargs))

    def __repr__(self) -> str:
        return f"TaskModel({self._wrapper.published.name!r}, path={self._path!r})"


#: The attached model of each published name in this worker process, so tasks reuse the mapping.
_ATTACHED: dict[str, tuple[tuple[str, str], Any]] = {}


@ray.remote
def _run_method(published: PublishedModel, path: str, method: str, args: Any, kwargs: Any) -> Any:
    device = "cuda" if ray.get_gpu_ids() else "cpu"
    version = (published.refs[0].hex(), device)
    cached = _ATTACHED.get(published.name)
    if cached is None or cached[0] != version:
        # A new revision under the same name replaces the old one, which is then let go.
        _ATTACHED[published.name] = cached = (version, _load_for_inference(published, device))
    target = getattr(resolve(cached[1], path), method)
    if device == "cpu":
        with torch.no_grad():
            return target(*args, **kwargs)
    with torch.no_grad():  # inputs follow the model to the GPU; results come back on the CPU
        return _to(target(*_to(args, device), **_to(kwargs, device)), "cpu")


def _load_for_inference(published: PublishedModel, device: str | torch.device) -> Any:
    """Attach, then eval mode: the weights are read-only, and train-mode BatchNorm would write them."""
    loaded = attach(published, device=device)
    for _, module in models_in(loaded):
        module.eval()
    return loaded


def _to(value: Any, device: str) -> Any:
    """`value` with its tensors (at any depth of lists, tuples and dicts) on `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _skeleton_on_meta(published: PublishedModel) -> Any:
    """The published object with every tensor on the meta device: structure and attributes, no bytes."""
    manifest = published.manifest
    if manifest.skeleton is None:
        raise TypeError("Task mode needs a published model or pipeline, not a bare state dict.")
    return load_skeleton(manifest.skeleton, meta_tensors(manifest))
