"""Turn a model URI into local checkpoint files, and name its revision.

Remote schemes go through fsspec (s3fs, gcsfs, huggingface_hub and aiohttp
provide the filesystems), so credentials come from the usual environment
variables or files of each store, never from the resource. A remote revision
is named from the source's listing (sizes and ETags), so a replica whose node
can take the weights from another node's store reads nothing from the source.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._checkpoint import weight_files
from ._errors import CheckpointError

if TYPE_CHECKING:  # the owner imports this module for `side_files`: it stays free of pydantic and GGUF code
    from .config import ModelSource


def cache_dir() -> Path:
    """Where remote checkpoints land: $ZEROCOPY_CACHE, read at each call so a process can redirect it."""
    return Path(os.environ.get("ZEROCOPY_CACHE") or Path.home() / ".cache" / "zerocopy")


def is_remote(uri: str) -> bool:
    """Whether `uri` names a store other than this node's disk (s3://, gs://, hf://, http(s)://)."""
    return "://" in uri and not uri.startswith("file://")


def is_gguf_source(source: ModelSource) -> bool:
    """Whether the model is a GGUF file: by name for a remote one (never downloaded to ask), by content here."""
    if is_remote(source.uri):
        return source.uri.lower().endswith(".gguf")
    from ._gguf import meant_as_gguf

    return meant_as_gguf(local_path(source))


def local_path(source: ModelSource) -> Path:
    """The checkpoint on this node's disk, downloaded once into the cache for remote URIs.

    The checksum is not verified here (see `verify`): only the publisher reads
    the bytes, and hashing gigabytes in every replica would undo fast attach.
    """
    uri = source.uri
    path = _download(uri) if is_remote(uri) else model_dir_path(uri)
    if not path.exists():
        raise CheckpointError(f"Checkpoint {uri!r} does not exist on this node ({path}); check model.uri.")
    return path


def model_folder(weights: Path) -> Path:
    """Where the model's config, tokenizer and chat template are: beside its weights, or, for a GGUF file
    (which carries them in its metadata), a folder written from it once into the node's cache."""
    from ._gguf import gguf_folder, meant_as_gguf

    if meant_as_gguf(weights):
        return gguf_folder(weights)
    return weights if weights.is_dir() else weights.parent


def model_dir_path(path: str) -> Path:
    """A local path from the resource; relative ones are taken against $ZEROCOPY_MODEL_DIR.

    `zerocopy serve` sets it to the resource file's folder; in a cluster an image that bakes models in
    sets it (the examples image does).
    """
    return Path(os.environ.get("ZEROCOPY_MODEL_DIR") or ".") / path.removeprefix("file://")


def revision(source: ModelSource) -> str:
    """A digest naming this revision, and the dtype it is served in (one published copy per dtype).

    The sha256 when the resource gives one; else the URI and each file's size and tag: for a local checkpoint
    its mtime, for a remote one what the store lists (an ETag, a blob id, a modification time; sizes alone for
    an HTTP server that sends none of them), read without downloading anything.
    """
    if source.sha256:
        return (
            source.sha256
            if source.dtype is None
            else hashlib.sha256(f"{source.sha256}:{source.dtype}".encode()).hexdigest()
        )
    digest = hashlib.sha256(source.uri.encode())
    if is_remote(source.uri):
        for name, info in sorted(_list_remote(source.uri).files.items()):
            digest.update(f"{name}:{info.get('size')}:{_tag(info)}".encode())
    else:
        path = local_path(source)
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                stat = file.stat()
                digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    if source.dtype is not None:
        digest.update(f"dtype:{source.dtype}".encode())
    return digest.hexdigest()


#: What stores call a file's version in fsspec's listings: s3fs and gcsfs, huggingface_hub, HTTP, local.
_TAGS = ("ETag", "etag", "blob_id", "LastModified", "last_modified", "Last-Modified", "updated", "mtime")


def _tag(info: dict[str, Any]) -> str:
    return next((str(info[key]) for key in _TAGS if info.get(key)), "")


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


@dataclass(frozen=True)
class _Listing:
    """What a remote URI holds: the files worth downloading, by path relative to it, with the store's info."""

    fs: Any
    root: str
    folder: bool
    files: dict[str, dict[str, Any]]


@contextmanager
def _reading(uri: str) -> Iterator[None]:
    """Every failure to reach a remote source reported the same way: the URI, the cause and the fix."""
    try:
        yield
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


