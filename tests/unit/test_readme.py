"""The README's commands work: CI runs its test command, and the offline ones run here as written."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.chart import helm_binary
from tests.readme import README, bash_blocks, commands, section
from zerocopy_operator.api import ZeroCopyClusterSpec, ZeroCopyModelSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
#: Commands that need no cluster, no network and no running server: run verbatim by this test.
OFFLINE = ("helm lint", "helm template", "zerocopy validate", "zerocopy render", "zerocopy crd")


def test_ci_runs_the_readme_test_command() -> None:
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith(("#", " "))]
    assert ci[-1] in commands(), "the last line of .ci/run must be README's test command, verbatim"
    assert ci[-1].endswith("python -m pytest")


@pytest.mark.parametrize("command", [c for c in commands() if c.startswith(OFFLINE)])
def test_offline_readme_command_runs(command: str) -> None:
    path = os.environ["PATH"]
    if command.startswith("helm"):
        path = f"{Path(helm_binary()).parent}{os.pathsep}{path}"  # the helm the chart tests use, or a skip
    done = subprocess.run(
        command, shell=True, cwd=ROOT, env={**os.environ, "PATH": path}, capture_output=True, text=True
    )
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), f"{command} printed nothing"


#: README commands this machine cannot run as written, and the test that runs them (or their exact effect).
ELSEWHERE = {
    "pip install torch==2.13.0": "tests/integration/test_cli_serve.py",  # first screen; CI runs the test command
    "curl -s -w '\\n' http://127.0.0.1:8000/smollm2-chat": "tests/integration/test_cli_serve.py",
    "kubectl -n argocd patch configmap argocd-cm": "tests/unit/test_gitops.py",  # kubectl patch --local, same file
    "script/e2e": "script/e2e",
    "ZEROCOPY_E2E_": "script/e2e",
}


def _section_commands(heading: str) -> list[str]:
    """The commands of the first bash block under `heading`."""
    return commands(bash_blocks(section(heading))[:1])


def test_every_readme_command_is_exercised_somewhere() -> None:
    quick_start = _section_commands("## Kubernetes quick start")  # tests/e2e/test_readme.py runs the block
    assert any(c.startswith("kubectl apply") for c in quick_start)
    unaccounted = [
        c
        for c in commands()
        if not c.startswith(OFFLINE)
        and c not in quick_start
        and not any(c.startswith(prefix) and (ROOT / where).exists() for prefix, where in ELSEWHERE.items())
    ]
    assert not unaccounted, f"README commands no test runs: {unaccounted}"


def _manifests() -> list[dict]:
    blocks = re.findall(r"```yaml\n(.*?)```", README, flags=re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if isinstance(doc, dict) and "kind" in doc]


def test_readme_manifests_are_valid() -> None:
    """Resources shown in the README: built-in kinds against Kubernetes' schema, ours against our types."""
    manifests = _manifests()
    assert {m["kind"] for m in manifests} >= {"ZeroCopyModel", "ZeroCopyCluster", "NetworkPolicy"}
    ours = {"ZeroCopyModel": ZeroCopyModelSpec, "ZeroCopyCluster": ZeroCopyClusterSpec}
    for manifest in manifests:
        if manifest["kind"] in ours:
            ours[manifest["kind"]].model_validate(manifest["spec"])
        else:
            kubernetes_validate.validate(manifest, "1.37.0", strict=True)
