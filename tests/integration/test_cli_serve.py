"""`zerocopy serve FILE` end to end, in a subprocess with its own embedded Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import ROOT
from tests.models import MLP
from tests.readme import bash_blocks, first_screen

pytestmark = pytest.mark.integration


def _read_until_serving(process: subprocess.Popen[str], timeout: float = 240) -> list[str]:
    """`zerocopy serve`'s output up to its dashboard line, printed after every model's replicas serve."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not any(line.startswith("Ray dashboard at") for line in lines):
        line = process.stdout.readline()  # type: ignore[union-attr]
        assert line or process.poll() is None, "".join(lines[-40:])
        lines.append(line)
        assert time.monotonic() < deadline, "".join(lines[-40:])
    return lines


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict = json.loads(response.read())
    return answer


def test_zerocopy_serve_publishes_serves_and_shuts_down_on_ctrl_c(tmp_path: Path) -> None:
    """Two files, two models: one embedded Ray and Serve, an application and an endpoint line for each."""
    torch.manual_seed(1)
    widths = {"cli-mlp": 16, "cli-wide": 24}
    models = {name: MLP(width, 1).eval() for name, width in widths.items()}
    for name, replicas, route in (("cli-mlp", 2, "/cli"), ("cli-wide", 1, "/wide")):
        save_file(models[name].state_dict(), tmp_path / f"{name}.safetensors")
        resource = {
            "apiVersion": "zerocopy.dev/v1alpha1",
            "kind": "ZeroCopyModel",
            "metadata": {"name": name},
            "spec": {
                "model": {
                    "uri": f"file://{name}.safetensors",  # relative to the resource file
                    "architecture": {"factory": "tests.models:MLP", "kwargs": {"width": widths[name], "depth": 1}},
                },
                "serving": {"routePrefix": route, "replicas": replicas, "cpusPerReplica": 0.5},
            },
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(resource))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "zerocopy_operator.cli", "serve", str(tmp_path / "cli-mlp.yaml"),
         str(tmp_path / "cli-wide.yaml"), "--port", str(port), "--dashboard-port", str(port + 1)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    try:
        lines = _read_until_serving(process)
        serving = [line for line in lines if line.startswith("serving ")]
        assert [line.split()[1:4] for line in serving] == [
            ["cli-mlp", "at", f"http://127.0.0.1:{port}/cli"], ["cli-wide", "at", f"http://127.0.0.1:{port}/wide"],
        ], serving  # fmt: skip
        assert any(line.startswith("cli-mlp: 2 replicas share one") for line in lines), lines
        assert any(line.startswith("cli-wide: 1 replica attached to one") for line in lines), lines
        for name, route in (("cli-mlp", "/cli"), ("cli-wide", "/wide")):
            x = torch.randn(widths[name])
            outputs = torch.tensor(_post(f"http://127.0.0.1:{port}{route}", {"inputs": x.tolist()})["outputs"])
            with torch.no_grad():
                assert torch.allclose(outputs, models[name](x.unsqueeze(0))[0], atol=1e-6)
        _serve_cli_sees_the_application(port + 1)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=120)
        assert process.returncode == 0, out[-3000:]
        assert "shutting down" in out
    finally:
        if process.poll() is None:
            process.kill()


def _serve_cli_sees_the_application(dashboard_port: int) -> None:
    """Ray Serve's own CLI, against the embedded Ray's dashboard: the app and the config it was deployed from."""
    address = f"http://127.0.0.1:{dashboard_port}"
    serve_cli = str(Path(sys.executable).parent / "serve")
    status = subprocess.run([serve_cli, "status", "-a", address], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    applications = yaml.safe_load(status.stdout)["applications"]
    assert applications["cli-mlp"]["status"] == applications["cli-wide"]["status"] == "RUNNING"
    assert applications["cli-mlp"]["deployments"]["ZeroCopyDeployment"]["replica_states"] == {"RUNNING": 2}
    config = subprocess.run([serve_cli, "config", "-a", address], capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stderr
    deployed = {app["name"]: app for app in yaml.safe_load_all(config.stdout)}
    assert deployed["cli-mlp"]["import_path"] == "zerocopy_runtime.serve:build_app"
    assert deployed["cli-wide"]["args"]["model"]["uri"] == "file://cli-wide.safetensors"


def test_a_replica_that_fails_to_start_is_reported_with_its_own_error(tmp_path: Path) -> None:
    """An architecture that does not fit the checkpoint passes every check before Ray; the replicas refuse it."""
    save_file(MLP(16, 1).state_dict(), tmp_path / "mlp.safetensors")
    resource = {
        "apiVersion": "zerocopy.dev/v1alpha1",
        "kind": "ZeroCopyModel",
        "metadata": {"name": "cli-wrong"},
        "spec": {
            "model": {
                "uri": "mlp.safetensors",
                "architecture": {"factory": "tests.models:MLP", "kwargs": {"width": 8, "depth": 1}},
            },
        },
    }
    (tmp_path / "model.yaml").write_text(yaml.safe_dump(resource))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "zerocopy_operator.cli", "serve", str(tmp_path / "model.yaml"), "--port", str(port),
         "--dashboard-port", str(port + 1)],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("zerocopy serve: the replicas of cli-wrong failed to start: CheckpointError: "), message
    assert "'net.0.weight': checkpoint (16, 16) torch.float32, architecture (8, 8) torch.float32" in message


def test_readme_main_job_and_its_curl_work_as_written() -> None:
    """README's first screen: the main-job command after its installs, then the curl, both verbatim.

    A real chat model answers a real question: wrong weights, a wrong chat template or a broken
    generation loop would not say Paris.
    """
    main_job, curl = (block.strip() for block in bash_blocks(first_screen())[:2])
    command = main_job[main_job.index("python examples/smollm2.py") :]
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8000)) == 0:
            pytest.skip("port 8000, where the README serves, is in use here")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env |= {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    process = subprocess.Popen(
        ["bash", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        lines = _read_until_serving(process, timeout=600)
        assert any("http://127.0.0.1:8000/smollm2-chat" in line for line in lines), "".join(lines)  # curl's URL
        assert any("2 replicas share one" in line for line in lines), "".join(lines)
        done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        reply = json.loads(done.stdout)
        assert "Paris" in reply["choices"][0]["message"]["content"], reply
        assert reply["usage"]["completion_tokens"] > 0
        os.killpg(process.pid, signal.SIGINT)
        out, _ = process.communicate(timeout=120)
        assert "shutting down" in out, out[-3000:]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def test_share_across_actors_example_shows_one_copy_for_all_actors() -> None:
    """The README's measuring example, smaller: two actors' memory stays near one copy, torch.load's near two."""
    done = subprocess.run(
        [sys.executable, "examples/share_across_actors.py", "--mib", "64", "--actors", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    ours = re.search(r"zerocopy\s+2 actors: load\s+[\d.]+ ms, memory\s+(\d+) MiB", done.stdout)
    theirs = re.search(r"torch\.load 2 actors: load\s+[\d.]+ ms, memory\s+(\d+) MiB", done.stdout)
    assert ours, done.stdout
    assert theirs, done.stdout
    assert int(ours.group(1)) < 64 * 1.4 < int(theirs.group(1)), done.stdout