def _list_remote(uri: str) -> _Listing:
    try:
        import fsspec
    except ImportError as exc:
        raise CheckpointError(f"Reading {uri!r} needs fsspec: pip install fsspec") from exc
    with _reading(uri):
        fs, root = fsspec.core.url_to_fs(_hf_to_fsspec(uri) if uri.startswith("hf://") else uri)
        if not fs.isdir(root):
            return _Listing(fs, root, False, {Path(root.rstrip("/")).name: fs.info(root)})
        top = root.rstrip("/")
        infos = {path[len(top) + 1 :].strip("/"): info for path, info in _two_levels(fs, top).items()}
        files = files_to_download(list(infos))
        if not files:
            raise CheckpointError(f"{uri!r} holds no .safetensors, .pt, .pth or .bin weights at its top level.")
        # An HTTP server's directory listing has no sizes: ask each file (a HEAD, no body).
        return _Listing(fs, top, True, {f: infos[f] if infos[f].get("size") else fs.info(f"{top}/{f}") for f in files})


def _two_levels(fs: Any, top: str) -> dict[str, dict[str, Any]]:
    """The files of a folder and of its subfolders, by `ls`: fsspec's `find` over HTTP asks of every file
    whether it is a folder by GETting it whole, which would read each weight file once more (and `get` does
    the same before it copies: files are fetched with `get_file`)."""
    files: dict[str, dict[str, Any]] = {}
    for entry in fs.ls(top, detail=True):
        if entry["type"] == "directory":
            files |= {e["name"]: e for e in fs.ls(entry["name"], detail=True) if e["type"] == "file"}
        else:
            files[entry["name"]] = entry
    return files


def _download(uri: str) -> Path:
    target = cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    name = Path(uri.rstrip("/")).name
    if target.exists():  # only ever a complete download: it appears by one rename
        return target / name
    listing = _list_remote(uri)
    # Private to this process: a download cut off halfway, or racing another replica's, is never used.
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with _reading(uri):
            local = partial / name
            if listing.folder:
                for file in listing.files:
                    (local / file).parent.mkdir(parents=True, exist_ok=True)
                    listing.fs.get_file(f"{listing.root}/{file}", str(local / file))
            else:
                partial.mkdir(parents=True, exist_ok=True)
                listing.fs.get_file(listing.root, str(local))
            try:
                partial.rename(target)
            except OSError:
                if not target.exists():  # not another replica's finished download: a real failure
                    raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target / name


def side_files(folder: Path) -> dict[str, bytes]:
    """A model folder's config, tokenizer, chat template and pooling files (not its weights), by relative path:
    what travels with a remote model's published weights, so replicas on other nodes need nothing else."""
    found = sorted(str(file.relative_to(folder)) for file in folder.rglob("*") if file.is_file())
    return {relative: (folder / relative).read_bytes() for relative in found if _is_side(relative)}


def published_folder(name: str) -> Path:
    """Where this node keeps the side files published with weights `name` (`write_side_files`)."""
    return cache_dir() / "published" / name


def write_side_files(name: str, files: dict[str, bytes]) -> Path:
    """Write published side files into this node's cache once, as `model_folder` would find them beside weights.

    The folder appears by one rename, so a replica never reads one half written by another.
    """
    target = published_folder(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        for relative, data in files.items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            (staging / relative).write_bytes(data)
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


#: Besides weights and JSON, what text tasks read from a model folder: tokenizer vocabularies and merges,
#: sentencepiece models, chat templates.
_SIDE_FILES = (".json", ".txt", ".model", ".jinja")


def files_to_download(paths: list[str]) -> list[str]:
    """The files of a model folder worth downloading: one weights format, and the config, tokenizer and
    pooling files beside it (paths relative to the folder; one level of subfolders, such as 1_Pooling/).

    Hub repositories carry the same weights as ONNX, TF, Flax, TFLite and more;
    fetching all of them costs gigabytes that nothing reads. Safetensors win
    over torch pickles when both are present.
    """
    weights = weight_files(p for p in paths if "/" not in p)
    side = [p for p in paths if _is_side(p)]
    return sorted(weights + side) if weights else []


def _is_side(relative: str) -> bool:
    return relative.endswith(_SIDE_FILES) and relative.count("/") <= 1 and not relative.startswith(".")


def _hf_to_fsspec(uri: str) -> str:
    """hf://org/name@revision -> hf://org/name@revision/ in huggingface_hub's fsspec syntax."""
    return uri if uri.endswith("/") else uri + "/"
