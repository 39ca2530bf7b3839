"""The arguments of the Serve application, as typed, validated data.

These are the light config types the operator imports to render a
RayService's `serveConfigV2` args; they depend on pydantic only (no torch,
no Ray), so the operator image stays lean.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_SCHEMES = ("file://", "s3://", "gs://", "hf://", "http://", "https://")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSource(_Strict):
    """Where the weights come from."""

    uri: str = Field(
        min_length=1, description="file://, a local path, s3://, gs://, hf://org/name@revision, or http(s)://"
    )
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="verified when publishing")

    @field_validator("uri")
    @classmethod
    def _known_scheme(cls, uri: str) -> str:
        if "://" in uri and not uri.startswith(_SCHEMES):
            raise ValueError(f"unsupported URI scheme in {uri!r}; use one of {', '.join(_SCHEMES)} or a local path")
        return uri


class Architecture(_Strict):
    """How to build the model without weights: a factory, or a Hugging Face transformers class.

    A factory is an import path `package.module:function` returning an
    nn.Module; a transformers class (`GPT2LMHeadModel`, `AutoModelForCausalLM`)
    is built from the `config.json` next to the weights unless `config` says
    where it is.
    """

    factory: str | None = Field(default=None, description="import path `package.module:function`")
    kwargs: dict[str, object] = Field(default_factory=dict, description="keyword arguments for the factory")
    transformers: str | None = Field(
        default=None, pattern=r"^[A-Z]\w*$", description="a transformers model class, built from its config.json"
    )
    config: str | None = Field(default=None, description="config.json (or its folder) for `transformers`")

    @field_validator("factory")
    @classmethod
    def _import_path(cls, value: str | None) -> str | None:
        if value is not None and not _IMPORT_PATH.match(value):
            raise ValueError(f"{value!r} is not an import path of the form `package.module:function`")
        return value

    @model_validator(mode="after")
    def _one_way(self) -> Architecture:
        if (self.factory is None) == (self.transformers is None):
            raise ValueError("architecture needs exactly one of `factory` (an import path) or `transformers`")
        if self.transformers is not None and self.kwargs:
            raise ValueError("architecture.kwargs go with `factory`; a transformers model reads its config.json")
        if self.factory is not None and self.config is not None:
            raise ValueError("architecture.config goes with `transformers`; pass a factory's settings in kwargs")
        return self


class Batching(_Strict):
    """Dynamic batching through `@serve.batch`; max_batch_size 1 turns it off."""

    max_batch_size: int = Field(default=1, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=10)


class AppArgs(_Strict):
    """Everything `zerocopy_runtime.serve:build_app` needs; deployment options live in Serve's own config."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", max_length=63, description="model name")
    model: ModelSource
    architecture: Architecture
    handler: str = Field(default="tensor", description="'tensor' or `module:function` taking (model, batch)")
    batching: Batching = Field(default_factory=Batching)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    write_guard: bool = True

    @field_validator("handler")
    @classmethod
    def _handler(cls, value: str) -> str:
        if value != "tensor" and not _IMPORT_PATH.match(value):
            raise ValueError(f"handler {value!r} must be 'tensor' or an import path `package.module:function`")
        return value


class ServeSettings(_Strict):
    """What Serve's own deployment config carries (changing it is an in-place update)."""

    route_prefix: str = Field(pattern=r"^/[-a-zA-Z0-9_/]*$")
    replicas: int = Field(ge=1, le=1000)


API_VERSION = "zerocopy.dev/v1alpha1"
KIND = "ZeroCopyModel"


def from_resource(resource: dict[str, Any], base_dir: Path | None = None) -> tuple[AppArgs, ServeSettings]:
    """A ZeroCopyModel resource (as `kubectl apply` takes it) to the app args and Serve settings.

    The operator renders a RayService's serveConfigV2 with this same function.
    Relative local paths are taken from `base_dir` (the resource file's folder).
    """
    if resource.get("apiVersion") != API_VERSION or resource.get("kind") != KIND:
        raise ValueError(
            f"Expected apiVersion {API_VERSION} and kind {KIND}, got "
            f"{resource.get('apiVersion')!r} / {resource.get('kind')!r}."
        )
    name = (resource.get("metadata") or {}).get("name")
    spec = resource.get("spec") or {}
    model = dict(spec.get("model") or {})
    serving = dict(spec.get("serving") or {})
    architecture = dict(model.pop("architecture", None) or {})
    model["uri"] = _resolve(model.get("uri", ""), base_dir)
    if architecture.get("config"):
        architecture["config"] = _resolve(architecture["config"], base_dir)
    batching = serving.get("batching") or {}
    args = AppArgs.model_validate(
        {
            "name": name,
            "model": {"uri": model.get("uri"), "sha256": model.get("sha256")},
            "architecture": architecture,
            "handler": serving.get("handler", "tensor"),
            "batching": {
                "max_batch_size": batching.get("maxBatchSize", 1),
                "batch_wait_timeout_s": batching.get("batchWaitTimeoutS", 0.01),
            },
            "device": serving.get("device", "auto"),
            "write_guard": serving.get("writeGuard", True),
        }
    )
    settings = ServeSettings(route_prefix=serving.get("routePrefix", f"/{name}"), replicas=serving.get("replicas", 1))
    return args, settings


def _resolve(path: str, base_dir: Path | None) -> str:
    """A relative local path in the resource, made absolute from the resource file's folder."""
    local = path.removeprefix("file://")
    if base_dir is None or not path or "://" in local or Path(local).is_absolute():
        return path
    return str(base_dir / local)
