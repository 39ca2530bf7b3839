"""GGUF files as model weights: dequantized once, by transformers' own GGUF support, into plain tensors.

A GGUF file (llama.cpp's format) carries everything a replica needs: the weights, mostly as quantized
blocks, the model's config and its tokenizer with the chat template, all in the file's metadata. The
runtime shares weights byte for byte and cannot serve packed blocks, so a GGUF `model.uri` is dequantized
once, when the weights are published, into the dtype the replicas serve; every replica then attaches to
that one copy as it would to a safetensors checkpoint's.

Nothing here converts GGUF itself. Config, tokenizer and tensors all come from transformers' GGUF code
(`from_pretrained(..., gguf_file=...)` and `modeling_gguf_pytorch_utils.load_gguf_checkpoint`), so the
dequantized weights are bit for bit those `AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`
loads, under the names the transformers class built from the config expects. What this module adds is
checking the file first (the magic, truncation, every tensor's quantization type) so that a bad file
fails with a `GgufError` that names the file, the problem and the fix, never with a bare traceback from
the `gguf` package's memory map.

torch and transformers are imported only where tensors or configs are made, so `is_gguf` costs nothing.
"""

from __future__ import annotations

import copy
import functools
import inspect
import mmap
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import CheckpointError, SettingError

if TYPE_CHECKING:
    import torch
    import transformers

__all__ = [
    "GgufError",
    "check_gguf",
    "dequantizable_types",
    "gguf_config",
    "gguf_folder",
    "gguf_state_dict",
    "is_gguf",
    "meant_as_gguf",
    "save_tokenizer_files",
]

MAGIC = b"GGUF"

# GGUF metadata value types (gguf.GGUFValueType): the fixed-size ones and their widths; 8 is a string
# (u64 length, then bytes) and 9 an array (u32 item type, u64 count, then the items).
_FIXED_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4  # GGML_MAX_DIMS
_DEFAULT_ALIGNMENT = 32  # llama.cpp's, when general.alignment is absent

# ggml types transformers' packed-GGUF loader (integrations/gguf) holds as plain values, not blocks.
_F32, _F16, _BF16 = 0, 1, 30

_FIX_TYPE = (
    "convert it to a type transformers can dequantize (llama.cpp's llama-quantize or convert_hf_to_gguf.py, "
    "e.g. to Q8_0 or F16), or publish the model as safetensors (save_pretrained) instead"
)
_FIX_DOWNLOAD = "download or copy the file again (compare its size and checksum with the source)"


class GgufError(CheckpointError):
    """A GGUF file that cannot be used: not GGUF, truncated, or holding what transformers cannot load."""


def is_gguf(path: Path) -> bool:
    """Whether `path` is a file that starts with the GGUF magic (the suffix is not trusted)."""
    try:
        with open(path, "rb") as file:
            return file.read(4) == MAGIC
    except OSError:  # missing, a directory, unreadable
        return False


def meant_as_gguf(path: Path) -> bool:
    """A GGUF file, or a file named `.gguf`: read as GGUF either way, so that a damaged one is called a bad GGUF
    file rather than a bad torch checkpoint."""
    path = Path(path)
    return path.suffix.lower() == ".gguf" or is_gguf(path)


def check_gguf(path: Path) -> None:
    """Refuse, before anything starts, a file that is not GGUF, is truncated, or holds a type transformers cannot
    dequantize: the header only (milliseconds), never the tensors."""
    path = Path(path)
    header = _scan(path)
    _check_types(path, header, _packed_route(header.architecture))


