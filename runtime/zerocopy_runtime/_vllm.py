"""The vLLM engine behind the text routes: vLLM's async engine on the node's published weights.

The replica publishes (or finds) the weights as for any engine, then starts
vLLM on a folder of config and tokenizer files only, with the `zerocopy`
load format: vLLM's processes read the weights from the object store
(`_vllm_loader`), never from a file. Tokens go in and out as ids, so the
protocol, chat templates, stop strings and streaming stay in `GenerationEngine`,
the same for both engines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import ray
import torch
from pydantic import BaseModel, ConfigDict

from ._errors import ZeroCopyError
from .config import AppArgs, Vllm
from .generation import SamplingParams, Token
from .weights import AttachReport, PublishedModel

LOAD_FORMAT = "zerocopy"


class LoaderArgs(BaseModel):
    """What the replica tells the loader, through vLLM's `model_loader_extra_config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: str  #: the published name (model and revision)
    namespace: str  #: the Ray namespace of its owner
    address: str  #: the Ray cluster's GCS address, for processes vLLM spawned outside Ray
    write_guard: bool = True
    report: str  #: where the loader writes what it loaded (JSON), for the replica's /-/info


#: Files an engine folder never holds: weights in any format, and the indexes that point at them.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")

#: The KV cache an engine takes on CPUs unless `vllm.kvCacheGib` says otherwise (vLLM's own default
#: there is 90% of the machine's memory, which leaves no room for a second replica).
CPU_KV_CACHE_GIB = 1.0


def engine_folder(folder: Path, into: Path) -> Path:
    """`into`, holding links to the model folder's config and tokenizer files and to no weights file."""
    into.mkdir(parents=True, exist_ok=True)
    for item in folder.iterdir():
        name = item.name
        if item.is_file() and not name.endswith(WEIGHT_SUFFIXES) and not name.endswith(".index.json"):
            (into / name).symlink_to(item.resolve())
    if not (into / "config.json").is_file():
        raise ZeroCopyError(
            f"engine vllm builds the model from config.json, and {folder} has none: save the model with "
            "save_pretrained() (config.json and the tokenizer files beside the weights)."
        )
    return into


def build_engine_args(args: AppArgs, folder: Path, loader: LoaderArgs, on_gpu: bool) -> dict[str, Any]:
    """vLLM's engine arguments from the typed settings: the one place they are translated."""
    settings = args.vllm or Vllm()
    kv_cache_gib = settings.kv_cache_gib if settings.kv_cache_gib is not None or on_gpu else CPU_KV_CACHE_GIB
    engine: dict[str, Any] = {
        "model": str(folder),
        "tokenizer": str(folder),
        "served_model_name": args.name,
        "load_format": LOAD_FORMAT,
        "model_loader_extra_config": loader.model_dump(),
        "dtype": args.model.dtype or "auto",  # the published copy is already in model.dtype
        "tensor_parallel_size": settings.tensor_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "disable_log_stats": True,
    }
    if settings.max_model_len is not None:
        engine["max_model_len"] = settings.max_model_len
    if kv_cache_gib is not None:
        engine["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    return engine | settings.engine_args


def start_engine(engine_args: dict[str, Any]) -> Any:
    """vLLM's AsyncLLM from engine arguments, with a clear error for an argument vLLM does not take."""
    from vllm import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # the engine's processes talk over loopback only
    if not torch.cuda.is_available():  # replicas share the node's cores; vLLM would pin every engine to the same ones
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    try:
        parsed = AsyncEngineArgs(**engine_args)
    except TypeError as exc:
        raise ZeroCopyError(
            f"serving.vllm.engineArgs: {exc}; use the Python names of vLLM's engine arguments (enforce_eager, "
            "max_num_seqs, ...)."
        ) from None
    return AsyncLLM.from_engine_args(parsed)


class VllmGenerator:
    """A `TokenGenerator` on a running AsyncLLM: continuous batching and paged attention are vLLM's."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.context: int | None = int(engine.model_config.max_model_len)

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        sampling = VllmSampling(
            n=1,
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=list(params.stop) or None,
            output_kind=RequestOutputKind.DELTA,
        )
        request = f"zerocopy-{uuid.uuid4().hex}"
        try:
            async for output in self.engine.generate({"prompt_token_ids": prompt}, sampling, request):
                done = output.outputs[0]
                ids, reason = list(done.token_ids), done.finish_reason
                for token in ids[:-1] if reason is not None else ids:
                    yield Token(token)
                if reason is not None:
                    # An end-of-sequence or stop token ends the answer without being part of it, as in
                    # the transformers engine; a stop string's token is text (cut by the caller).
                    ended_on_token = reason == "stop" and not isinstance(done.stop_reason, str)
                    last = ids[-1] if ids and not ended_on_token else None
                    yield Token(last, reason if reason in ("stop", "length") else f"error: {reason}")
                    return
        except Exception as exc:  # a dead engine, a request vLLM refused: the caller answers 500
            yield Token(None, f"error: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        """Raise when vLLM's engine process has died, so that Serve replaces this replica."""
        if self.engine.errored:
            raise RuntimeError(f"vLLM's engine died ({self.engine.dead_error}); restarting this replica.")

    def info(self) -> dict[str, Any]:
        import vllm

        return {"engine": "vllm", "vllm_version": vllm.__version__}

    def shutdown(self) -> None:
        self.engine.shutdown()


class PublishedVllm(VllmGenerator):
    """vLLM started on this revision's published weights: its processes attach to them (`_vllm_loader`)."""

    def __init__(self, args: AppArgs, published: PublishedModel, folder: Path) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix=f"zerocopy-vllm-{args.name}-"))
        self.folder = engine_folder(folder, self._workdir / "model")
        report = self._workdir / "loaded.json"
        loader = LoaderArgs(
            weights=published.name,
            namespace=published.namespace,
            address=ray.get_runtime_context().gcs_address,
            write_guard=args.write_guard,
            report=str(report),
        )
        super().__init__(start_engine(build_engine_args(args, self.folder, loader, torch.cuda.is_available())))
        record = json.loads(report.read_text())
        fields = {f.name for f in dataclasses.fields(AttachReport)}
        self.report = AttachReport(**{k: v for k, v in record.items() if k in fields})
        self.load_seconds = float(record["load_seconds"])
        self.load_steps = {k: float(v) for k, v in record.items() if k.endswith("_seconds") and k != "load_seconds"}

    def info(self) -> dict[str, Any]:
        return super().info() | {
            "load_format": LOAD_FORMAT,
            "engine_folder": str(self.folder),
            "engine_folder_files": sorted(p.name for p in self.folder.iterdir()),
            "engine_load_seconds": self.load_seconds,
            "engine_load_steps": self.load_steps,
            "engine_loader_pid": self.report.pid,
        }

    def shutdown(self) -> None:
        super().shutdown()
        shutil.rmtree(self._workdir, ignore_errors=True)
