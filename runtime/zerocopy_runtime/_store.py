"""Facts about the local node's object store: room left, and where it is mapped."""

from __future__ import annotations

from dataclasses import dataclass

import ray

#: Ray names the shared-memory file behind its object store like this.
_PLASMA_MARKER = "/plasma"


@dataclass(frozen=True)
class StoreUsage:
    capacity: int
    used: int

    @property
    def free(self) -> int:
        return max(self.capacity - self.used, 0)


def local_store_usage() -> StoreUsage:
    """Object store capacity and use on this process's node, from its raylet.

    Ray has no public API for free store memory; the raylet's node stats are
    what `ray memory` itself reads.
    """
    from ray._private.internal_api import node_stats

    node_id = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]), None)
    if node is None:
        raise RuntimeError(f"Ray lists no live node {node_id}: is this process connected to a running cluster?")
    stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
    store = stats.store_stats
    return StoreUsage(capacity=int(store.object_store_bytes_avail), used=int(store.object_store_bytes_used))


def store_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the object store (from /proc/self/maps)."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and _PLASMA_MARKER in fields[5] and "s" in fields[1]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def all_inside_store(pointers: list[tuple[int, int]]) -> bool:
    """True when every (address, nbytes) run lies inside a shared store mapping."""
    ranges = store_mappings()
    return all(any(start <= addr and addr + max(n, 1) <= end for start, end in ranges) for addr, n in pointers)


def format_bytes(n: float) -> str:
    """Bytes for people: 512 B, 3.0 MiB, 1.5 GiB (GiB is the largest unit)."""
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if abs(n) < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"
