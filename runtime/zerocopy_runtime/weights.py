"""Publish weights once into the object store; attach to them zero-copy anywhere on the node.

`publish` puts a model's bytes in the store as a few large objects owned by a
detached actor, plus a small manifest. `attach` maps those objects (no copy),
rebuilds the model around them, and write-protects the pages. Attach cost
grows with the number of tensors, not with their size.
"""

from __future__ import annotations

import gc
import io
import os
import pickle
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from torch import nn

from . import _guard
from ._cast import FLOATING
from ._checkpoint import checkpoint_files
from ._collect import PERSISTENT_TAG, Collected, collect, models_in
from ._dtypes import DTYPES
from ._errors import (
    AlreadyPublishedError,
    CheckpointError,
    PublishInProgressError,
    WeightsNotFoundError,
    ZeroCopyError,
)
from ._manifest import Manifest, StorageRecord, TensorRecord
from ._owner import NAMESPACE, actor_name, check_room, plan_chunks, start_owner, storage_records, store_bytes
from ._spool import Spool, layout
from ._store import all_inside_store

# Ray's arrays are read-only views and torch warns about each one; the page protection is
# what stops writes. A filter scoped to this module: `catch_warnings` around the calls
# would reset the once-only registry and make every call take the slow warning path.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024

#: Called as progress(bytes_done, bytes_total) while publishing.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PublishedModel:
    """A cheap, picklable handle: the manifest and references to the store objects."""

    name: str
    namespace: str
    manifest: Manifest
    refs: tuple[ray.ObjectRef, ...]
    owner_pid: int
    #: The model folder's side files (config, tokenizer, chat template) when published with them: {path: bytes}.
    files: ray.ObjectRef | None = None

    @property
    def nbytes(self) -> int:
        return self.manifest.nbytes


@dataclass(frozen=True)
class AttachReport:
    """What one attach did, and the evidence that nothing was copied."""

    name: str
    bytes_shared: int
    tensor_count: int
    storage_count: int
    attach_seconds: float
    in_object_store: bool
    write_guard: bool
    pid: int
    node_id: str


def publish(
    source: Any,
    *,
    name: str | None = None,
    namespace: str = NAMESPACE,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    only: Sequence[str] | None = None,
    progress: Progress | None = None,
    dtype: str | None = None,
    files: str | os.PathLike[str] | None = None,
) -> PublishedModel:
    """Put `source` in this node's object store once and return its handle.

    `source` is an nn.Module, any object holding modules (a pipeline), a state
    dict, or a checkpoint path (safetensors file or shard directory, torch
    `.pt`). Checkpoints are read by the owner actor itself, straight from the
    file's pages. The objects stay until `release(name)`, whatever happens to
    the calling process. `only` restricts sharing to those attributes of a
    pipeline (the rest travels by value). `progress(done, total)` is called
    with bytes copied into the store as publishing goes on, ending with done == total. `dtype` (float32,
    bfloat16, float16; checkpoints only) casts every floating tensor once, as it is copied into the store.
    `files` (checkpoints only): a folder whose config, tokenizer and chat template are published beside the
    weights, so that a node without the checkpoint gets them from the store (`PublishedModel.files`).
    """
    name = name or f"model-{uuid.uuid4().hex[:12]}"
    taken = AlreadyPublishedError(
        f"Weights named {name!r} are already published; release({name!r}) first or pick another name."
    )
    try:
        ray.get_actor(actor_name(name), namespace=namespace)
    except ValueError:
        pass
    else:
        raise taken
    if dtype is not None and dtype not in FLOATING:
        raise ZeroCopyError(f"dtype {dtype!r} is not one of {', '.join(sorted(FLOATING))}")
    if isinstance(source, (str, os.PathLike)):
        collected = None
        checkpoint_files(Path(source))  # a bad path fails here, before any actor starts
    elif dtype is not None:
        raise ZeroCopyError("dtype casts a checkpoint as it is published; cast an in-memory model with .to() first")
    elif files is not None:
        raise ZeroCopyError("files travel with a checkpoint; an in-memory model is published without them")
    else:
        collected = collect(source, only)
        if not collected.records:
            raise ZeroCopyError(f"{type(source).__name__} holds no tensors: there is nothing to publish.")
        sizes = [s.numel() for s in collected.storages]
        chunks = plan_chunks(sizes, chunk_bytes)
        check_room(store_bytes(sizes, chunks), f"Model {name!r}")
    try:
        owner = start_owner(name, namespace)
    except ValueError as exc:  # another publisher took the name in between
        raise taken from exc
    try:
        if collected is None:
            folder = None if files is None else str(Path(files).resolve())
            call = owner.publish_checkpoint.remote(str(Path(source).resolve()), chunk_bytes, dtype, folder)
            _wait_reporting(call, owner, progress)
        else:
            ray.get(owner.describe.remote())  # started: the copy timing excludes process start-up
            _hand_over(owner, collected, chunks, sizes, progress)
    except BaseException:
        ray.kill(owner)
        raise
    return lookup(name, namespace=namespace)


