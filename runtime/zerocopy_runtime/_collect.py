"""Turn a module, pipeline or state dict into storages + manifest records.

Nothing here copies weight bytes: storages are returned as uint8 views of the
original memory, and the skeleton is pickled with every tensor replaced by a
persistent reference, which is what keeps the publisher's peak memory near
the size of the model instead of two or three times it.
"""

from __future__ import annotations

import io
import pickle
import types
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from ray import cloudpickle
from torch import nn

from ._dtypes import DTYPES, dtype_name
from ._errors import UnsupportedWeightsError
from ._manifest import ALIGN as _ALIGN
from ._manifest import TensorRecord

PERSISTENT_TAG = "zerocopy.tensor"


@dataclass(frozen=True)
class _Named:
    name: str
    tensor: torch.Tensor
    persistent: bool


@dataclass
class Collected:
    """Records, byte views to publish (one per storage), and the skeleton pickle."""

    records: list[TensorRecord]
    storages: list[torch.Tensor]
    skeleton: bytes | None
    kind: str


def collect(obj: Any, only: Sequence[str] | None = None) -> Collected:
    """Describe every tensor reachable from `obj` without touching its bytes.

    With `only`, just the tensors under those attributes of a pipeline are
    shared; any other tensor is pickled by value into the skeleton.
    """
    if isinstance(obj, torch.jit.ScriptModule):
        raise UnsupportedWeightsError(
            "TorchScript modules cannot be shared zero-copy: their weights live inside the "
            "C++ module. Publish the eager nn.Module instead (the one you passed to torch.jit.script)."
        )
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        named = [_Named(str(k), v, True) for k, v in obj.items()]
        kind = "state_dict"
    elif only is not None:
        named = list(_walk({attr: _model_attribute(obj, attr) for attr in only}, ""))
        kind = "pipeline"
    else:
        named = list(_walk(obj, ""))
        kind = "module" if isinstance(obj, nn.Module) else "pipeline"
    builder = _RecordBuilder(register_unnamed=only is None)
    for item in named:
        builder.add(item.name, item.tensor, item.persistent)
    skeleton = None if kind == "state_dict" else builder.pickle_skeleton(obj)
    records, storages = builder.finish()
    return Collected(records, storages, skeleton, kind)


def _model_attribute(pipeline: Any, attr: str) -> nn.Module:
    value = getattr(pipeline, attr, None)
    if not isinstance(value, nn.Module):
        raise TypeError(
            f"model_attr_names names {attr!r}, but {type(pipeline).__name__}.{attr} is "
            f"{'missing' if value is None else type(value).__name__}, not an nn.Module."
        )
    return value


def reachable(obj: Any, path: str = "", seen: set[int] | None = None) -> Iterator[tuple[str, Any]]:
    """Every tensor and module reachable through containers and instance attributes, with its path.

    Does not descend into tensors or modules. Properties are class
    attributes, so `vars()` never evaluates them.
    """
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, _NOT_WALKED):
        return
    seen.add(id(obj))
    if isinstance(obj, (torch.Tensor, nn.Module)):
        yield path, obj
        return
    if isinstance(obj, Mapping):
        items: Iterable[tuple[Any, Any]] = obj.items()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        yield from reachable(value, _join(path, str(key)), seen)


def resolve(root: Any, path: str) -> Any:
    """The object at a path produced by `reachable`."""
    obj = root
    for part in filter(None, path.split(".")):
        if isinstance(obj, Mapping):
            obj = next(v for k, v in obj.items() if str(k) == part)
        elif isinstance(obj, (list, tuple)):
            obj = obj[int(part)]
        else:
            obj = getattr(obj, part)
    return obj


def models_in(obj: Any) -> list[tuple[str, nn.Module]]:
    """The outermost modules of a model (itself) or of a pipeline, with their paths."""
    return [(path, leaf) for path, leaf in reachable(obj) if isinstance(leaf, nn.Module)]


def replace_at(root: Any, path: str, value: Any) -> None:
    """Put `value` where `path` (from `reachable`) points: an attribute, a dict entry or a list item."""
    parent_path, _, key = path.rpartition(".")
    parent = resolve(root, parent_path)
    if isinstance(parent, Mapping):
        parent[next(k for k in parent if str(k) == key)] = value  # type: ignore[index]
    elif isinstance(parent, list):
        parent[int(key)] = value
    elif isinstance(parent, (tuple, set, frozenset)):
        raise TypeError(
            f"The model at {path!r} sits in a {type(parent).__name__}, which cannot be changed in place; "
            "keep pipeline models in attributes, lists or dicts to use task mode."
        )
    else:
        setattr(parent, key, value)


def _walk(obj: Any, path: str, seen: set[int] | None = None) -> Iterator[_Named]:
    """Name every tensor reachable from `obj`, looking inside modules too."""
    seen = set() if seen is None else seen
    for leaf_path, leaf in reachable(obj, path, seen):
        if isinstance(leaf, nn.Module):
            yield from _walk_module(leaf, leaf_path, seen)
        else:
            yield _Named(leaf_path, leaf, True)


