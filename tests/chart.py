"""The Helm chart as tests see it: rendered with a real helm binary, and read as RBAC grants."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "zerocopy-operator"


def helm_binary() -> str:
    """$HELM, .tools/bin/helm (script/install_helm.py) or helm on PATH; skips the test when there is none."""
    candidates = [os.environ.get("HELM"), str(ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")]
    found = next((c for c in candidates if c and Path(c).is_file()), None)
    if found is None:
        pytest.skip("no helm binary: run `python script/install_helm.py` (installs it into .tools/bin)")
    return found


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)


def render(*args: str, namespace: str = "zerocopy-system") -> list[dict[str, Any]]:
    done = run_helm("template", "zc", str(CHART), "--namespace", namespace, *args)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a role's rules allow."""
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