def _wait_reporting(call: ray.ObjectRef, owner: Any, progress: Progress | None) -> None:
    """Wait for the owner's publish call, asking it how far it got twice a second."""
    if progress is not None:
        while not ray.wait([call], timeout=0.5)[0]:
            progress(*ray.get(owner.progress.remote()))
    ray.get(call)
    if progress is not None:
        progress(*ray.get(owner.progress.remote()))


def _hand_over(
    owner: Any, collected: Collected, chunks: list[list[int]], sizes: list[int], progress: Progress | None
) -> None:
    """Fill one spool buffer while the owner copies the other into the store."""
    started = time.perf_counter()
    done, total = 0, sum(sizes)
    spool = Spool(max(layout([sizes[i] for i in members])[1] for members in chunks))
    pending: list[Any] = [None, None]
    try:
        for c, members in enumerate(chunks):
            slot = c % 2
            if pending[slot] is not None:
                ray.get(pending[slot])
                if progress is not None:
                    progress(done, total)
            placed = spool.fill(slot, [collected.storages[i] for i in members])
            pending[slot] = owner.adopt_spooled.remote(spool.paths[slot], placed)
            done += sum(sizes[i] for i in members)
        ray.get([p for p in pending if p is not None])
        if progress is not None:
            progress(total, total)
    finally:
        spool.close()
    manifest = Manifest(
        tensors=tuple(collected.records),
        storages=tuple(storage_records(sizes, chunks)),
        chunk_count=len(chunks),
        skeleton=collected.skeleton,
        kind=collected.kind,
        publish_seconds=time.perf_counter() - started,
    )
    ray.get(owner.seal.remote(manifest))


def lookup(name: str, *, namespace: str = NAMESPACE) -> PublishedModel:
    """The handle of weights published under `name`, from any process in the cluster."""
    try:
        owner = ray.get_actor(actor_name(name), namespace=namespace)
    except ValueError:
        raise WeightsNotFoundError(
            f"No weights are published as {name!r} in namespace {namespace!r}: publish them first "
            f"(zerocopy_runtime.publish(model, name={name!r})) or check the name; they may have been released."
        ) from None
    try:
        manifest: Manifest | None
        refs: list[ray.ObjectRef]
        pid: int
        files: ray.ObjectRef | None
        manifest, refs, pid, files = ray.get(owner.describe.remote())
    except ray.exceptions.RayActorError:
        raise WeightsNotFoundError(
            f"The owner of weights {name!r} has died or was released: publish them again."
        ) from None
    if manifest is None:
        raise PublishInProgressError(f"Weights {name!r} are still being published; retry once publish() has returned.")
    return PublishedModel(name, namespace, manifest, tuple(refs), pid, files)