def gguf_folder(path: Path) -> Path:
    """The model folder of a GGUF file: its config.json, tokenizer and chat template (`save_tokenizer_files`),
    written once per file (path, size, modification time) into the node's cache, for everything that reads a
    model folder (the text routes, the architecture's config, vLLM's engine folder)."""
    import hashlib

    from ._source import cache_dir

    path = Path(path).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_dir() / "gguf" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        save_tokenizer_files(path, staging)
        staging.rename(folder)  # whole or not at all; a concurrent writer's identical folder may be first
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def gguf_config(path: Path) -> transformers.PretrainedConfig:
    """The config transformers derives from the file's metadata (`AutoConfig.from_pretrained(dir, gguf_file=)`).

    Architecture, sizes, rope, vocabulary, token ids and `tie_word_embeddings` (true when the file has no
    `output.weight`). Parsing the metadata is slow for a large vocabulary (seconds), so the result is kept
    per file (path, size and modification time) and each call returns its own copy.
    """
    path = Path(path)
    _scan(path)
    stat = path.stat()
    return copy.deepcopy(_config(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


def gguf_state_dict(
    path: Path, dtype: torch.dtype | None = None, *, model_class: Any = None
) -> dict[str, torch.Tensor]:
    """The file's tensors dequantized into `dtype` (default float32), under the transformers model's names.

    The names are exactly those of the model `model_class` (a transformers model class or Auto class, or
    its name as architecture.transformers gives it; by default the config's `architectures[0]`, else
    `AutoModelForCausalLM`, which gives e.g. LlamaForCausalLM) builds from `gguf_config`,
    in its parameter order. Weights the model ties together appear once, under the name the model ties
    to (the input embedding for a tied `lm_head`), as in a hub safetensors checkpoint: load with
    `load_state_dict(strict=False)` and `tie_weights()`, or add the tied names before `strict=True`.
    Every tensor is dequantized to float32 first and then cast, so a bfloat16 result equals the float32
    one `.to(torch.bfloat16)`.
    """
    import torch

    path = Path(path)
    dtype = torch.float32 if dtype is None else dtype
    if not dtype.is_floating_point:
        raise ValueError(f"gguf_state_dict dequantizes into a floating-point dtype, not {dtype}.")
    header = _scan(path)
    packed = _packed_route(header.architecture)
    _check_types(path, header, packed)
    config = gguf_config(path)
    model = _meta_model(path, config, model_class)
    try:
        if packed:
            tensors = _from_pretrained(path, config, type(model), dtype)
        else:
            tensors = _load_gguf_checkpoint(path, model, dtype)
    except MemoryError:
        raise
    except Exception as exc:
        raise GgufError(
            f"transformers could not dequantize the GGUF file {str(path)!r} (architecture "
            f"{header.architecture!r}): {_said(exc)}. If the file is intact, {_FIX_TYPE}."
        ) from exc
    return _named_like(path, tensors, model)


def save_tokenizer_files(path: Path, folder: Path) -> list[Path]:
    """Write the file's tokenizer (with its chat template) and config.json into `folder`; return the files.

    The tokenizer is the one `AutoTokenizer.from_pretrained(dir, gguf_file=name)` builds, saved with
    `save_pretrained` (the chat template goes to chat_template.jinja), and config.json is `gguf_config`
    saved the same way, so that `AutoTokenizer.from_pretrained(folder)` and `AutoConfig.from_pretrained(folder)`
    work without the GGUF. A GGUF states no `architectures`; config.json gets the class `gguf_state_dict`
    names the weights after (e.g. LlamaForCausalLM), which vLLM needs to pick its model.
    """
    path, folder = Path(path), Path(folder)
    header = _scan(path)
    config = gguf_config(path)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise GgufError(
            f"transformers could not build a tokenizer from the GGUF file {str(path)!r} (architecture "
            f"{header.architecture!r}, tokenizer {_tokenizer_model(path)!r}): {_said(exc)}. "
            "Publish the model as a folder with its tokenizer files (save_pretrained) instead."
        ) from exc
    folder.mkdir(parents=True, exist_ok=True)
    written = [Path(name) for name in tokenizer.save_pretrained(str(folder))]
    if not getattr(config, "architectures", None):
        config.architectures = [type(_meta_model(path, config, None)).__name__]
    config.save_pretrained(str(folder))
    written.append(folder / "config.json")
    return sorted({file for file in written if file.is_file()})


def dequantizable_types(architecture: str) -> frozenset[str]:
    """The ggml type names (F32, Q4_1, ...) transformers can dequantize for a file of this architecture.

    Most architectures load through `load_gguf_checkpoint`, which dequantizes with the `gguf` package;
    the few transformers' packed-GGUF loader handles (Qwen3.5) dequantize with transformers' own kernels,
    which know fewer types.
    """
    import gguf

    return frozenset(gguf.GGMLQuantizationType(t).name for t in _type_ids(_packed_route(architecture)))


# --- the file's header ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    ggml_type: int
    shape: tuple[int, ...]  # in ggml order, fastest-moving first
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class _Header:
    architecture: str
    tensors: tuple[_Tensor, ...]
    data_start: int
    data_end: int


class _Truncated(Exception):
    pass


def _scan(path: Path) -> _Header:
    """Check the file is whole GGUF: magic, metadata, tensor table, and every tensor's bytes present.

    Parsed here rather than with `gguf.GGUFReader`, which takes seconds on a large vocabulary and fails on
    a short file with a numpy error about the memory map, not about the file.
    """
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise GgufError(f"The GGUF file {str(path)!r} {what}; check model.uri (and that the file is on this node).")
    if not is_gguf(path):
        with open(path, "rb") as file:
            start = file.read(4)
        raise GgufError(
            f"{str(path)!r} is not a GGUF file: it starts with {start!r}, not the GGUF magic {MAGIC!r}. "
            "Point model.uri at a real .gguf file (llama.cpp's format), or at a safetensors checkpoint or "
            "folder without the .gguf suffix."
        )
    try:
        import gguf
        import transformers  # noqa: F401
    except ImportError as exc:
        raise GgufError(
            f"Loading the GGUF file {str(path)!r} needs the gguf and transformers packages in the runtime: "
            f"pip install gguf accelerate 'zerocopy-operator[hf]' ({_said(exc)})."
        ) from exc

    size = path.stat().st_size
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        try:
            architecture, alignment, tensor_count, pos = _read_metadata(path, blob)
            tensors, pos = _read_tensor_table(path, blob, tensor_count, pos)
        except (_Truncated, struct.error) as exc:
            raise GgufError(
                f"The GGUF file {str(path)!r} ends inside its header ({size} bytes): it is truncated; {_FIX_DOWNLOAD}."
            ) from exc
    data_start = (pos + alignment - 1) // alignment * alignment
    data_end = data_start
    for tensor in tensors:
        sizes = gguf.GGML_QUANT_SIZES.get(gguf.GGMLQuantizationType(tensor.ggml_type))
        assert sizes is not None  # _read_tensor_table keeps only the types the gguf package knows
        block, type_size = sizes
        elements = 1
        for dim in tensor.shape:
            elements *= dim
        data_end = max(data_end, data_start + tensor.offset + elements // block * type_size)
    if data_end > size:
        raise GgufError(
            f"The GGUF file {str(path)!r} is truncated: it is {size} bytes, and its {len(tensors)} tensors "
            f"need {data_end}; {_FIX_DOWNLOAD}."
        )
    return _Header(architecture, tuple(tensors), data_start, data_end)


def _read_metadata(path: Path, blob: mmap.mmap) -> tuple[str, int, int, int]:
    """`(general.architecture, general.alignment, tensor count, offset of the tensor table)`."""
    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in (2, 3):
        raise GgufError(
            f"The GGUF file {str(path)!r} is GGUF version {version}; transformers reads versions 2 and 3. "
            "Convert it again with a current llama.cpp."
        )
    pos = 24
    architecture, alignment = None, _DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key, pos = _read_string(blob, pos)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        pos += 4
        if key == "general.architecture" and value_type == _STRING:
            architecture, pos = _read_string(blob, pos)
        elif key == "general.alignment" and value_type == 4:
            (alignment,) = struct.unpack_from("<I", blob, pos)
            pos += 4
        else:
            pos = _skip_value(path, blob, pos, value_type)
    if architecture is None:
        raise GgufError(
            f"The GGUF file {str(path)!r} has no general.architecture in its metadata, so transformers cannot "
            "tell which model it holds. Convert it again with llama.cpp's convert_hf_to_gguf.py."
        )
    if alignment == 0 or alignment & (alignment - 1):
        raise GgufError(f"The GGUF file {str(path)!r} declares general.alignment={alignment}, not a power of two.")
    return architecture, alignment, tensor_count, pos


def _read_string(blob: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise _Truncated
    return blob[pos + 8 : end].decode("utf-8", errors="replace"), end


def _skip_value(path: Path, blob: mmap.mmap, pos: int, value_type: int) -> int:
    if value_type in _FIXED_WIDTH:
        return pos + _FIXED_WIDTH[value_type]
    if value_type == _STRING:
        (length,) = struct.unpack_from("<Q", blob, pos)
        return pos + 8 + length
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if item_type in _FIXED_WIDTH:
            return pos + count * _FIXED_WIDTH[item_type]
        for _ in range(count):
            pos = _skip_value(path, blob, pos, item_type)
            if pos > len(blob):
                raise _Truncated
        return pos
    raise GgufError(f"The GGUF file {str(path)!r} has a metadata value of unknown type {value_type}: it is corrupt.")


def _read_tensor_table(path: Path, blob: mmap.mmap, count: int, pos: int) -> tuple[list[_Tensor], int]:
    import gguf

    known = {int(t) for t in gguf.GGML_QUANT_SIZES}
    tensors = []
    for _ in range(count):
        name, pos = _read_string(blob, pos)
        (dims,) = struct.unpack_from("<I", blob, pos)
        if dims > _MAX_DIMS:
            raise GgufError(f"The GGUF file {str(path)!r} gives tensor {name!r} {dims} dimensions: it is corrupt.")
        shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
        pos += 4 + 8 * dims + 12
        if ggml_type not in known:
            raise GgufError(
                f"The GGUF file {str(path)!r} stores tensor {name!r} as ggml type {ggml_type}, which the installed "
                f"gguf package ({_version('gguf')}) does not know: upgrade gguf and transformers, or {_FIX_TYPE}."
            )
        tensors.append(_Tensor(name, ggml_type, tuple(shape), offset))
    return tensors, pos


# --- which tensors transformers can dequantize ---------------------------------------------------------


def _packed_route(architecture: str) -> bool:
    """Whether transformers loads this architecture through its packed-GGUF loader rather than the legacy one."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # a transformers from before the packed loader
        return False
    return bool(is_gguf_arch_supported(architecture))


@functools.cache
def _type_ids(packed: bool) -> frozenset[int]:
    """The ggml type ids transformers dequantizes: its own kernels (packed route) or the gguf package's."""
    if packed:
        from transformers.integrations.gguf.dequant import GGML_BLOCK

        return frozenset({_F32, _F16, _BF16, *GGML_BLOCK})
    import gguf
    import numpy as np

    supported = set()
    for ggml_type, (_, type_size) in gguf.GGML_QUANT_SIZES.items():
        try:  # one block of zeros: raises NotImplementedError for a type gguf cannot dequantize
            gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), ggml_type)
        except Exception:
            continue
        supported.add(int(ggml_type))
    return frozenset(supported)


def _check_types(path: Path, header: _Header, packed: bool) -> None:
    import gguf

    supported = _type_ids(packed)
    bad: dict[str, list[str]] = {}
    for tensor in header.tensors:
        if tensor.ggml_type not in supported:
            bad.setdefault(gguf.GGMLQuantizationType(tensor.ggml_type).name, []).append(tensor.name)
    if bad:
        found = "; ".join(f"{kind} ({len(names)} tensor(s), e.g. {names[0]!r})" for kind, names in sorted(bad.items()))
        names = ", ".join(sorted(gguf.GGMLQuantizationType(t).name for t in supported))
        raise GgufError(
            f"The GGUF file {str(path)!r} holds quantization types transformers {_version('transformers')} cannot "
            f"dequantize for architecture {header.architecture!r}: {found}. It can: {names}. Fix: {_FIX_TYPE}."
        )


# --- config and model ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _config(path: str, size: int, mtime_ns: int) -> transformers.PretrainedConfig:
    """The config of the file at `path` with this size and mtime (the cache key's other two parts)."""
    del size, mtime_ns
    file = Path(path)
    try:
        from transformers import AutoConfig

        config: transformers.PretrainedConfig = AutoConfig.from_pretrained(
            str(file.parent), gguf_file=file.name, local_files_only=True
        )
    except Exception as exc:
        architecture = _scan(file).architecture
        raise GgufError(
            f"transformers {_version('transformers')} cannot build a model config from the GGUF file {path!r} "
            f"(architecture {architecture!r}): {_said(exc)}. Its GGUF support knows the "
            f"architectures {', '.join(_known_architectures())}. Fix: upgrade transformers if a newer release "
            "supports this one, or publish the model as safetensors (save_pretrained) instead."
        ) from exc
    return config


def _known_architectures() -> list[str]:
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:
        return []
    names = {name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")}
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    except ImportError:
        pass
    return sorted(names)


def _meta_model(path: Path, config: transformers.PretrainedConfig, model_class: Any) -> torch.nn.Module:
    """The model built from `config` on the meta device: its parameter names and shapes, no memory."""
    import torch
    import transformers

    if isinstance(model_class, str):
        name, model_class = model_class, getattr(transformers, model_class, None)
        if model_class is None:
            raise SettingError(
                f"{name!r} is not a model class of transformers {transformers.__version__}; use a class such as "
                "LlamaForCausalLM or AutoModelForCausalLM."
            )
    candidates = [model_class] if model_class is not None else _default_classes(config)
    errors = []
    for cls in candidates:
        try:
            with torch.device("meta"):
                model = cls.from_config(config) if _is_auto(cls) else cls(config)
        except Exception as exc:
            errors.append(f"{getattr(cls, '__name__', cls)}: {_said(exc)}")
            continue
        if not isinstance(model, torch.nn.Module):
            errors.append(f"{getattr(cls, '__name__', cls)} built a {type(model).__name__}, not a torch module")
            continue
        return model
    raise GgufError(
        f"transformers {transformers.__version__} has no model class for the config of the GGUF file {str(path)!r} "
        f"(model_type {getattr(config, 'model_type', None)!r}): {'; '.join(errors)}. Fix: upgrade transformers, "
        "or publish the model as safetensors with its own architecture."
    )


def _default_classes(config: transformers.PretrainedConfig) -> list[Any]:
    import transformers

    classes: list[Any] = []
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            classes.append(cls)
    return [*classes, transformers.AutoModelForCausalLM, transformers.AutoModel]


def _is_auto(cls: Any) -> bool:
    return getattr(cls, "__name__", "").startswith("Auto") and hasattr(cls, "from_config")


# --- tensors ---------------------------------------------------------------------------------------------


def _load_gguf_checkpoint(path: Path, model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers' GGUF loader: every tensor dequantized (gguf package), un-permuted, renamed after `model`."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    casts = "torch_dtype" in inspect.signature(load_gguf_checkpoint).parameters
    extra = {"torch_dtype": dtype} if casts else {}
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model, **extra)
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    if not casts:
        for name, tensor in tensors.items():
            tensors[name] = tensor.to(dtype)
    return tensors


def _from_pretrained(
    path: Path, config: transformers.PretrainedConfig, cls: type, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """transformers' packed-GGUF loader, told to dequantize everything, through `from_pretrained`.

    The architectures it handles (Qwen3.5) are renamed and reshaped by weight converters that only run
    inside `from_pretrained`, so this loads the dense model in float32 and takes its state dict.
    """
    import torch
    from transformers import GgufConfig

    model = cls.from_pretrained(  # type: ignore[attr-defined]
        str(path.parent),
        gguf_file=path.name,
        config=config,
        dtype=torch.float32,
        quantization_config=GgufConfig(dequantize=True),
        local_files_only=True,
    )
    state = model.state_dict()
    del model
    return {name: tensor.detach().to(dtype) for name, tensor in state.items()}


def _named_like(path: Path, tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`tensors` in the model's order, checked against its names and shapes, with tied names kept once."""
    expected = model.state_dict(keep_vars=True)
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    cls = type(model).__name__
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise GgufError(
            f"transformers mapped tensors of the GGUF file {str(path)!r} to names {cls} does not have: "
            f"{_some(unexpected)}. Fix: upgrade transformers, or publish the model as safetensors."
        )
    wrong = [
        f"{name} {tuple(tensor.shape)} (the model's is {tuple(expected[name].shape)})"
        for name, tensor in tensors.items()
        if tuple(tensor.shape) != tuple(expected[name].shape)
    ]
    if wrong:
        raise GgufError(
            f"The GGUF file {str(path)!r} holds tensors whose shapes do not match {cls} built from its own "
            f"metadata: {_some(wrong)}. The file's metadata and tensors disagree; convert it again."
        )
    # Names bound to one tensor (tied weights) form one group; a hub checkpoint stores each group once,
    # under the name the model ties the others to.
    tied_to = set((getattr(model, "all_tied_weights_keys", None) or {}).values())
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    result: dict[str, torch.Tensor] = {}
    missing = []
    for names in groups.values():
        present = [name for name in names if name in tensors]
        if not present:
            if any(name in parameters for name in names):  # a buffer the file lacks keeps the model's value
                missing.append(names[0])
            continue
        keep = next((name for name in present if name in tied_to), present[0])
        result[keep] = tensors[keep].contiguous()
    if missing:
        raise GgufError(
            f"The GGUF file {str(path)!r} has no tensor for {len(missing)} parameters of {cls}: {_some(missing)}. "
            f"Either the file is incomplete (convert it again), or {cls} has parameters the GGUF's model does not "
            "(a task head): build the weights for the class the file was converted from, e.g. AutoModelForCausalLM."
        )
    return result


def _said(exc: BaseException) -> str:
    """An exception as one clause of a sentence: its type and message, without a closing period."""
    return f"{type(exc).__name__}: {str(exc).strip().rstrip('.')}"


def _some(items: list[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _tokenizer_model(path: Path) -> str | None:
    try:
        from transformers.integrations.gguf import read_gguf_metadata

        metadata, _ = read_gguf_metadata(str(path))
    except Exception:
        return None
    value = metadata.get("tokenizer.ggml.model")
    return value if isinstance(value, str) else None


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"
