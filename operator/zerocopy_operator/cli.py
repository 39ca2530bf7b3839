"""The `zerocopy` command line.

Commands that need Ray and torch import the runtime only when run, so the
operator image (which has neither) can ship the same entry point.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="zerocopy", description="Serve PyTorch models with weights shared per node.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a ZeroCopyModel file on a local (or given) Ray cluster")
    serve.add_argument("file", type=Path, help="ZeroCopyModel YAML, as you would kubectl apply it")
    serve.add_argument("--address", help="join this Ray cluster instead of starting one")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        if not args.file.is_file():
            parser.error(f"{args.file} is not a file")
        from zerocopy_runtime.local import serve_file

        serve_file(args.file, address=args.address, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
