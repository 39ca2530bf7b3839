"""The `zerocopy` command line.

Commands that need Ray and torch import the runtime only when run, and the
operator's commands import kopf only when run, so each image ships the same
entry point with only its own dependencies.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

DEFAULT_RUNTIME_IMAGE = "ghcr.io/zerocopy-operator/zerocopy-runtime:0.1.0"


class UserError(Exception):
    """A problem in what the user gave (a file, a resource): printed as one message, never a traceback."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zerocopy", description="Serve PyTorch models with weights shared per node.")
    parser.add_argument(
        "--debug", action="store_true", default=bool(os.environ.get("ZEROCOPY_DEBUG")),
        help="show the traceback of a failure (env ZEROCOPY_DEBUG=1)",
    )  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve", help="serve the ZeroCopyModels in FILE(s) on a local (or given) Ray cluster, one application each"
    )
    serve.add_argument("files", type=Path, nargs="+", help="ZeroCopyModel YAML, as you would kubectl apply it")
    serve.add_argument("--address", help="join this Ray cluster instead of starting one")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard port (default 8265)")
    serve.add_argument(
        "--cpu", action="store_true", help="run a model written for GPU workers on this machine's CPUs (no GPUs asked)"
    )
    crd = commands.add_parser(
        "crd", help="print the CRDs (ZeroCopyModel, ZeroCopyCluster) generated from the API types"
    )
    crd.add_argument("--out", type=Path, help="write one file per CRD into this folder instead")
    render = commands.add_parser(
        "render", help="print the RayService of each ZeroCopyModel and ZeroCopyCluster in FILE (for GitOps)"
    )
    render.add_argument("file", type=Path)
    render.add_argument("--image", default=_env("ZEROCOPY_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE))
    validate = commands.add_parser(
        "validate", help="check ZeroCopyModel and ZeroCopyCluster files offline: schema and semantics"
    )
    validate.add_argument("files", type=Path, nargs="+")
    add_operator_arguments(commands.add_parser("operator", help="run the Kubernetes operator"))
    args = parser.parse_args(argv)
    try:
        sys.exit(run(args))
    except Exception as exc:
        if args.debug or isinstance(exc, SystemExit):
            raise
        print(f"zerocopy {args.command}: {describe(exc)}", file=sys.stderr)
        sys.exit(2)


def run(args: argparse.Namespace) -> int:
    """Run one command; its exit status."""
    if args.command == "serve":
        serve_files(
            args.files, address=args.address, host=args.host, port=args.port, dashboard_port=args.dashboard_port,
            cpu=args.cpu,
        )  # fmt: skip
        return 0
    if args.command == "crd":
        from .crd import RESOURCES, crd_yaml, write_crds

        if args.out is not None:
            for path in write_crds(args.out):
                print(f"wrote {path}")
        else:
            sys.stdout.write("---\n".join(crd_yaml(resource) for resource in RESOURCES))
        return 0
    if args.command == "render":
        return render_files([args.file], args.image)
    if args.command == "validate":
        return validate_files(args.files)
    try:
        import kopf  # noqa: F401
    except ImportError:
        raise UserError(
            "`zerocopy operator` needs the operator extra: pip install 'zerocopy-operator[operator]'"
        ) from None
    run_operator(args)
    return 0


def describe(exc: Exception) -> str:
    """The message for a failure: a user's mistake as it is, anything else with what to do about it."""
    if isinstance(exc, UserError):
        return str(exc)
    if type(exc).__module__.startswith("zerocopy_runtime"):  # the runtime's errors name the problem and the fix
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for the traceback, and please report it)"


def serve_files(
    paths: list[Path], *, address: str | None, host: str, port: int, dashboard_port: int, cpu: bool = False
) -> None:
    """Validate the ZeroCopyModels in `paths`, build their Serve applications as the operator would, run them.

    The models share one Ray and one Serve, as on a ZeroCopyCluster (whose documents are skipped here: the
    local machine is the cluster); routes must differ, as on a cluster.
    """
    from zerocopy_runtime.contract import router_route

    from .manifests import build_router_application, build_serve_application
    from .resources import route_prefix

    documents = [(path, _namespaced(doc)) for path, doc in read_resources(paths)]
    check_names(documents)
    models = [(p, d) for p, d in documents if d.get("kind") == "ZeroCopyModel"]
    if not models:
        raise UserError(f"{', '.join(map(str, paths))}: holds no ZeroCopyModel; give the YAML of at least one")
    folders = {p.resolve().parent for p, _ in models}
    if len(folders) > 1:
        raise UserError(
            "the ZeroCopyModel files are in different folders: put them in one (relative model URIs and "
            "architecture modules are taken against the resource's folder)"
        )
    applications = []
    for path, resource in models:
        spec = _valid(path, resource, [m for _, m in models])
        if cpu:  # the resource stays as written for its cluster; only this local run changes
            spec = spec.model_copy(
                update={"serving": spec.serving.model_copy(update={"gpus_per_replica": 0, "device": "cpu"})}
            )
        applications.append(build_serve_application(resource["metadata"]["name"], spec, route_prefix(resource, spec)))
    try:
        from zerocopy_runtime.local_serve import serve_applications
    except ImportError as exc:
        raise UserError(
            f"`zerocopy serve` needs the runtime ({exc.name} is missing): pip install 'zerocopy-operator[runtime]'"
        ) from None
    # Several models: one OpenAI endpoint in front of their text models too, as a ZeroCopyCluster has.
    router = build_router_application(applications) if len(applications) > 1 else None
    if router is not None:
        taken = [a["route_prefix"] for a in applications if router_route(a["route_prefix"])]
        if taken:
            raise UserError(
                f"route prefix {taken[0]} is the OpenAI endpoint of several models served together (/ and /v1 route "
                "by the request's model): set another serving.routePrefix"
            )
    serve_applications(
        applications,
        folders.pop(),
        address=address,
        host=host,
        port=port,
        dashboard_port=dashboard_port,
        router=router,
    )


def _valid(path: Path, resource: dict[str, Any], others: list[dict[str, Any]] | None = None) -> Any:
    from .validation import InvalidSpec, validate

    try:
        return validate(resource, others or [])
    except InvalidSpec as exc:
        raise _invalid(path, resource, exc.problems) from None


def _invalid(path: Path, resource: dict[str, Any], problems: list[str]) -> UserError:
    name = (resource.get("metadata") or {}).get("name")
    return UserError(f"{path}: {resource.get('kind')}/{name} is invalid:\n" + "\n".join(f"  - {p}" for p in problems))


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def add_operator_arguments(parser: argparse.ArgumentParser) -> None:
    """Operator settings; each also reads an environment variable, which is how the Helm chart sets them."""
    parser.add_argument(
        "--namespace",
        action="append",
        default=[n for n in _env("ZEROCOPY_NAMESPACES", "").split(",") if n],
        help="watch this namespace (repeatable; env ZEROCOPY_NAMESPACES, comma-separated); default: all",
    )
    parser.add_argument(
        "--image",
        default=_env("ZEROCOPY_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE),
        help="runtime image for models that name none (env ZEROCOPY_RUNTIME_IMAGE)",
    )
    parser.add_argument(
        "--liveness",
        default=_env("ZEROCOPY_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="kopf liveness endpoint (env ZEROCOPY_LIVENESS)",
    )
    parser.add_argument(
        "--log-format",
        choices=["plain", "full", "json"],
        default=_env("ZEROCOPY_LOG_FORMAT", "full"),
        help="env ZEROCOPY_LOG_FORMAT",
    )
    parser.add_argument(
        "--info-url",
        default=_env("ZEROCOPY_INFO_URL", "{endpoint}/-/info"),
        help="where to read a model's /-/info; placeholders {endpoint} {name} {namespace} {route}",
    )
    parser.add_argument("--verbose", action="store_true")


def run_operator(args: argparse.Namespace, **settings: Any) -> None:
    """Run kopf with our handlers; `settings` override `reconcile.Settings` fields (the tests' seam)."""
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)
    from .reconcile import Settings

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    memo = kopf.Memo(settings=Settings(default_image=args.image, info_url=args.info_url, **settings))
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=memo,
    )


def read_resources(paths: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    """Every non-empty YAML document of each file, refusing (with the file, line and fix) what is not a resource."""
    for path in paths:
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise UserError(f"{path}: no such file; check the path") from None
        except IsADirectoryError:
            raise UserError(f"{path}: is a directory; give the YAML file of a ZeroCopyModel") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"{path}: cannot be read: {exc}") from None
        try:
            documents = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise UserError(f"{path}: not valid YAML{where}: {problem}; fix the YAML syntax") from None
        for number, document in enumerate(documents, 1):
            if not isinstance(document, dict) or not isinstance(document.get("metadata", {}), dict):
                raise UserError(
                    f"{path}: document {number} is not a Kubernetes resource (a mapping with apiVersion, kind, "
                    "metadata and spec)"
                )
            yield path, document


def validate_files(paths: list[Path]) -> int:
    """Prints one line per resource; returns the exit status (1 if any resource is invalid).

    A model on a ZeroCopyCluster given in the same files is checked as the operator places it there.
    """
    from .validation import InvalidSpec, validate, validate_cluster

    documents = [(path, _namespaced(doc)) for path, doc in read_resources(paths)]
    models = [doc for _, doc in documents if doc.get("kind") == "ZeroCopyModel"]
    placed = _place(documents, models)
    failed = 0
    for path, resource in documents:
        name = f"{path}: {resource.get('kind')}/{resource['metadata'].get('name')}"
        try:
            if resource.get("kind") == "ZeroCopyCluster":
                validate_cluster(resource)
            else:
                validate(resource, _same_namespace(models, resource))
                problems = placed.get(_key(resource))
                if problems:
                    raise InvalidSpec(problems)
        except InvalidSpec as exc:
            failed += 1
            print(f"{name}: invalid", *(f"  - {p}" for p in exc.problems), sep="\n")
        else:
            print(f"{name}: valid")
    return 1 if failed else 0


def check_names(documents: list[tuple[Path, dict[str, Any]]]) -> None:
    """Refuse what the API server would merge or KubeRay could not tell apart: a kind and name twice in a
    namespace, or a ZeroCopyCluster and a model with a cluster of its own under one name (both make a
    RayService of that name)."""
    from .placement import cluster_ref

    seen: dict[tuple[str, str, str], tuple[Path, str]] = {}
    for path, resource in documents:
        kind, (namespace, name) = str(resource.get("kind")), _key(resource)
        keys = [(kind, namespace, name)]
        if kind == "ZeroCopyCluster" or (kind == "ZeroCopyModel" and cluster_ref(resource) is None):
            keys.append(("RayService", namespace, name))
        for key in keys:
            if key in seen:
                where, other = seen[key]
                what = (
                    f"appears twice ({where} has it too)"
                    if other == kind
                    else (f"and {other}/{name} ({where}) would both make RayService {name}")
                )
                raise UserError(f"{path}: {kind}/{name} in namespace {namespace} {what}: give each its own name")
            seen[key] = (path, kind)


def _key(resource: dict[str, Any]) -> tuple[str, str]:
    return resource["metadata"]["namespace"], str(resource["metadata"].get("name"))


def _place(
    documents: list[tuple[Path, dict[str, Any]]], models: list[dict[str, Any]]
) -> dict[tuple[str, str], list[str]]:
    """The problems of each model on a ZeroCopyCluster of these files, as the operator's placement finds them."""
    from .placement import plan_cluster
    from .validation import InvalidSpec, validate_cluster

    problems: dict[tuple[str, str], list[str]] = {}
    for _, cluster in documents:
        if cluster.get("kind") != "ZeroCopyCluster":
            continue
        try:
            spec = validate_cluster(cluster)
        except InvalidSpec:
            continue  # reported on the cluster's own line
        plan = plan_cluster(cluster["metadata"]["name"], spec, _same_namespace(models, cluster), {})
        for member in plan.members:
            problems[_key(member.resource)] = member.problems
    return problems


def render_files(paths: list[Path], image: str) -> int:
    """The RayServices these files make: one per model with its own cluster, one per ZeroCopyCluster."""
    from .manifests import build_cluster_rayservice, build_rayservice
    from .placement import cluster_ref, plan_cluster
    from .validation import InvalidSpec, validate_cluster

    documents = [(path, _namespaced(doc)) for path, doc in read_resources(paths)]
    check_names(documents)
    models = [doc for _, doc in documents if doc.get("kind") == "ZeroCopyModel"]
    clusters = {_key(doc) for _, doc in documents if doc.get("kind") == "ZeroCopyCluster"}
    rendered = []
    for path, resource in documents:
        namespace, name = _key(resource)
        if resource.get("kind") == "ZeroCopyCluster":
            try:
                spec = validate_cluster(resource)
            except InvalidSpec as exc:
                raise _invalid(path, resource, exc.problems) from None
            plan = plan_cluster(name, spec, _same_namespace(models, resource), {})
            for member in plan.members:
                if member.problems:
                    raise _invalid(path, member.resource, member.problems)
            rayservice = build_cluster_rayservice(resource, plan.applications, image)
        else:
            _valid(path, resource, _same_namespace(models, resource))
            ref = cluster_ref(resource)
            if ref is not None:
                if (namespace, ref) not in clusters:
                    raise UserError(
                        f"{path}: ZeroCopyModel/{name} runs on ZeroCopyCluster {ref}, which is not in the files "
                        "given: render them together (the cluster's RayService holds the model's application)"
                    )
                continue  # rendered as one application of its cluster's RayService
            rayservice = build_rayservice(resource, image)
        rayservice["metadata"]["namespace"] = namespace
        rendered.append(rayservice)
    sys.stdout.write(yaml.dump_all(rendered, Dumper=_ReviewDumper, sort_keys=False, width=120))
    return 0


class _ReviewDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable in a GitOps diff."""


_ReviewDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def _same_namespace(models: list[dict[str, Any]], resource: dict[str, Any]) -> list[dict[str, Any]]:
    """The models whose routes `resource` must not collide with."""
    return [m for m in models if m["metadata"]["namespace"] == resource["metadata"]["namespace"]]


def _namespaced(document: dict[str, Any]) -> dict[str, Any]:
    meta = {"namespace": "default", **(document.get("metadata") or {})}
    return {**document, "metadata": meta}


if __name__ == "__main__":
    main()
