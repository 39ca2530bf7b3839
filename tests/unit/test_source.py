"""Remote checkpoints: downloaded once, and only the files that are loaded (fsspec's in-memory filesystem)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from zerocopy_runtime._errors import CheckpointError
from zerocopy_runtime._source import files_to_download, local_path
from zerocopy_runtime.config import ModelSource

pytestmark = pytest.mark.unit


def source(uri: str) -> ModelSource:
    """memory:// is not a scheme users may write; the download path is the same for every fsspec scheme."""
    return ModelSource.model_construct(uri=uri, sha256=None)


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A hub-like model folder in memory: weights in several formats, config, and a subfolder."""
    monkeypatch.setenv("ZEROCOPY_CACHE", str(tmp_path / "cache"))
    root = f"/repo-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("memory")
    files = {
        "model.safetensors": b"S" * 64,
        "pytorch_model.bin": b"B" * 64,
        "flax_model.msgpack": b"F" * 64,
        "config.json": b"{}",
        "onnx/model.onnx": b"O" * 64,
    }
    for name, data in files.items():
        fs.pipe(f"{root}/{name}", data)
    return f"memory://{root}"


def test_a_model_folder_downloads_one_weights_format_and_its_json(repo: str) -> None:
    path = local_path(source(repo))
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    assert (path / "model.safetensors").read_bytes() == b"S" * 64


def test_a_second_call_reuses_the_download(repo: str) -> None:
    first = local_path(source(repo))
    fsspec.filesystem("memory").rm(repo.removeprefix("memory://"), recursive=True)
    assert local_path(source(repo)) == first


def test_a_single_remote_file_is_downloaded_as_is(repo: str) -> None:
    path = local_path(source(f"{repo}/pytorch_model.bin"))
    assert path.read_bytes() == b"B" * 64


def test_a_folder_without_weights_is_refused_by_name(repo: str) -> None:
    with pytest.raises(CheckpointError, match=r"no \.safetensors"):
        local_path(source(f"{repo}/onnx"))


def test_a_missing_remote_object_names_the_uri(repo: str) -> None:
    with pytest.raises(CheckpointError, match=r"Cannot download 'memory://.*/nope.safetensors'"):
        local_path(source(f"{repo}/nope.safetensors"))


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["a.safetensors", "b.bin", "config.json", "tf_model.h5"], ["a.safetensors", "config.json"]),
        (["pytorch_model.bin", "config.json", "model.onnx"], ["config.json", "pytorch_model.bin"]),
        (["model.onnx", "config.json"], []),
    ],
)
def test_checkpoint_files_prefers_safetensors(names: list[str], expected: list[str]) -> None:
    assert files_to_download(names) == expected


def test_relative_local_paths_are_taken_against_the_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "m.safetensors").write_bytes(b"x")
    monkeypatch.setenv("ZEROCOPY_MODEL_DIR", str(tmp_path))
    assert local_path(source("file://.cache/m.safetensors")) == tmp_path / ".cache" / "m.safetensors"
    assert local_path(source(".cache/m.safetensors")) == tmp_path / ".cache" / "m.safetensors"
    assert local_path(source(f"file://{tmp_path}/.cache/m.safetensors")) == tmp_path / ".cache" / "m.safetensors"
    monkeypatch.setenv("ZEROCOPY_MODEL_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="does not exist on this node"):
        local_path(source("file://.cache/m.safetensors"))
