"""Turn a model URI into local checkpoint files, and name its revision.

Remote schemes go through fsspec (s3fs, gcsfs, huggingface_hub and aiohttp
provide the filesystems), so credentials come from the usual environment
variables or files of each store, never from the resource.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ._errors import CheckpointError
from .config import ModelSource

_CACHE = Path(os.environ.get("ZEROCOPY_CACHE", Path.home() / ".cache" / "zerocopy"))


def local_path(source: ModelSource) -> Path:
    """The checkpoint on this node's disk, downloaded once into the cache for remote URIs.

    The checksum is not verified here (see `verify`): only the publisher reads
    the bytes, and hashing gigabytes in every replica would undo fast attach.
    """
    uri = source.uri
    if uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
    elif "://" not in uri:
        path = Path(uri)
    else:
        path = _download(uri)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {uri!r} does not exist on this node ({path}); check model.uri.")
    return path


def revision(source: ModelSource, path: Path) -> str:
    """A digest naming this revision: the sha256 when given, else the URI and each file's size and mtime."""
    if source.sha256:
        return source.sha256
    digest = hashlib.sha256(source.uri.encode())
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
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
    target = _CACHE / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if target.exists():
        return target / Path(uri.rstrip("/")).name
    fs_uri = _hf_to_fsspec(uri) if uri.startswith("hf://") else uri
    try:
        fs, root = fsspec.core.url_to_fs(fs_uri)
        partial = target.with_suffix(".partial")
        fs.get(root, str(partial / Path(root.rstrip("/")).name), recursive=True)
        partial.rename(target)
    except ImportError as exc:
        raise CheckpointError(
            f"Reading {uri!r} needs the filesystem package for its scheme ({exc.name}): pip install it."
        ) from exc
    except Exception as exc:  # network, credentials, missing object: all reported the same way
        raise CheckpointError(
            f"Cannot download {uri!r}: {type(exc).__name__}: {exc}. Check network access and credentials "
            "(model.credentialsSecret / the store's environment variables)."
        ) from exc
    return target / Path(root.rstrip("/")).name


def _hf_to_fsspec(uri: str) -> str:
    """hf://org/name@revision -> hf://org/name@revision/ in huggingface_hub's fsspec syntax."""
    return uri if uri.endswith("/") else uri + "/"
