"""README's Kubernetes quick start, run as written: its own kind cluster, a scratch kubeconfig and helm home."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, require_e2e, run, tool
from tests.e2e.overrides import SAMPLES
from tests.readme import bash_blocks, section

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

#: The cluster name the README uses.
CLUSTER = "zerocopy"


def test_readme_quick_start_runs_as_written(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    require_e2e(request.config)
    if tool("make") is None:
        pytest.skip("make is not installed")
    kind = tool("kind") or "kind"
    if CLUSTER in run([kind, "get", "clusters"], timeout=60).stdout.split():
        pytest.skip(f"a kind cluster named {CLUSTER!r} exists already; delete it to run the README's quick start")
    env = {
        **os.environ,
        "PATH": f"{ROOT / '.tools' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "KUBECONFIG": str(tmp_path / "kubeconfig"),
        **{f"HELM_{kind_}_HOME": str(tmp_path / f"helm-{kind_.lower()}") for kind_ in ("CACHE", "CONFIG", "DATA")},
    }
    script = (
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
        + bash_blocks(section("## Kubernetes quick start"))[0]
    )
    try:
        done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=3300)
        assert done.returncode == 0, f"the quick start failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
        (answer,) = [line for line in done.stdout.splitlines() if line.startswith('{"outputs"')]
        outputs = json.loads(answer)["outputs"]
        assert [len(outputs)] == SAMPLES["tiny-mlp"].shape, answer  # one input of 256 floats: 10 logits
        listed = [line for line in done.stdout.splitlines() if line.startswith("tiny-mlp ")]
        assert listed, "kubectl get zcm did not list tiny-mlp"
    finally:
        run([kind, "delete", "cluster", "--name", CLUSTER], timeout=600, check=False, env=env)
