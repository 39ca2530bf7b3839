"""One replica's weights: find or publish this revision, attach to it, keep it intact, release what nothing uses.

The first replica of a model revision publishes it through a detached owner;
every later replica, scale-up or restart finds the owner by name and attaches
in milliseconds. Release decisions use the owners' own records of the replicas
and Serve applications that used them, and Serve's public status API: never
Serve's private controller.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch
from ray import serve
from ray.serve._private.constants import SERVE_NAMESPACE
from torch import nn

from ._errors import AlreadyPublishedError, PublishInProgressError, WeightsNotFoundError, ZeroCopyError
from ._owner import NAMESPACE, actor_name, published_names
from ._source import is_remote, local_path, model_folder, published_folder, revision, verify, write_side_files
from .config import Adapter, AppArgs
from .contract import weights_model, weights_name, weights_revision
from .tensor_codec import fingerprint
from .weights import (
    AttachReport,
    Progress,
    PublishedModel,
    attach,
    attach_report,
    attach_tensors,
    lookup,
    publish,
    release,
)

__all__ = [
    "ReplicaWeights",
    "adapter_args",
    "application_deleted",
    "attach_adapter",
    "find_or_publish",
    "live_applications",
    "model_files",
    "release_model",
    "release_orphaned",
    "release_unused_revisions",
]

#: How long a replica waits for another replica's publish of the same revision.
PUBLISH_WAIT_S = 1800.0
#: How long a replica waits for Serve's status when deciding whether an application is gone.
CONTROLLER_TIMEOUT_S = 5.0

logger = logging.getLogger("ray.serve")  # Serve's logger: lines land in the replica's log, tagged with its id


def find_or_publish(
    args: AppArgs, progress: Progress | None = None, timeout_s: float = PUBLISH_WAIT_S, verified: bool = False
) -> PublishedModel:
    """The published weights of this revision, publishing them if no replica has yet.

    Replicas that start together (a new revision, a restart after the owner
    died) race for the owner's name: one publishes, the others wait for its
    copy, so the weights are read and stored exactly once. `verified`: the caller has already
    checked the file against model.sha256 (hashing gigabytes twice helps no one).
    A remote checkpoint is downloaded only to publish it: its revision is named from the source's listing, and
    it is published with its side files (`model_files`), so a replica on another node reads nothing from the
    source, and pulls the bytes from the publishing node's store into its own.
    """
    name = weights_name(args.name, revision(args.model))  # one published copy per model and revision
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return lookup(name)
        except PublishInProgressError:
            if time.monotonic() > deadline:
                raise ZeroCopyError(
                    f"Weights {name!r} were still being published after {timeout_s:.0f} s; "
                    "check the publishing replica's log (a stuck or very slow checkpoint read)."
                ) from None
            time.sleep(0.2)
            continue
        except WeightsNotFoundError:
            pass
        path = local_path(args.model)
        if not verified:
            verify(path, args.model)
            verified = True
        files = model_folder(path) if is_remote(args.model.uri) else None
        try:
            return publish(path, name=name, progress=progress, dtype=args.model.dtype, files=files)
        except AlreadyPublishedError:
            time.sleep(0.2)  # another replica won the race: wait for its copy
            continue


def model_files(args: AppArgs, published: PublishedModel | None) -> Path:
    """The model's folder on this node (config, tokenizer, chat template): beside a local checkpoint, or, for a
    remote one, written once into the node's cache from the files published with its weights."""
    if published is None or published.files is None:
        return model_folder(local_path(args.model))
    folder = published_folder(published.name)  # written by an earlier replica on this node
    return folder if folder.exists() else write_side_files(published.name, ray.get(published.files))


def adapter_args(args: AppArgs, adapter: Adapter) -> AppArgs:
    """An adapter as a published copy of its own: named `<model>.<adapter>`, in the base model's dtype, released
    with the model (`release_model`)."""
    update = {"name": f"{args.name}.{adapter.name}", "model": adapter.source(args.model.dtype)}
    return args.model_copy(update=update)


