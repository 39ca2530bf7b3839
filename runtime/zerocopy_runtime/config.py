"""The parts of a ZeroCopyModel that replicas act on, and the Serve application's arguments.

These classes are the single declaration of each field: the operator's
`ZeroCopyModelSpec` is composed of them (so the CRD is generated from them),
and `AppArgs`, which a replica validates its arguments with, is built from
the same classes. They depend on pydantic only (no torch, no Ray), so the
operator image stays lean.

Rules that span fields are written twice, side by side: as a pydantic
validator (offline `zerocopy validate`, the operator, the replica) and as a
CEL rule in `x-kubernetes-validations` (the API server, at `kubectl apply`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

IMPORT_PATH = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"
SCHEMES = ("file://", "s3://", "gs://", "hf://", "http://", "https://")


def api_config(**overrides: Any) -> ConfigDict:
    """Strict and camelCase like every Kubernetes API; both spellings are accepted from Python."""
    settings: dict[str, Any] = {"extra": "forbid", "alias_generator": to_camel, "populate_by_name": True}
    return ConfigDict(**(settings | overrides))  # type: ignore[typeddict-item]


def cel(*rules: tuple[str, str], **overrides: Any) -> ConfigDict:
    """`api_config` plus CEL rules the API server enforces; `rules` are (expression, message)."""
    validations = [{"rule": rule, "message": message} for rule, message in rules]
    return api_config(json_schema_extra={"x-kubernetes-validations": validations}, **overrides)


class ApiModel(BaseModel):
    model_config = api_config()


class Architecture(ApiModel):
    """How replicas build the model without weights: exactly one of factory or transformers."""

    model_config = cel(
        (
            "has(self.factory) != has(self.transformers)",
            "set exactly one of architecture.factory or architecture.transformers",
        ),
        (
            # dyn(): a free-form object has no CEL type that size() takes; its value at run time is a map.
            "!has(self.transformers) || !has(self.kwargs) || size(dyn(self.kwargs)) == 0",
            "architecture.kwargs go with factory; a transformers model reads its config.json",
        ),
        ("!has(self.factory) || !has(self.config)", "architecture.config goes with transformers, not factory"),
    )

    factory: str | None = Field(
        default=None, pattern=IMPORT_PATH, description="Import path `package.module:function` returning an nn.Module."
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the factory.")
    transformers: str | None = Field(
        default=None,
        pattern=r"^[A-Z]\w*$",
        description="A transformers model class (GPT2LMHeadModel, AutoModelForCausalLM) built from config.json.",
    )
    config: str | None = Field(
        default=None, min_length=1, description="config.json (or its folder) for `transformers`; default: beside."
    )

    @model_validator(mode="after")
    def _one_way(self) -> Architecture:
        if (self.factory is None) == (self.transformers is None):
            raise ValueError("set exactly one of architecture.factory or architecture.transformers")
        if self.transformers is not None and self.kwargs:
            raise ValueError("architecture.kwargs go with factory; a transformers model reads its config.json")
        if self.factory is not None and self.config is not None:
            raise ValueError("architecture.config goes with transformers, not factory; pass settings in kwargs")
        return self


class ModelSource(ApiModel):
    """The weights: where they are, how to check them, and the architecture they fill."""

    uri: str = Field(
        min_length=1,
        pattern=r"^(file|s3|gs|hf|https?)://.+|^[^:]+$",
        description="file://, a path (relative: to the resource file, or $ZEROCOPY_MODEL_DIR in a cluster), "
        "s3://, gs://, hf://org/name@revision, or http(s)://.",
    )
    sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="Checked when publishing; also names the revision."
    )
    architecture: Architecture | None = Field(
        default=None,
        description="How replicas build the model around the weights; required with engine transformers (engine vllm "
        "builds it from config.json's architectures).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        default=None,
        description="Serve the weights in this dtype, for every engine: floating tensors are cast once, when the "
        "node's copy is published, and every replica shares the cast copy (e.g. a bfloat16 checkpoint served in "
        "float32 on CPUs). Default: as stored.",
    )

    @field_validator("uri", mode="before")
    @classmethod
    def _known_scheme(cls, uri: Any) -> Any:
        if isinstance(uri, str) and "://" in uri and not uri.startswith(SCHEMES):
            raise ValueError(f"unsupported URI scheme in {uri!r}; use one of {', '.join(SCHEMES)} or a local path")
        return uri


class Batching(ApiModel):
    """Dynamic batching: up to maxBatchSize requests, waiting at most batchWaitTimeoutS to fill."""

    max_batch_size: int = Field(default=1, ge=1, le=4096, description="1 turns batching off.")
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=10, description="Seconds to wait for a fuller batch.")


#: Engine arguments the runtime sets itself: the weights come from the object store, never from these.
OWNED_ENGINE_ARGS = frozenset(
    {"model", "tokenizer", "load_format", "model_loader_extra_config", "served_model_name", "download_dir"}
)


class Vllm(ApiModel):
    """vLLM's engine settings, for `engine: vllm`; anything else vLLM takes goes in engineArgs."""

    max_model_len: int | None = Field(
        default=None, ge=16, le=1048576, description="Context length (prompt + answer); default: the model's."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Share of each GPU's memory vLLM may take (weights + KV cache)."
    )
    tensor_parallel_size: int = Field(
        default=1, ge=1, le=64, description="GPUs one engine spans; gpusPerReplica must equal it on GPUs."
    )
    kv_cache_gib: float | None = Field(
        default=None,
        gt=0,
        le=4096,
        description="KV cache size in GiB on CPUs (VLLM_CPU_KVCACHE_SPACE); on GPUs gpuMemoryUtilization decides.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="More vLLM engine arguments by their Python name (enforce_eager, max_num_seqs, ...). "
        f"Not {', '.join(sorted(OWNED_ENGINE_ARGS))}: zerocopy sets those.",
    )

    @field_validator("engine_args")
    @classmethod
    def _not_owned(cls, value: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(OWNED_ENGINE_ARGS & set(value))
        if owned:
            raise ValueError(
                f"vllm.engineArgs must not set {', '.join(owned)}: zerocopy loads the weights from the object store "
                "and names the model itself"
            )
        return value


#: CEL rules of ReplicaSettings, repeated by classes that extend it (a subclass's rules replace its parent's).
REPLICA_RULES = (
    (
        "!has(self.task) || self.task == 'tensor' || !has(self.handler) || self.handler == 'tensor'",
        "serving.handler goes with task tensor; the text tasks answer the OpenAI-compatible routes themselves",
    ),
    (
        "!has(self.engine) || self.engine == 'transformers' || (has(self.task) && self.task == 'text-generation')",
        "engine vllm serves task text-generation (a causal LM); use engine transformers for the other tasks",
    ),
    (
        "!has(self.vllm) || (has(self.engine) && self.engine == 'vllm')",
        "serving.vllm settings go with engine: vllm",
    ),
)


#: What a replica serves: JSON tensors, or one of the text tasks on the OpenAI-compatible routes.
Task = Literal["tensor", "text-generation", "text2text-generation", "embeddings"]


class ReplicaSettings(ApiModel):
    """What each replica does with a request: the task, handler, batching, device and write guard."""

    model_config = cel(*REPLICA_RULES)

    task: Task = Field(
        default="tensor",
        description="tensor: JSON tensors in and out; text-generation (a causal LM), text2text-generation (an "
        "encoder-decoder such as T5 or BART) and embeddings (an encoder): text through the OpenAI-compatible routes "
        "under the route prefix, with the tokenizer from the model folder.",
    )
    handler: str = Field(
        default="tensor", description="'tensor' (JSON tensors in and out) or `package.module:function`."
    )
    engine: Literal["transformers", "vllm"] = Field(
        default="transformers",
        description="transformers: the runtime's own batch generator on the attached weights; vllm: vLLM's engine "
        "(paged attention, continuous batching), loading its weights from the node's published copy.",
    )
    vllm: Vllm | None = Field(default=None, description="vLLM's settings (engine: vllm).")
    batching: Batching = Field(default_factory=Batching)
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda when a GPU is assigned.")
    write_guard: bool = Field(default=True, description="Map shared weights read-only in every replica.")

    @field_validator("handler")
    @classmethod
    def _handler(cls, value: str) -> str:
        if value != "tensor" and not re.match(IMPORT_PATH, value):
            raise ValueError(f"handler {value!r} must be 'tensor' or an import path `package.module:function`")
        return value

    @model_validator(mode="after")
    def _fits_task(self) -> ReplicaSettings:
        if self.task != "tensor" and self.handler != "tensor":
            raise ValueError(
                "serving.handler goes with task tensor; the text tasks answer the OpenAI-compatible routes themselves"
            )
        if self.engine == "vllm" and self.task != "text-generation":
            raise ValueError(
                "engine vllm serves task text-generation (a causal LM); use engine transformers for the other tasks"
            )
        if self.vllm is not None and self.engine != "vllm":
            raise ValueError("serving.vllm settings go with engine: vllm")
        return self


class Adapter(ApiModel):
    """A LoRA adapter on the model: a PEFT folder (adapter_config.json and adapter_model.safetensors)."""

    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        max_length=63,
        description="Its OpenAI model name is <model>:<name>.",
    )
    uri: str = Field(
        min_length=1,
        pattern=r"^(file|s3|gs|hf|https?)://.+|^[^:]+$",
        description="The adapter's folder, from any source the model's weights may come from.",
    )

    def source(self, dtype: str | None) -> ModelSource:
        """The adapter as a checkpoint to publish and attach, in the base model's dtype."""
        return ModelSource(uri=self.uri, dtype=dtype)  # type: ignore[arg-type]


