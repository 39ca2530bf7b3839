"""Turn a model URI into local checkpoint files, and name its revision.

Remote schemes go through fsspec (s3fs, gcsfs, huggingface_hub and aiohttp
provide the filesystems), so credentials come from the usual environment
variables or files of each store, never from the resource.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

from ._errors import CheckpointError
from ._gguf import meant_as_gguf
from .config import ModelSource


def cache_dir() -> Path:
    """Where remote checkpoints land: $ZEROCOPY_CACHE, read at each call so a process can redirect it."""
    return Path(os.environ.get("ZEROCOPY_CACHE") or Path.home() / ".cache" / "zerocopy")


def local_path(source: ModelSource) -> Path:
    """The checkpoint on this node's disk, downloaded once into the cache for remote URIs.

    The checksum is not verified here (see `verify`): only the publisher reads
    the bytes, and hashing gigabytes in every replica would undo fast attach.
    """
    uri = source.uri
    path = model_dir_path(uri) if uri.startswith("file://") or "://" not in uri else _download(uri)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {uri!r} does not exist on this node ({path}); check model.uri.")
    return path


def model_folder(weights: Path) -> Path:
    """Where the model's config, tokenizer and chat template are: beside its weights, or, for a GGUF file
    (which carries them in its metadata), a folder written from it once into the node's cache."""
    if meant_as_gguf(weights):
        from ._gguf import gguf_folder

        return gguf_folder(weights)
    return weights if weights.is_dir() else weights.parent


def model_dir_path(path: str) -> Path:
    """A local path from the resource; relative ones are taken against $ZEROCOPY_MODEL_DIR.

    `zerocopy serve` sets it to the resource file's folder; in a cluster an image that bakes models in
    sets it (the examples image does).
    """
    return Path(os.environ.get("ZEROCOPY_MODEL_DIR") or ".") / path.removeprefix("file://")


def revision(source: ModelSource, path: Path) -> str:
    """A digest naming this revision: the sha256 when given, else the URI and each file's size and mtime; and the
    dtype it is served in (one published copy per dtype)."""
    if source.sha256:
        return (
            source.sha256
            if source.dtype is None
            else hashlib.sha256(f"{source.sha256}:{source.dtype}".encode()).hexdigest()
        )
    digest = hashlib.sha256(source.uri.encode())
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if source.dtype is not None:
        digest.update(f"dtype:{source.dtype}".encode())
    return digest.hexdigest()


def verify(path: Path, source: ModelSource) -> None:
    """Check the file against model.sha256, when the resource gives one."""
    expected = source.sha256
    if expected is None:
        return
    if not path.is_file():
        raise CheckpointError(f"model.sha256 needs a single-file checkpoint, but {path} is a directory.")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * 2**20):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise CheckpointError(
            f"Checksum mismatch for {path}: sha256 is {digest.hexdigest()}, the resource expects {expected}. "
            "The file is corrupt or a different revision; fix model.sha256 or the file."
        )


def _download(uri: str) -> Path:
    try:
        import fsspec
    except ImportError as exc:
        raise CheckpointError(f"Reading {uri!r} needs fsspec: pip install fsspec") from exc
    target = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = Path(uri.rstrip("/")).name
    if target.exists():  # only ever a complete download: it appears by one rename
        return target / name
    fs_uri = _hf_to_fsspec(uri) if uri.startswith("hf://") else uri
    # Private to this process: a download cut off halfway, or racing another replica's, is never used.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fs, root = fsspec.core.url_to_fs(fs_uri)
        local = partial / name
        if fs.isdir(root):
            top = root.rstrip("/")
            found = [f for f in fs.find(top, maxdepth=2) if fs.isfile(f)]
            files = checkpoint_files([f[len(top) + 1 :].lstrip("/") for f in found])
            if not files:
                raise CheckpointError(f"{uri!r} holds no .safetensors, .pt, .pth or .bin weights at its top level.")
            for file in files:
                (local / file).parent.mkdir(parents=True, exist_ok=True)
                fs.get(f"{top}/{file}", str(local / file))
        else:
            partial.mkdir(parents=True, exist_ok=True)
            fs.get(root, str(local))
        try:
            partial.rename(target)
        except OSError:
            if not target.exists():  # not another replica's finished download: a real failure
                raise
    except CheckpointError:
        raise
    except ImportError as exc:
        raise CheckpointError(
            f"Reading {uri!r} needs the filesystem package for its scheme ({exc.name}): pip install it."
        ) from exc
    except Exception as exc:  # network, credentials, missing object, a cut connection: reported the same way
        raise CheckpointError(
            f"Cannot download {uri!r}: {type(exc).__name__}: {exc}. Check network access and credentials "
            "(model.credentialsSecret / the store's environment variables)."
        ) from exc
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target / name


#: Besides weights and JSON, what text tasks read from a model folder: tokenizer vocabularies and merges,
#: sentencepiece models, chat templates.
_SIDE_FILES = (".json", ".txt", ".model", ".jinja")


def checkpoint_files(paths: list[str]) -> list[str]:
    """The files of a model folder worth downloading: one weights format, and the config, tokenizer and
    pooling files beside it (paths relative to the folder; one level of subfolders, such as 1_Pooling/).

    Hub repositories carry the same weights as ONNX, TF, Flax, TFLite and more;
    fetching all of them costs gigabytes that nothing reads. Safetensors win
    over torch pickles when both are present.
    """
    top = [p for p in paths if "/" not in p]
    safetensors = [p for p in top if p.endswith(".safetensors")]
    weights = safetensors or [p for p in top if p.endswith((".pt", ".pth", ".bin"))]
    side = [p for p in paths if p.endswith(_SIDE_FILES) and p.count("/") <= 1 and not p.startswith(".")]
    return sorted(weights + side) if weights else []


def _hf_to_fsspec(uri: str) -> str:
    """hf://org/name@revision -> hf://org/name@revision/ in huggingface_hub's fsspec syntax."""
    return uri if uri.endswith("/") else uri + "/"
