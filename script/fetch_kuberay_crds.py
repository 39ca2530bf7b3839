#!/usr/bin/env python3
"""Fetch KubeRay v1.7.0's CRDs (from its Helm chart) to where the tests look for them.

The kube tests need KubeRay's RayService CRD; it is not vendored. This pulls the chart
`kuberay-operator` 1.7.0 with helm (`python script/install_helm.py` puts one in .tools/bin) and copies its
`crds/ray.io_*.yaml` to `$ZEROCOPY_KUBERAY_CRDS`, or `../shared/kuberay-crds` beside the repository.
Needs network access to https://ray-project.github.io/kuberay-helm/.

    python script/fetch_kuberay_crds.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPO_URL = "https://ray-project.github.io/kuberay-helm/"
CHART, VERSION = "kuberay-operator", "1.7.0"


def helm() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = shutil.which("helm") or (str(local) if local.is_file() else None)
    if found is None:
        sys.exit("helm not found: run `python script/install_helm.py` first")
    return found


def main() -> None:
    default = os.environ.get("ZEROCOPY_KUBERAY_CRDS") or str(ROOT.parent / "shared" / "kuberay-crds")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(default), help=f"where to write the CRDs ({default})")
    dest: Path = parser.parse_args().dest
    with tempfile.TemporaryDirectory() as tmp:
        command = [helm(), "pull", CHART, "--repo", REPO_URL, "--version", VERSION, "--destination", tmp]
        subprocess.run(command, check=True)
        with tarfile.open(Path(tmp) / f"{CHART}-{VERSION}.tgz") as archive:
            members = [m for m in archive.getmembers() if m.isfile() and "/crds/ray.io_" in m.name]
            if not members:
                sys.exit(f"no crds/ray.io_*.yaml in {CHART} {VERSION}")
            dest.mkdir(parents=True, exist_ok=True)
            for member in members:
                extracted = archive.extractfile(member)
                assert extracted is not None  # a regular file
                (dest / Path(member.name).name).write_bytes(extracted.read())
    (dest / "SOURCE.txt").write_text(f"KubeRay Helm chart {CHART} {VERSION} from {REPO_URL}\n")
    print(f"wrote {len(members)} CRDs to {dest}")


if __name__ == "__main__":
    main()
