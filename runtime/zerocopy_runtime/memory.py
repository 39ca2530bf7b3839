"""Memory as the kernel accounts it, so that sharing can be shown rather than claimed.

PSS (proportional set size) charges each shared page to its N mappers at
1/N each: summed over every process that holds a model, it is the real
memory cost, which RSS (counting shared pages once per process) overstates.
"""

from __future__ import annotations

import os


def pss_bytes(pid: int | None = None) -> int:
    """Proportional set size of a process (this one by default), from /proc/<pid>/smaps_rollup."""
    with open(f"/proc/{pid or os.getpid()}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/{pid}/smaps_rollup has no Pss line; is this Linux 4.14 or newer?")


def pss_by_kind(pid: int) -> dict[str, int]:
    """PSS in bytes, whole (`pss`) and by kind of page: anonymous (`anon`: heap), file-backed (`file`: mapped
    files and libraries) and shared memory (`shmem`: the object store), from /proc/<pid>/smaps_rollup."""
    wanted = {"Pss:": "pss", "Pss_Anon:": "anon", "Pss_File:": "file", "Pss_Shmem:": "shmem"}
    out = dict.fromkeys(wanted.values(), 0)
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if parts and parts[0] in wanted:
                out[wanted[parts[0]]] = int(parts[1]) * 1024
    return out


def total_pss(pids: list[int]) -> int:
    """Summed PSS of several processes: what they cost together."""
    return sum(pss_bytes(pid) for pid in pids)