def release(model: PublishedModel | str, *, namespace: str = NAMESPACE, timeout: float = 30.0) -> None:
    """Free the published bytes. Processes still attached keep their pages until they let go.

    Returns once the name is free again, so publishing under it right away works.
    """
    name = model.name if isinstance(model, PublishedModel) else model
    namespace = model.namespace if isinstance(model, PublishedModel) else namespace
    try:
        ray.kill(ray.get_actor(actor_name(name), namespace=namespace), no_restart=True)
    except ValueError:
        raise WeightsNotFoundError(f"No weights are published as {name!r}; nothing to release.") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor_name(name), namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    raise ZeroCopyError(f"The owner of {name!r} was killed but Ray still lists its name after {timeout:.0f} s.")


_REPORTS: dict[int, AttachReport] = {}


def attach(
    model: PublishedModel | str,
    *,
    factory: Callable[[], nn.Module] | None = None,
    device: str | torch.device = "cpu",
    write_guard: bool = True,
    strict: bool = True,
    namespace: str = NAMESPACE,
) -> Any:
    """Rebuild the published object around read-only views of the store. No weight is copied.

    Without `factory`, a published module or pipeline comes back as it was
    (same classes, attributes and ties) and a state dict comes back as a dict.
    With `factory`, it is called with parameters on the meta device and every
    parameter and buffer is pointed at its published bytes (names, shapes and
    dtypes must match, as in `load_state_dict(strict=True)`).
    `strict=False` tolerates published tensors the architecture does not use
    (missing or mismatched ones are always errors).
    `write_guard` maps the pages read-only: a write through a weight then
    kills this process (SIGSEGV) instead of corrupting every other replica.
    """
    handle = model if isinstance(model, PublishedModel) else lookup(model, namespace=namespace)
    with _gc_paused():
        obj, report = _attach(handle, factory, write_guard, strict, flat=False)
    if torch.device(device).type != "cpu":
        obj = move_to(obj, device)
    _remember(obj, report)
    return obj


def attach_tensors(
    model: PublishedModel | str, *, write_guard: bool = True, namespace: str = NAMESPACE
) -> tuple[dict[str, torch.Tensor], AttachReport]:
    """Every published tensor by name, as read-only views of the store, with the attach's report.

    For engines that build their own modules and take weights as (name, tensor)
    pairs (vLLM's `load_weights`), whatever the weights were published from.
    """
    handle = model if isinstance(model, PublishedModel) else lookup(model, namespace=namespace)
    with _gc_paused():
        tensors, report = _attach(handle, None, write_guard, strict=True, flat=True)
    return tensors, report


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Attach makes thousands of small objects; in a worker with torch and Ray loaded that
    triggers a full cyclic-GC pass (~100 ms here), longer than the whole attach."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _attach(
    handle: PublishedModel, factory: Callable[[], nn.Module] | None, write_guard: bool, strict: bool, flat: bool
) -> tuple[Any, AttachReport]:
    started = time.perf_counter()
    manifest = handle.manifest
    chunk_arrays = ray.get(list(handle.refs))
    by_chunk: list[list[StorageRecord]] = [[] for _ in chunk_arrays]
    for record in manifest.storages:
        by_chunk[record.chunk].append(record)
    storages: list[torch.UntypedStorage] = []
    for arrays, records in zip(chunk_arrays, by_chunk, strict=True):
        storages += _Region(arrays, write_guard).storages(records)
    tensors = [_tensor(rec, storages[rec.storage]) for rec in manifest.tensors]
    if factory is not None:
        obj: Any = _assign(factory, manifest, tensors, strict)
    elif manifest.skeleton is not None and not flat:
        obj = load_skeleton(manifest.skeleton, tensors)
    else:
        obj = {name: tensors[i] for name, i in manifest.by_name().items()}
    report = AttachReport(
        name=handle.name,
        bytes_shared=manifest.nbytes,
        tensor_count=len(tensors),
        storage_count=len(storages),
        attach_seconds=time.perf_counter() - started,
        in_object_store=all_inside_store([(s.data_ptr(), s.nbytes()) for s in storages]),
        write_guard=write_guard,
        pid=os.getpid(),
        node_id=ray.get_runtime_context().get_node_id(),
    )
    return obj, report


