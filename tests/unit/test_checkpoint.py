"""Checkpoints are read as mapped file pages, and bad files get errors that say what to do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import ALL_DTYPES, same_bits, sample
from zerocopy_runtime import CheckpointError
from zerocopy_runtime._checkpoint import load_mapped, safetensors_layout

pytestmark = pytest.mark.unit


def test_safetensors_round_trip_is_bitwise_for_every_dtype(tmp_path: Path) -> None:
    tensors = {str(d): sample(d) for d in ALL_DTYPES} | {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 3)}
    save_file(tensors, tmp_path / "m.safetensors")
    mapped = load_mapped(tmp_path / "m.safetensors")
    reference = load_file(tmp_path / "m.safetensors")
    assert mapped.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mapped[name].dtype == tensor.dtype
        assert mapped[name].shape == tensor.shape
        assert same_bits(mapped[name], tensor), name


def test_shard_directory_merges_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    assert sorted(load_mapped(tmp_path)) == ["a", "b"]


def test_torch_state_dict_keeps_shared_storage(tmp_path: Path) -> None:
    weight = torch.randn(4, 4)
    torch.save({"w": weight, "w_t": weight.t()}, tmp_path / "m.pt")
    state = load_mapped(tmp_path / "m.pt")
    assert state["w"].untyped_storage().data_ptr() == state["w_t"].untyped_storage().data_ptr()
    assert torch.equal(state["w_t"], weight.t())


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mapped(tmp_path / "nope.safetensors")


def test_truncated_safetensors_is_reported(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1000)}, tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "m.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_mapped(tmp_path / "m.safetensors")


def test_garbage_torch_file_is_reported(tmp_path: Path) -> None:
    (tmp_path / "m.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="torch state dict"):
        load_mapped(tmp_path / "m.pt")


def test_empty_directory_is_reported(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        load_mapped(tmp_path)


_ANON_PROBE = """
import sys, torch
from zerocopy_runtime._checkpoint import load_mapped, safetensors_layout
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
before = anon()
tensors = load_mapped(sys.argv[1])
total = sum(float(t.sum()) for t in tensors.values())  # reads every byte, allocates no temporary
print(anon() - before, sum(t.nbytes for t in tensors.values()))
"""


def test_reading_safetensors_does_not_materialise_weights_in_heap(tmp_path: Path) -> None:
    save_file({f"w{i}": torch.randn(2**20) for i in range(16)}, tmp_path / "big.safetensors")  # 64 MiB
    out = subprocess.run(
        [sys.executable, "-c", _ANON_PROBE, str(tmp_path / "big.safetensors")],
        capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    anon_growth, nbytes = map(int, out.stdout.split())
    assert nbytes == 64 * 2**20
    # The 64 MiB stay in the page cache; the heap grows by bookkeeping only.
    assert anon_growth < nbytes / 16


def test_corrupt_safetensors_header_is_reported(tmp_path: Path) -> None:
    (tmp_path / "huge.safetensors").write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        load_mapped(tmp_path / "huge.safetensors")
    save_file({"a": torch.ones(4)}, tmp_path / "bad.safetensors")
    data = (tmp_path / "bad.safetensors").read_bytes().replace(b'"shape":[4]', b'"shape":[5]')
    (tmp_path / "bad.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"'a'.*shape \[5\] of F32 needs 20 bytes, but its range holds 16"):
        load_mapped(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="'a'"):  # the torch-free reader of the owner says the same
        safetensors_layout(tmp_path / "bad.safetensors")
