"""`ModelWrapper`: the API of the public zero-copy guide, on top of publish/attach.

Actor mode: `ModelWrapper.from_model(m)` publishes once; `wrapper.load()` in
each actor attaches. Task mode: `ModelWrapper.for_tasks(m)` returns an object
callable like the model whose calls run as Ray tasks on the shared weights.
The wrapper pickles to a few kilobytes: a manifest and object references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, Literal, TypeVar

import ray
import torch
from torch import nn

from ._collect import reachable, resolve
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
            loaded = attach(self.published, device=device)
            for _, module in _models_in(loaded):
                module.eval()
            return loaded
        if self.published.manifest.kind == "module":
            return TaskModel(self, "")  # type: ignore[return-value]
        pipeline = _skeleton_on_meta(self.published)
        for path, _ in _models_in(pipeline):
            parent, _, leaf = path.rpartition(".")
            _replace(resolve(pipeline, parent), leaf, TaskModel(self, path))
        return pipeline

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

    def __init__(self, wrapper: ModelWrapper[Any], path: str) -> None:
        self._wrapper = wrapper
        self._path = path
        self._local = resolve(_skeleton_on_meta(wrapper.published), path)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._remote("__call__", args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_wrapper", "_path", "_local"):
            raise AttributeError(name)
        if name in self._wrapper.method_names:
            return lambda *args, **kwargs: self._remote(name, args, kwargs)
        return getattr(self._local, name)

    def _remote(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if method not in self._wrapper.method_names:
            raise AttributeError(f"{method!r} is not in method_names {self._wrapper.method_names}")
        task = _run_method.options(**self._wrapper.ray_options)
        return ray.get(task.remote(self._wrapper.published, self._path, method, args, kwargs))

    def __repr__(self) -> str:
        return f"TaskModel({self._wrapper.published.name!r}, path={self._path!r})"


#: Attached models per worker process, so each task reuses the mapping.
_ATTACHED: dict[tuple[str, str], Any] = {}


@ray.remote
def _run_method(published: PublishedModel, path: str, method: str, args: Any, kwargs: Any) -> Any:
    key = (published.name, published.refs[0].hex() if published.refs else "")
    obj = _ATTACHED.get(key)
    if obj is None:
        obj = _ATTACHED[key] = attach(published)
        for _, module in _models_in(obj):
            module.eval()
    with torch.no_grad():
        return getattr(resolve(obj, path), method)(*args, **kwargs)


def _models_in(obj: Any) -> list[tuple[str, nn.Module]]:
    """The outermost modules of a model (itself) or of a pipeline, with their paths."""
    return [(path, leaf) for path, leaf in reachable(obj) if isinstance(leaf, nn.Module)]


def _replace(parent: Any, key: str, value: Any) -> None:
    if isinstance(parent, dict):
        parent[next(k for k in parent if str(k) == key)] = value
    elif isinstance(parent, list):
        parent[int(key)] = value
    else:
        setattr(parent, key, value)


def _skeleton_on_meta(published: PublishedModel) -> Any:
    """The published object with every tensor on the meta device: structure and attributes, no bytes."""
    manifest = published.manifest
    if manifest.skeleton is None:
        raise TypeError("Task mode needs a published model or pipeline, not a bare state dict.")
    return load_skeleton(manifest.skeleton, meta_tensors(manifest))
