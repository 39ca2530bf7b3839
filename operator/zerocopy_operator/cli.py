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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zerocopy", description="Serve PyTorch models with weights shared per node.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a ZeroCopyModel file on a local (or given) Ray cluster")
    serve.add_argument("file", type=Path, help="ZeroCopyModel YAML, as you would kubectl apply it")
    serve.add_argument("--address", help="join this Ray cluster instead of starting one")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    commands.add_parser("crd", help="print the ZeroCopyModel CRD generated from the API types")
    render = commands.add_parser("render", help="print the RayService of each ZeroCopyModel in FILE (for GitOps)")
    render.add_argument("file", type=Path)
    render.add_argument("--image", default=_env("ZEROCOPY_RUNTIME_IMAGE", DEFAULT_RUNTIME_IMAGE))
    validate = commands.add_parser("validate", help="check ZeroCopyModel files offline: schema and semantics")
    validate.add_argument("files", type=Path, nargs="+")
    add_operator_arguments(commands.add_parser("operator", help="run the Kubernetes operator"))
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not args.file.is_file():
            parser.error(f"{args.file} is not a file")
        from zerocopy_runtime.local import serve_file

        serve_file(args.file, address=args.address, host=args.host, port=args.port)
    elif args.command == "crd":
        from .crd import crd_yaml

        sys.stdout.write(crd_yaml())
    elif args.command == "render":
        sys.exit(render_files([args.file], args.image))
    elif args.command == "validate":
        sys.exit(validate_files(args.files))
    else:
        run_operator(args)


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


def run_operator(args: argparse.Namespace) -> None:
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)
    from .reconcile import Settings

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    memo = kopf.Memo(settings=Settings(default_image=args.image, info_url=args.info_url))
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=memo,
    )


def _documents(paths: list[Path]) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in paths:
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                yield path, document


def validate_files(paths: list[Path]) -> int:
    """Prints one line per resource; returns the exit status (1 if any resource is invalid)."""
    from .validation import InvalidSpec, validate

    documents = list(_documents(paths))
    models = [_namespaced(doc) for _, doc in documents if doc.get("kind") == "ZeroCopyModel"]
    failed = 0
    for path, document in documents:
        name = f"{path}: {document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        try:
            resource = _namespaced(document)
            validate(resource, [m for m in models if m["metadata"]["namespace"] == resource["metadata"]["namespace"]])
        except (InvalidSpec, KeyError, TypeError) as exc:
            failed += 1
            problems = exc.problems if isinstance(exc, InvalidSpec) else [f"malformed resource: {exc}"]
            print(f"{name}: invalid", *(f"  - {p}" for p in problems), sep="\n")
        else:
            print(f"{name}: valid")
    return 1 if failed else 0


def render_files(paths: list[Path], image: str) -> int:
    from .manifests import build_rayservice
    from .validation import InvalidSpec, validate

    rendered = []
    for path, document in _documents(paths):
        resource = _namespaced(document)
        try:
            validate(resource)
        except InvalidSpec as exc:
            print(f"{path}: {resource['metadata'].get('name')}: {exc}", file=sys.stderr)
            return 1
        rayservice = build_rayservice(resource, image)
        rayservice["metadata"]["namespace"] = resource["metadata"]["namespace"]
        rendered.append(rayservice)
    sys.stdout.write(yaml.dump_all(rendered, Dumper=_ReviewDumper, sort_keys=False, width=120))
    return 0


class _ReviewDumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as literal blocks, readable in a GitOps diff."""


_ReviewDumper.add_representer(
    str,
    lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None),
)


def _namespaced(document: dict[str, Any]) -> dict[str, Any]:
    meta = {"namespace": "default", **(document.get("metadata") or {})}
    return {**document, "metadata": meta}


if __name__ == "__main__":
    main()
