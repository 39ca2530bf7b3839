"""The detached actor that owns a published model's store objects.

Ray frees an object when the process that created it dies, so the bytes must
be created by a process that outlives replicas and publishers: this actor.
It never runs user code, holds no CPU reservation, and is pinned to the node
whose store it fills. It stays light: it copies bytes and never imports torch
(what only torch reads, a `.pt`/`.bin` state dict or a GGUF file that
transformers dequantizes, is read by a child process: `_convert`), and it maps
a checkpoint only while copying it.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ._cast import FLOATING, cast_bytes, cast_size
from ._checkpoint import SafetensorsEntry, safetensors_layout
from ._convert import converted
from ._errors import CheckpointError, ObjectStoreFullError
from ._guard import PAGE
from ._manifest import Manifest, StorageRecord, TensorRecord
from ._source import side_files
from ._spool import map_file
from ._store import format_bytes, local_store_usage

NAMESPACE = "zerocopy"
_PREFIX = "zerocopy-weights:"


def actor_name(name: str) -> str:
    return _PREFIX + name


def published_names(namespace: str = NAMESPACE) -> list[str]:
    """Names of every model currently published in `namespace`."""
    from ray.util import list_named_actors

    return sorted(
        a["name"].removeprefix(_PREFIX)
        for a in list_named_actors(all_namespaces=True)
        if a["namespace"] == namespace and a["name"].startswith(_PREFIX)
    )


def plan_chunks(sizes: list[int], chunk_bytes: int) -> list[list[int]]:
    """Group storages, in order, into store objects of about `chunk_bytes` each."""
    chunks: list[list[int]] = [[]]
    filled = 0
    for i, size in enumerate(sizes):
        if chunks[-1] and filled + size > chunk_bytes:
            chunks.append([])
            filled = 0
        chunks[-1].append(i)
        filled += size
    return chunks


#: Ray aligns out-of-band buffers of at least this size to 64 bytes, smaller ones to 8 only.
_RAY_ALIGNED_BUFFER = 2048


def chunk_payload(arrays: list[np.ndarray]) -> list[np.ndarray]:
    """Storages framed by one page of padding on each side, each 64-byte aligned in the store.

    The padding guarantees that the whole pages covering the storages lie
    inside this object, so they can be write-protected without touching a
    neighbouring object. Storages under 2 KiB are padded up to it (a small
    copy) so that Ray aligns them like the rest: a 16-byte complex128 at an
    8-byte boundary would be undefined behaviour.
    """
    # Two distinct pads: pickle would store one array listed twice only once.
    return [np.zeros(PAGE, dtype=np.uint8), *map(_aligned, arrays), np.zeros(PAGE, dtype=np.uint8)]


def _aligned(array: np.ndarray) -> np.ndarray:
    if array.nbytes >= _RAY_ALIGNED_BUFFER:
        return array
    padded = np.zeros(_RAY_ALIGNED_BUFFER, dtype=np.uint8)
    padded[: array.nbytes] = array
    return padded


def store_bytes(sizes: list[int], chunks: list[list[int]]) -> int:
    """Store memory that publishing these storages in these chunks takes, padding included."""
    return sum(max(size, _RAY_ALIGNED_BUFFER) for size in sizes) + 2 * PAGE * len(chunks)


def storage_records(sizes: list[int], chunks: list[list[int]]) -> list[StorageRecord]:
    """Where each storage lands: buffer j + 1 of chunk c (buffer 0 is the leading pad)."""
    return [StorageRecord(c, j + 1, sizes[i]) for c, members in enumerate(chunks) for j, i in enumerate(members)]


def check_room(needed: int, what: str) -> None:
    usage = local_store_usage()
    if needed > usage.free:
        raise ObjectStoreFullError(
            f"{what} needs {format_bytes(needed)} of object store memory, but this node's store has "
            f"{format_bytes(usage.free)} free of {format_bytes(usage.capacity)}. Give Ray a larger store "
            "(ray.init(object_store_memory=...), `ray start --object-store-memory=...`, or "
            "objectStoreMemory in the ZeroCopyModel worker group), or release other published models."
        )


# `progress`, `describe` and `usage` answer while a publish call runs (a replica waiting for this copy must
# see that it is still being published, and give up at its deadline); the other methods run one at a time.
# (Ray's type stubs lack `concurrency_groups`, which ray.remote accepts for actors.)
@ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"progress": 1, "query": 1})  # type: ignore[call-overload]
class WeightOwner:
    """Holds one model's store objects and its manifest."""

    def __init__(self) -> None:
        self._chunks: list[ray.ObjectRef] = []
        self._manifest: Manifest | None = None
        self._files: ray.ObjectRef | None = None
        self._spool: dict[str, np.ndarray] = {}
        self._users: set[tuple[str, str]] = set()
        self._apps: set[str] = set()
        self._started = time.time()
        self._copied = (0, 0)  # bytes in the store so far, of the total (publish_checkpoint only)

    def adopt_spooled(self, path: str, placed: list[tuple[int, int]]) -> None:
        """Copy one chunk from the publisher's spool file into the store, as an object this actor owns."""
        if path not in self._spool:
            self._spool[path] = map_file(path)  # mapped once, reused for every chunk
        buffer = self._spool[path]
        self._chunks.append(ray.put(chunk_payload([buffer[offset : offset + size] for offset, size in placed])))

    def seal(self, manifest: Manifest) -> None:
        self._manifest = manifest
        self._spool.clear()

    def publish_checkpoint(
        self, path: str, chunk_bytes: int, dtype: str | None = None, files: str | None = None
    ) -> None:
        """Read a checkpoint in this process, straight from its mapped pages into the store; with `dtype`, every
        floating tensor is cast on the way, one chunk at a time. `files`: a folder whose config, tokenizer and
        chat template go into the store too (one small object), for replicas on nodes that lack them."""
        started = time.perf_counter()
        if files is not None:
            self._files = ray.put(side_files(Path(files)))
        with contextlib.ExitStack() as stack:
            layout = safetensors_layout(path)
            if layout is None:  # only torch reads it: a child process does, and leaves the bytes in a file
                records, arrays, kind = stack.enter_context(converted(path))
            else:
                (records, arrays), kind = _safetensors_storages(layout), "state_dict"
            casts = _casts(records, len(arrays), dtype)
            sizes = [_cast_size(array, cast) for array, cast in zip(arrays, casts, strict=True)]
            chunks = plan_chunks(sizes, chunk_bytes)
            check_room(store_bytes(sizes, chunks), f"Checkpoint {path!r}")
            done, total = 0, sum(sizes)
            for members in chunks:
                self._copied = (done, total)
                payload = [_cast(arrays[i], casts[i]) for i in members]
                self._chunks.append(ray.put(chunk_payload(payload)))
                done += sum(sizes[i] for i in members)
            self._copied = (done, total)
            del arrays, payload
        if dtype is not None:
            records = [replace(r, dtype=dtype) if r.dtype in FLOATING else r for r in records]
        self._manifest = Manifest(
            tensors=tuple(records),
            storages=tuple(storage_records(sizes, chunks)),
            chunk_count=len(self._chunks),
            kind=kind,
            metadata={"source": str(Path(path).resolve()), **({"dtype": dtype} if dtype else {})},
            publish_seconds=time.perf_counter() - started,
        )
        _give_back_heap()

    @ray.method(concurrency_group="progress")
    def progress(self) -> tuple[int, int]:
        """Bytes copied so far and in all, while `publish_checkpoint` runs."""
        return self._copied

    @ray.method(concurrency_group="query")
    def describe(self) -> tuple[Manifest | None, list[ray.ObjectRef], int, ray.ObjectRef | None]:
        return self._manifest, list(self._chunks), os.getpid(), self._files

    def register(self, user: str, namespace: str, app: str | None = None) -> None:
        """Record a named actor (a Serve replica) that attached to these weights, and its Serve application."""
        self._users.add((user, namespace))
        if app is not None:
            self._apps.add(app)

    @ray.method(concurrency_group="query")
    def usage(self) -> tuple[float, bool, list[str]]:
        """When this owner started, whether any registered user is still alive, and the Serve applications that
        have used it."""
        return self._started, self._in_use(), sorted(self._apps)

    def _in_use(self) -> bool:
        alive = set()
        for user, namespace in self._users:
            try:
                ray.get_actor(user, namespace=namespace)
            except ValueError:
                continue
            alive.add((user, namespace))
        self._users = alive
        return bool(alive)


