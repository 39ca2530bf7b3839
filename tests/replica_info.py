"""A replica's `/-/info` answer for operator tests that play the replicas: the runtime's own contract type."""

from __future__ import annotations

from typing import Any

from zerocopy_runtime.contract import ReplicaInfo


def replica_info(**changes: Any) -> ReplicaInfo:
    """A valid answer of a tensor replica, with `changes` applied."""
    fields: dict[str, Any] = {
        "name": "m",
        "weights": "m-0123",
        "revision": "0123",
        "bytes_shared": 3 * 2**20,
        "tensor_count": 8,
        "attach_seconds": 0.01,
        "shared": True,
        "write_guard": True,
        "node_id": "node",
        "pid": 1,
        "owner_pid": 2,
        "object_ids": [],
        "max_batch_size": 1,
        "largest_batch": 1,
        "reattached": 0,
        "startup_seconds": 1.0,
        "task": "tensor",
    }
    return ReplicaInfo(**fields | changes)