def attach_report(obj: Any) -> AttachReport:
    """The report of the attach that produced `obj`."""
    try:
        return _REPORTS[id(obj)]
    except KeyError:
        raise ZeroCopyError(
            "No attach report for this object: it was not produced by zerocopy_runtime.attach(), "
            "or it cannot be weakly referenced (a plain dict of tensors), so no report is kept for it."
        ) from None


def _remember(obj: Any, report: AttachReport) -> None:
    try:
        weakref.finalize(obj, _REPORTS.pop, id(obj), None)
    except TypeError:  # not weak-referenceable: keep no report rather than leak
        return
    _REPORTS[id(obj)] = report


def move_to(obj: Any, device: str | torch.device) -> Any:
    """Move a module, a dict of tensors, or every model reachable from a pipeline to `device`.

    Moving makes private copies on the device; the shared bytes stay as they are.
    """
    if isinstance(obj, nn.Module):
        return obj.to(device)
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {k: v.to(device) for k, v in obj.items()}
    for _, module in models_in(obj):
        module.to(device)  # in place: nn.Module.to returns the same object
    return obj


class _Region:
    """One store object's buffers, write-protected while any of its storages is alive.

    Each storage is `torch.from_numpy` of the array Ray returned (so Ray's own
    buffer keeps the pages mapped). Every such array holds the guard once and
    gives it back when it dies; the last one lifts the protection, before Ray
    may reuse the pages.
    """

    def __init__(self, arrays: list[np.ndarray], guard: bool) -> None:
        self._arrays = arrays
        self._pages = _guard.inner_pages(arrays[0].ctypes.data, arrays[-1].ctypes.data + arrays[-1].nbytes)
        self._guard = guard

    def storages(self, records: Sequence[StorageRecord]) -> list[torch.UntypedStorage]:
        out = []
        for rec in records:
            array = self._arrays[rec.index][: rec.nbytes]  # small storages were padded
            out.append(torch.from_numpy(array).untyped_storage())
            if self._guard:
                _guard.acquire(*self._pages)
                weakref.finalize(array, _guard.release, *self._pages)
        return out


def _tensor(rec: TensorRecord, storage: torch.UntypedStorage) -> torch.Tensor:
    tensor = torch.empty(0, dtype=DTYPES[rec.dtype]).set_(storage, rec.storage_offset, rec.shape, rec.stride)
    return nn.Parameter(tensor, requires_grad=rec.requires_grad) if rec.is_parameter else tensor


def meta_tensors(manifest: Manifest) -> list[torch.Tensor]:
    """The manifest's tensors on the meta device: right types and shapes, no bytes."""
    tensors = []
    for rec in manifest.tensors:
        tensor = torch.empty_strided(rec.shape, rec.stride, dtype=DTYPES[rec.dtype], device="meta")
        tensors.append(nn.Parameter(tensor, requires_grad=rec.requires_grad) if rec.is_parameter else tensor)
    return tensors


def load_skeleton(data: bytes, tensors: list[torch.Tensor]) -> Any:
    """Unpickle a published object, resolving every tensor reference to `tensors`."""
    return _SkeletonUnpickler(io.BytesIO(data), tensors).load()


class _SkeletonUnpickler(pickle.Unpickler):
    # Module level on purpose: a class made inside a function lives in a reference
    # cycle, and would keep `tensors` (and the store pages) alive until a GC pass.
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self._tensors = tensors

    def persistent_load(self, pid: Any) -> torch.Tensor:
        tag, index = pid
        if tag != PERSISTENT_TAG:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        return self._tensors[index]