def attach_adapter(args: AppArgs, adapter: Adapter) -> tuple[PublishedModel, Path, dict[str, torch.Tensor]]:
    """An adapter's copy on this node (published by the first replica to need it), its folder (its
    adapter_config.json) and its tensors, zero-copy; this replica registers as one of its users."""
    own = adapter_args(args, adapter)
    published = find_or_publish(own)
    _register_replica(published)
    tensors, _ = attach_tensors(published, write_guard=args.write_guard)
    return published, model_files(own, published), tensors


class ReplicaWeights:
    """The weights one Serve replica serves from: found or published, attached, checked, released.

    `factory` builds the weight-free module to attach to; without one (vLLM, whose own processes attach) the
    replica only finds or publishes the copy and registers as its user.
    """

    def __init__(
        self,
        args: AppArgs,
        factory: Callable[[], nn.Module] | None,
        device: str,
        published: PublishedModel | None = None,
    ) -> None:
        self.args, self.factory, self.device = args, factory, device
        self.reattached = 0
        self.model: nn.Module | None = None
        self.report: AttachReport | None = None
        self.fingerprint = 0
        self.attach(published)
        release_unused_revisions(args.name, keep=self.published.name)

    def attach(self, published: PublishedModel | None = None) -> None:
        """Point a fresh model at this revision's weights, finding (or publishing) them unless given."""
        published = published or find_or_publish(self.args)
        _register_replica(published)
        if self.factory is None:
            self.published = published
            return
        model = attach(published, factory=self.factory, write_guard=self.args.write_guard, device=self.device).eval()
        # Swapped at once: a request in flight finishes on the model it started with.
        self.published, self.model, self.report = published, model, attach_report(model)
        # On a GPU the weights are a private device copy: the check below is for shared host pages.
        self.fingerprint = fingerprint(model) if self.device == "cpu" else 0

    def check(self) -> bool:
        """Whether the replica was re-attached to a copy published again; raises when its weights changed.

        When the owner of the shared copy dies (killed, or its node lost), the
        pages this replica holds stay valid until it lets go of them, so it
        re-attaches instead of failing: the first replica on the node to notice
        publishes again, the others wait for that copy, and no replica stops serving.
        """
        if self.factory is None:  # vLLM holds its own copy: the engine's life is what matters
            self.tidy()
            return False
        try:
            current: PublishedModel | None = lookup(self.published.name)
        except WeightsNotFoundError:
            current = None
        # Another replica may have published again under the same name already: a new owner, a new copy.
        moved = current is None or [r.hex() for r in current.refs] != [r.hex() for r in self.published.refs]
        if moved:
            self.attach()
            self.reattached += 1
        if self.device == "cpu" and self.model is not None and fingerprint(self.model) != self.fingerprint:
            raise RuntimeError("The attached weights changed or moved since attach; restarting this replica.")
        self.tidy()
        return moved

    def tidy(self) -> None:
        """Release this model's superseded revisions, and copies of models deleted at zero replicas."""
        release_unused_revisions(self.args.name, keep=self.published.name)
        try:
            released = release_orphaned()
        except (ray.exceptions.RayError, TimeoutError):  # a busy or restarting controller: the next check tries again
            logger.warning("could not list Serve's applications; orphaned weights are released later")
            return
        if released:
            logger.info("released the weights of deleted applications: %s", released)

    def close(self) -> None:
        """On the replica's way out: the weights go with the application, not with a replica.

        The owner outlives replicas so that restarts, scale-downs and in-place
        updates re-attach instead of re-publishing; only once the application
        itself is deleted does nothing use its weights any more.
        """
        try:
            if application_deleted(serve.get_replica_context().app_name):
                logger.info("application deleted: released %s", release_model(self.args.name))
        except Exception:  # a stuck or gone controller must not fail the shutdown
            logger.exception("could not tell whether %s's application is deleted; its weights stay", self.args.name)

    def info(self, report: AttachReport) -> dict[str, Any]:
        """This replica's weights' fields of `ReplicaInfo`, with the attach report of whoever attached."""
        return {
            "name": self.args.name,
            "weights": self.published.name,
            "revision": weights_revision(self.published.name),
            "bytes_shared": report.bytes_shared,
            "tensor_count": report.tensor_count,
            "attach_seconds": report.attach_seconds,
            "shared": report.in_object_store,
            "write_guard": report.write_guard,
            "node_id": report.node_id,
            "pid": os.getpid(),
            "owner_pid": self.published.owner_pid,
            "object_ids": [ref.hex() for ref in self.published.refs],
            "reattached": self.reattached,
        }


