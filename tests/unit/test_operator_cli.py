"""`zerocopy crd`, `zerocopy render` and `zerocopy validate`, run as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def _zerocopy(*args: str) -> subprocess.CompletedProcess[str]:
    code = "import sys; from zerocopy_operator.cli import main; main(sys.argv[1:])"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)


def test_crd_prints_the_committed_files_and_writes_them(tmp_path: Path) -> None:
    committed = sorted((ROOT / "crds").glob("*.yaml"))
    assert [p.name for p in committed] == ["zerocopyclusters.zerocopy.dev.yaml", "zerocopymodels.zerocopy.dev.yaml"]
    out = _zerocopy("crd")
    assert out.returncode == 0, out.stderr
    printed = list(yaml.safe_load_all(out.stdout))
    assert printed == [yaml.safe_load(p.read_text()) for p in reversed(committed)]  # models first
    out = _zerocopy("crd", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {p.name: p.read_text() for p in committed}


def test_render_prints_a_reviewable_rayservice() -> None:
    out = _zerocopy("render", "examples/tiny-mlp.yaml", "--image", "example/runtime:1")
    assert out.returncode == 0, out.stderr
    rayservice = yaml.safe_load(out.stdout)
    assert (rayservice["kind"], rayservice["metadata"]["namespace"]) == ("RayService", "default")
    assert "serveConfigV2: |" in out.stdout  # a literal block, not an escaped one-line string
    assert "example/runtime:1" in out.stdout


def test_validate_reports_each_problem_and_fails(tmp_path: Path) -> None:
    resource = yaml.safe_load((ROOT / "examples" / "tiny-mlp.yaml").read_text())
    resource["spec"]["serving"]["gpusPerReplica"] = 1
    resource["spec"]["model"]["size"] = "4Gi"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(resource))
    out = _zerocopy("validate", "examples/tiny-mlp.yaml", str(tmp_path / "bad.yaml"))
    assert out.returncode == 1
    assert "examples/tiny-mlp.yaml: ZeroCopyModel/tiny-mlp: valid" in out.stdout
    assert "bad.yaml: ZeroCopyModel/tiny-mlp: invalid" in out.stdout
    assert "gpusPerReplica is 1" in out.stdout
    assert "take 4Gi" in out.stdout