#: The spec-wide CEL rule that `check_adapters` mirrors.
ADAPTERS_RULE = (
    "!has(self.adapters) || size(self.adapters) == 0 || (has(self.serving) && has(self.serving.task) && "
    "self.serving.task == 'text-generation' && (!has(self.serving.engine) || self.serving.engine == 'transformers'))",
    "adapters go with task text-generation on engine transformers (vLLM's LoRA support is not wired yet)",
)


def check_adapters(adapters: list[Adapter], task: str, engine: str) -> None:
    if adapters and (task != "text-generation" or engine != "transformers"):
        raise ValueError(ADAPTERS_RULE[1])
    ReplicaConfig(adapters=adapters)  # distinct names


class AppArgs(ReplicaSettings):
    """Everything `zerocopy_runtime.serve:build_app` needs; deployment options live in Serve's own config.

    Built from the typed resource by one function (the operator's
    `manifests.build_app_args`), never by reading the resource again.
    """

    model_config = api_config(frozen=True)

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63, description="model name")
    model: ModelSource

    @model_validator(mode="after")
    def _buildable(self) -> AppArgs:
        check_buildable(self.model, self.engine)
        return self


class ReplicaConfig(ApiModel):
    """What replicas take in place (the deployment's `user_config`, passed to `reconfigure`): changing it
    restarts no replica and publishes no base weights again."""

    adapters: list[Adapter] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> ReplicaConfig:
        names = [a.name for a in self.adapters]
        if len(set(names)) != len(names):
            raise ValueError(f"adapters: names must differ ({', '.join(sorted(names))})")
        return self


#: The spec-wide CEL rule that `check_buildable` mirrors.
BUILDABLE_RULE = (
    "has(self.model.architecture) || (has(self.serving) && has(self.serving.engine) && self.serving.engine == 'vllm')",
    "set model.architecture (factory or transformers class): engine transformers builds the model from it",
)


def check_buildable(model: ModelSource, engine: str) -> None:
    if model.architecture is None and engine != "vllm":
        raise ValueError(BUILDABLE_RULE[1])


def fields_of(model: type[BaseModel]) -> set[str]:
    """The field names a class declares, to copy exactly those from a larger spec."""
    return set(model.model_fields)
