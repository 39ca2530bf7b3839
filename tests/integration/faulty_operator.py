"""The real operator process with a RayService builder that fails as a bug would.

Uses the seam `reconcile.Settings.build` (through `cli.run_operator`), so the
operator under test is the shipped one, not a patched copy.
"""

from __future__ import annotations

import argparse
from typing import Any

from zerocopy_operator.cli import add_operator_arguments, run_operator


def broken_build(resource: dict[str, Any], image: str) -> dict[str, Any]:
    raise KeyError(f"injected failure building the RayService of {resource['metadata']['name']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_operator_arguments(parser)
    run_operator(parser.parse_args(), build=broken_build)