def _register_replica(published: PublishedModel) -> None:
    context = ray.get_runtime_context()
    name = context.get_actor_name()
    if name:  # Serve replicas are named actors; their owner learns who uses each revision, and for which app
        owner = ray.get_actor(actor_name(published.name), namespace=published.namespace)
        app = serve.get_replica_context().app_name
        ray.get(owner.register.remote(name, SERVE_NAMESPACE, app))  # replicas are named there, not in the job's


def release_unused_revisions(model: str, keep: str) -> list[str]:
    """Release revisions of `model` older than `keep` once no replica attached to them is alive.

    Runs in every new replica and health check, so the old buffers go soon
    after a rolling update has stopped the last replica of the old revision.
    Newer revisions are never touched: their first replica may still be
    publishing, before any replica has registered.
    """
    released: list[str] = []
    try:
        kept_since, _, _ = _usage(keep)
    except (ValueError, ray.exceptions.RayError):
        return released
    for name in published_names():
        if name == keep or weights_model(name) != model:
            continue
        try:
            since, in_use, _ = _usage(name)
            if since < kept_since and not in_use:
                release(name)
                released.append(name)
        except (ValueError, ZeroCopyError, ray.exceptions.RayError):
            continue  # released or replaced concurrently: nothing to do
    return released


def live_applications(timeout_s: float = CONTROLLER_TIMEOUT_S) -> set[str]:
    """The Serve applications that exist and are not being deleted, from Serve's public status API.

    Bounded: `serve.status()` takes no timeout, and a busy controller must not hold a health check or a
    replica's shutdown (raises TimeoutError).
    """
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zerocopy-serve-status")
    try:
        status = pool.submit(serve.status).result(timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)
    return {name for name, app in status.applications.items() if app.status != "DELETING"}


def application_deleted(app: str, timeout_s: float = CONTROLLER_TIMEOUT_S) -> bool:
    """Whether Serve is deleting `app` (or has deleted it), as opposed to scaling or updating it in place."""
    return app not in live_applications(timeout_s)


def release_orphaned() -> list[str]:
    """Release published copies whose Serve applications are all gone and that no live replica uses.

    A model deleted while it has no replica (scaled to zero) has no replica to release its copy on the way
    out; the health checks of every other model's replicas on the cluster do it. Copies that no Serve replica
    ever used (a revision still being published, weights published from Python) are never touched.
    """
    released: list[str] = []
    live = live_applications()
    for name in published_names():
        try:
            _, in_use, apps = _usage(name)
            if apps and not in_use and not live.intersection(apps):
                release(name)
                released.append(name)
        except (ValueError, ZeroCopyError, ray.exceptions.RayError):
            continue  # released or replaced concurrently: nothing to do
    return released


def release_model(model: str) -> list[str]:
    """Release every published revision of `model` and of its adapters; another replica may have released some
    first."""
    released: list[str] = []
    for name in published_names():
        if weights_model(name) == model or weights_model(name).startswith(f"{model}."):  # its adapters too
            try:
                release(name)
                released.append(name)
            except WeightsNotFoundError:
                continue
    return released


def _usage(name: str) -> tuple[float, bool, list[str]]:
    owner = ray.get_actor(actor_name(name), namespace=NAMESPACE)
    usage: Any = ray.get(owner.usage.remote(), timeout=10)
    return float(usage[0]), bool(usage[1]), list(usage[2])