@contextmanager
def _params_on_meta() -> Any:
    """Build modules with parameters on the meta device but real buffers.

    Non-persistent buffers (rotary tables, masks) are often absent from
    checkpoints and computed in `__init__`; keeping buffers real preserves
    them, while parameters, the bulk of the bytes, are never allocated.
    """
    original = nn.Module.register_parameter
    on_meta: dict[int, nn.Parameter] = {}  # one meta twin per parameter keeps ties made before registering

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            if id(param) not in on_meta:
                on_meta[id(param)] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
                weakref.finalize(param, on_meta.pop, id(param), None)  # a freed id may be reused
            module._parameters[name] = on_meta[id(param)]

    with _META_LOCK:
        nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


_META_LOCK = threading.Lock()


def _assign(
    factory: Callable[[], nn.Module], manifest: Manifest, tensors: list[torch.Tensor], strict: bool
) -> nn.Module:
    with _params_on_meta():
        module = factory()
    index = manifest.by_name()
    used: set[int] = set()
    missing: list[str] = []
    mismatched: list[str] = []
    for kind, slots in (("_parameters", _slots(module, "_parameters")), ("_buffers", _slots(module, "_buffers"))):
        for names, places in slots:
            found = next((index[n] for n in names if n in index), None)
            current = getattr(places[0][0], kind)[places[0][1]]
            if found is None:
                if kind == "_parameters" or all(leaf not in m._non_persistent_buffers_set for m, leaf in places):
                    missing.append(names[0])
                continue
            source = tensors[found]
            used.add(found)  # named by the architecture, whether or not it fits
            # A tie the architecture makes, saved as two tensors on one storage (torch.save of a state_dict):
            # the other name's record is the same view, and is used by this slot too.
            used.update(
                index[n]
                for n in names
                if n in index and _same_view(manifest.tensors[index[n]], manifest.tensors[found])
            )
            if source.shape != current.shape or source.dtype != current.dtype:
                mismatched.append(
                    f"{names[0]!r}: checkpoint {tuple(source.shape)} {source.dtype}, "
                    f"architecture {tuple(current.shape)} {current.dtype}"
                )
                continue
            if kind == "_parameters":
                source = nn.Parameter(source.detach(), requires_grad=current.requires_grad)
            for mod, leaf in places:
                getattr(mod, kind)[leaf] = source
    unexpected = [manifest.tensors[i].names[0] for i in range(len(tensors)) if i not in used]
    problems = []
    if mismatched:
        problems.append("shape/dtype mismatch for " + "; ".join(mismatched[:5]))
    if missing:
        problems.append("missing from the checkpoint: " + ", ".join(missing[:5]))
    if unexpected and strict:
        problems.append("not in the architecture: " + ", ".join(unexpected[:5]))
    if problems:
        raise CheckpointError(
            "The published weights do not match the architecture built by the factory: "
            + " | ".join(problems)
            + ". Check that the factory builds the same model (and dtype) the checkpoint was saved from."
        )
    return module


def _same_view(a: TensorRecord, b: TensorRecord) -> bool:
    return (a.storage, a.storage_offset, a.shape, a.stride, a.dtype) == (
        b.storage,
        b.storage_offset,
        b.shape,
        b.stride,
        b.dtype,
    )


def _slots(module: nn.Module, kind: str) -> list[tuple[list[str], list[tuple[nn.Module, str]]]]:
    """Group every (module, attribute) slot holding the same tensor, with all its names."""
    groups: dict[int, tuple[list[str], list[tuple[nn.Module, str]]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for leaf, tensor in getattr(mod, kind).items():
            if tensor is not None:
                names, places = groups.setdefault(id(tensor), ([], []))
                names.append(f"{mod_name}.{leaf}" if mod_name else leaf)
                places.append((mod, leaf))
    return list(groups.values())