def _safetensors_storages(layout: list[SafetensorsEntry]) -> tuple[list[TensorRecord], list[np.ndarray]]:
    """One storage per tensor, as byte ranges of the mapped files (safetensors never shares bytes between
    tensors); the empty ones share one empty storage. The same records `_collect` makes of the tensors."""
    mapped = {file: map_file(file) for file in dict.fromkeys(entry.file for entry in layout)}
    records: list[TensorRecord] = []
    arrays: list[np.ndarray] = []
    empty: int | None = None
    for entry in layout:
        if entry.end == entry.begin:
            if empty is None:
                empty = len(arrays)
                arrays.append(np.zeros(0, dtype=np.uint8))
            storage = empty
        else:
            storage = len(arrays)
            arrays.append(mapped[entry.file][entry.begin : entry.end])
        stride = tuple(math.prod(max(n, 1) for n in entry.shape[i + 1 :]) for i in range(len(entry.shape)))  # torch's
        records.append(TensorRecord((entry.name,), entry.dtype, entry.shape, stride, 0, storage, False, False, True))
    return records, arrays


def _casts(records: list[TensorRecord], storages: int, dtype: str | None) -> list[tuple[str, str] | None]:
    """(from, to) for each storage a cast to `dtype` changes, None for those it leaves (not floating, or already
    `dtype`). A storage is cast whole, once, whatever number of tensors view it (tied weights, views of one fused
    storage stay one storage); tensors viewing one storage as different dtypes cannot be cast."""
    casts: list[tuple[str, str] | None] = [None] * storages
    if dtype is None:
        return casts
    seen: dict[int, TensorRecord] = {}
    for record in records:
        first = seen.setdefault(record.storage, record)
        if first.dtype != record.dtype and (first.dtype in FLOATING or record.dtype in FLOATING):
            raise CheckpointError(
                f"Tensors {first.names[0]!r} ({first.dtype}) and {record.names[0]!r} ({record.dtype}) view the same "
                f"bytes, so they cannot be cast to {dtype}: save them as separate tensors, or leave model.dtype unset."
            )
        if record.dtype in FLOATING and record.dtype != dtype:
            casts[record.storage] = (record.dtype, dtype)
    return casts


def _give_back_heap() -> None:
    """Return the heap a read left behind (a torch state dict's, a GGUF's dequantized tensors, cast buffers) to
    the system: the owner lives as long as the copy, and glibc keeps freed arenas mapped."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _cast_size(array: np.ndarray, cast: tuple[str, str] | None) -> int:
    return array.nbytes if cast is None else cast_size(array.nbytes, *cast)


def _cast(array: np.ndarray, cast: tuple[str, str] | None) -> np.ndarray:
    return array if cast is None else cast_bytes(array, *cast)


def start_owner(name: str, namespace: str) -> Any:
    """Create the named, detached owner on this node (the store the caller will use)."""
    node_id = ray.get_runtime_context().get_node_id()
    return WeightOwner.options(  # type: ignore[attr-defined]
        name=actor_name(name),
        namespace=namespace,
        lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote()