_NOT_WALKED = (type, types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _walk_module(module: nn.Module, root: str, seen: set[int]) -> Iterator[_Named]:
    for name, param in module.named_parameters(root, remove_duplicate=False):
        yield _Named(name, param, True)
    modules = list(module.named_modules(prefix=root, remove_duplicate=False))
    for mod_name, mod in modules:
        seen.add(id(mod))
        for name, buf in mod._buffers.items():
            if buf is not None:
                persistent = name not in mod._non_persistent_buffers_set
                yield _Named(_join(mod_name, name), buf, persistent)
    for mod_name, mod in modules:
        # Tensors and models kept as plain attributes of a module are shared too.
        for key, value in vars(mod).items():
            if key not in _MODULE_INTERNALS:
                yield from _walk(value, _join(mod_name, key), seen)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_supported(name: str, tensor: torch.Tensor) -> None:
    problem = None
    if type(tensor) not in (torch.Tensor, nn.Parameter):
        problem = (
            f"is a tensor subclass ({type(tensor).__qualname__}); convert it to a plain "
            "tensor (for example with .to_local() or by dequantizing) before publishing"
        )
    elif tensor.is_quantized:
        problem = f"is quantized ({tensor.dtype}); publish the dequantized model or its int8 data as plain tensors"
    elif tensor.layout != torch.strided:
        problem = f"has layout {tensor.layout}; call .to_dense() before publishing"
    elif tensor.device.type == "meta":
        problem = "is on the meta device and has no data; load its weights before publishing"
    elif tensor.dtype not in DTYPES.values():
        problem = f"has dtype {tensor.dtype}, which has no byte-view support"
    elif tensor.is_conj() or tensor.is_neg():
        problem = "is a lazy conjugate/negative view; call .resolve_conj()/.resolve_neg() first"
    if problem:
        raise UnsupportedWeightsError(f"Tensor {name!r} {problem}.")


class _RecordBuilder:
    """Deduplicates tensors (ties) and storages (views) while recording names."""

    def __init__(self, register_unnamed: bool = True) -> None:
        self._register_unnamed = register_unnamed
        self._tensor_index: dict[int, int] = {}
        self._tensors: list[torch.Tensor] = []
        self._names: list[list[str]] = []
        self._persistent: list[bool] = []

    def add(self, name: str, tensor: torch.Tensor, persistent: bool) -> int:
        index = self._tensor_index.get(id(tensor))
        if index is None:
            _check_supported(name, tensor)
            index = len(self._tensors)
            self._tensor_index[id(tensor)] = index
            self._tensors.append(tensor)
            self._names.append([])
            self._persistent.append(persistent)
        if name not in self._names[index]:
            self._names[index].append(name)
        return index

    def index_of(self, tensor: torch.Tensor) -> int | None:
        """Index of a tensor, registering tensors the walk could not name (closures, slots)."""
        index = self._tensor_index.get(id(tensor))
        if index is None and self._register_unnamed:
            index = self.add(f"_unnamed.{len(self._tensors)}", tensor, True)
        return index

    def pickle_skeleton(self, obj: Any) -> bytes:
        buf = io.BytesIO()
        _SkeletonPickler(buf, self).dump(obj)
        return buf.getvalue()

    def finish(self) -> tuple[list[TensorRecord], list[torch.Tensor]]:
        storage_of: dict[tuple[str, int], int] = {}
        groups: list[list[int]] = []
        for i, tensor in enumerate(self._tensors):
            key = (str(tensor.device), tensor.untyped_storage().data_ptr())
            if tensor.untyped_storage().nbytes() == 0:
                key = ("empty", 0)
            if key not in storage_of:
                storage_of[key] = len(groups)
                groups.append([])
            groups[storage_of[key]].append(i)
        records: dict[int, TensorRecord] = {}
        storages: list[torch.Tensor] = []
        for s, members in enumerate(groups):
            start, end = _byte_span([self._tensors[i] for i in members])
            # Views of one allocation may report storages of different lengths: take the longest.
            widest = max(members, key=lambda i: self._tensors[i].untyped_storage().nbytes())
            storages.append(_byte_view(self._tensors[widest], start, end))
            for i in members:
                t = self._tensors[i]
                offset_bytes = t.storage_offset() * t.element_size() - start
                records[i] = TensorRecord(
                    names=tuple(self._names[i]),
                    dtype=dtype_name(t.dtype),
                    shape=tuple(t.shape),
                    stride=tuple(t.stride()),
                    storage_offset=offset_bytes // t.element_size(),
                    storage=s,
                    is_parameter=isinstance(t, nn.Parameter),
                    requires_grad=t.requires_grad,
                    persistent=self._persistent[i],
                )
        return [records[i] for i in range(len(self._tensors))], storages


def _byte_span(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """The bytes of a storage that the tensors actually use, start aligned down."""
    starts, ends = [], []
    for t in tensors:
        begin = t.storage_offset() * t.element_size()
        extent = 0 if t.numel() == 0 else 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
        starts.append(begin)
        ends.append(begin + extent * t.element_size())
    start = int(min(starts)) // _ALIGN * _ALIGN
    return start, int(max(max(ends), start))


def _byte_view(tensor: torch.Tensor, start: int, end: int) -> torch.Tensor:
    storage = tensor.untyped_storage()
    if storage.device.type != "cpu":
        storage = storage.cpu()
    view = torch.empty(0, dtype=torch.uint8)
    return view.set_(storage, start, (end - start,), (1,))


class _SkeletonPickler(cloudpickle.Pickler):
    """Pickles the object graph with tensors as references into the manifest."""

    def __init__(self, file: io.BytesIO, builder: _RecordBuilder) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._builder = builder

    def persistent_id(self, obj: Any) -> tuple[str, int] | None:
        index = self._builder.index_of(obj) if isinstance(obj, torch.Tensor) else None
        return None if index is None else (PERSISTENT_TAG, index)
