"""The contract between a replica and the operator: what `<route>/-/info` answers, and how weights are named.

The replica answers with `ReplicaInfo` and the operator reads with it, so the two sides cannot disagree on a
field: a field renamed on one side fails validation on the other, in tests, instead of reading as missing.
A published copy's name is built and taken apart here only. Neither torch nor Ray is imported: the
operator's image has neither.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import ApiModel, Task

__all__ = [
    "ROUTER_APP",
    "ROUTER_DEPLOYMENT",
    "ROUTER_IMPORT_PATH",
    "ReplicaInfo",
    "RoutedModel",
    "RouterArgs",
    "router_route",
    "weights_model",
    "weights_name",
    "weights_revision",
]

#: The OpenAI router's Serve application (`zerocopy_runtime.router`): not a Kubernetes name, so no model's
#: application can take it. It serves at `/`, so `<endpoint>/v1` reaches every text model of the cluster.
ROUTER_APP = "_openai"
ROUTER_IMPORT_PATH = "zerocopy_runtime.router:build_router"
ROUTER_DEPLOYMENT = "OpenAIRouter"

#: Characters of the revision digest in a published name: enough to never collide within one model.
_REVISION_CHARS = 16


def weights_name(model: str, digest: str) -> str:
    """The published name of one revision of a model: `<model>-<first 16 hex digits of its digest>`."""
    return f"{model}-{digest[:_REVISION_CHARS]}"


def weights_model(name: str) -> str:
    """The model a published name belongs to (model names may hold dashes; revisions never do)."""
    return name.rpartition("-")[0]


def weights_revision(name: str) -> str:
    """The revision part of a published name."""
    return name.rpartition("-")[2]


class ReplicaInfo(BaseModel):
    """One replica's answer at `<route>/-/info`: its weights, how it attached them, and its engine."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    #: The published copy it attached to (`weights_name`), and that name's revision part.
    weights: str
    revision: str
    bytes_shared: int
    tensor_count: int
    attach_seconds: float
    #: Every weight's bytes lie in the node's object store (false: a private copy, as on a GPU).
    shared: bool
    write_guard: bool
    node_id: str
    pid: int
    owner_pid: int
    object_ids: list[str]
    max_batch_size: int
    #: The largest batch served so far (a text task's generator counts its own decoding batches).
    largest_batch: int
    #: Times its health check re-attached to a copy published again (an owner that died).
    reattached: int
    startup_seconds: float
    task: Task
    # Text tasks.
    context_length: int | None = None
    engine: Literal["transformers", "vllm"] | None = None
    #: The LoRA adapters it serves (text-generation on the transformers engine), each as `<name>:<adapter>`.
    adapters: list[str] | None = None
    #: Adapters the config names that it does not serve, with the reason (unreadable, or not fitting the model).
    adapter_errors: dict[str, str] | None = None
    # The transformers engine's batching counters.
    forward_passes: int | None = None
    joined_running_batch: int | None = None
    # The vLLM engine: its version, load format, the folder it was started on, and its load's steps (seconds).
    vllm_version: str | None = None
    load_format: str | None = None
    engine_folder: str | None = None
    engine_folder_files: list[str] | None = None
    engine_load_seconds: float | None = None
    engine_load_steps: dict[str, float] | None = None
    engine_loader_pid: int | None = None


def router_route(route: str) -> bool:
    """Whether a model's route prefix would take the router's: `/` itself, or `/v1` and below."""
    return route == "/" or route == "/v1" or route.startswith("/v1/")


class RoutedModel(ApiModel):
    """One model behind the router: its OpenAI name, its Serve application, and its task."""

    name: str = Field(min_length=1)
    application: str = Field(min_length=1)
    task: Task
    #: Its adapters, each served as the OpenAI model `<name>:<adapter>` by the same application.
    adapters: list[str] = Field(default_factory=list)


class RouterArgs(ApiModel):
    """The router application's arguments, as the operator and `zerocopy serve` write them."""

    models: list[RoutedModel] = Field(default_factory=list)
