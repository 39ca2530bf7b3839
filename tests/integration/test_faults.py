"""Faults under load: the owner of the shared copy killed, a new revision's replicas racing to publish.

A bounded load runs from a second process (bench/fault_load.py) and records every request's
status and answer, so that lost requests are counted and every HTTP 200 answer is checked
against the model run here. Publishes are counted in Ray's actor table (GCS), which keeps every
actor ever created, dead ones included: one `WeightOwner` actor per publish, whatever the timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
from safetensors.torch import save_file

from tests.conftest import delete_model, release_model
from tests.models import MLP
from zerocopy_runtime import ZeroCopyError
from zerocopy_runtime._owner import NAMESPACE, actor_name, published_names
from zerocopy_runtime.config import AppArgs

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
LOAD = ROOT / "bench" / "fault_load.py"
APP = "faults"
WIDTH = 16
#: Every feature of every request of the load; answers are checked against the model's output for it.
INPUT = 0.5
#: Name and namespace of the start gate (see `Gate`).
GATE = ("faults-gate", "zerocopy-faults")


@ray.remote(num_cpus=0)
class Gate:
    """Holds the replicas that pass it until `parties` of them arrived, then lets all through at once."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.opened = asyncio.Event()

    async def enter(self) -> int:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.opened.set()
        await asyncio.wait_for(self.opened.wait(), timeout=60)
        return self.arrived

    def count(self) -> tuple[int, bool]:
        return self.arrived, self.opened.is_set()


def __getattr__(name: str) -> Any:
    """The handler `tests.integration.test_faults:gated_tensor_handler`.

    A replica resolves its handler first thing in its constructor, before `find_or_publish`;
    resolving this one waits at the start gate, so that the replicas Serve starts together all
    race for the revision's owner at the same moment instead of by luck of process start-up.
    """
    if name != "gated_tensor_handler":
        raise AttributeError(name)
    from zerocopy_runtime.tensor_codec import tensor_handler

    try:
        gate = ray.get_actor(GATE[0], namespace=GATE[1])
    except ValueError:
        return tensor_handler
    ray.get(gate.enter.remote(), timeout=90)
    return tensor_handler


# --- fixtures ------------------------------------------------------------------------------------


def app_args(checkpoint: Path, **overrides: Any) -> dict[str, Any]:
    """The Serve application's arguments for an MLP checkpoint."""
    architecture = {"factory": "tests.models:MLP", "kwargs": {"width": WIDTH, "depth": 2}}
    model: dict[str, Any] = {"uri": f"file://{checkpoint}"}
    args = {"name": APP, "model": model | {"architecture": architecture}}
    return AppArgs.model_validate(args | overrides).model_dump()


def checkpoint(directory: Path, seed: int) -> tuple[MLP, Path]:
    torch.manual_seed(seed)
    model = MLP(WIDTH, 2).eval()
    path = directory / f"mlp-{seed}.safetensors"
    save_file(model.state_dict(), path)
    return model, path


@pytest.fixture
def app(serve_port: int) -> Iterator[Callable[..., str]]:
    """Deploys checkpoints under /faults; deletes the app and releases every revision afterwards."""
    from ray import serve

    from zerocopy_runtime.serve import ZeroCopyDeployment

    def deploy(path: Path, replicas: int, surge: int = 0, **overrides: Any) -> str:
        options = {"num_replicas": replicas, "health_check_period_s": 1, "max_surge_percent": surge}
        bound = ZeroCopyDeployment.options(**options).bind(app_args(path, **overrides))
        serve.run(bound, name=APP, route_prefix="/" + APP)
        return f"http://127.0.0.1:{serve_port}/{APP}"

    yield deploy
    delete_model(APP)


# --- the load, Ray's actor table and the replicas' /-/info --------------------------------------


class Load:
    """bench/fault_load.py in its own process: started, then stopped and read back."""

    def __init__(self, url: str, clients: int, seconds: float) -> None:
        command = [sys.executable, str(LOAD), url, "--clients", str(clients), "--seconds", str(seconds)]
        command += ["--width", str(WIDTH), "--value", str(INPUT)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline().strip()
        assert first == "ready", f"the load never got an answer from {url}: {first!r}"

    def stop(self) -> dict[str, Any]:
        out, _ = self.process.communicate("", timeout=120)
        return json.loads(out.splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@contextmanager
def load(url: str, clients: int = 4, seconds: float = 90) -> Iterator[Load]:
    running = Load(url, clients, seconds)
    try:
        yield running
    finally:
        running.kill()


def actors(class_name: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every actor of this class Ray ever created (alive or dead), oldest first, from the GCS actor table.

    `ray.util.state.list_actors` would say the same but needs the dashboard, which the test
    session's Ray does not run; `ray.util.list_named_actors` lists living actors only.
    """
    from ray._private.state import actors as actor_table

    found = [
        a for a in actor_table().values() if a["ActorClassName"] == class_name and (name is None or a["Name"] == name)
    ]
    return sorted(found, key=lambda a: a["StartTime"] or float("inf"))


def owners(weights: str) -> list[dict[str, Any]]:
    """Every owner actor ever created for these weights: one per publish."""
    return actors("WeightOwner", actor_name(weights))


def replicas() -> list[dict[str, Any]]:
    return actors(f"ServeReplica:{APP}:ZeroCopyDeployment")


def alive_replica_pids() -> set[int]:
    return {a["Pid"] for a in replicas() if a["State"] == "ALIVE"}


def marked_unhealthy(replica_ids: set[str], timeout: float = 30) -> set[str]:
    """Those of these replicas that Serve's controller marked unhealthy after failed health checks (its log)."""
    from ray._private.worker import _global_node

    logs = Path(_global_node.get_session_dir_path()) / "logs" / "serve"
    found: set[str] = set()
    deadline = time.monotonic() + timeout
    while found != replica_ids and time.monotonic() < deadline:
        for log in logs.glob("controller_*.log"):
            for line in log.read_text(errors="replace").splitlines():
                if "failed the health check" in line:
                    found |= {r for r in replica_ids if f"id='{r}'" in line}
        time.sleep(0.2)
    return found


def timeline(since: float, *weights: str) -> list[str]:
    """When each owner of these weights started and ended, in seconds after `since`: for failure messages."""
    events = []
    for name in weights:
        for o in owners(name):
            end = f"{o['EndTime'] / 1000 - since:.1f} s" if o["EndTime"] else "alive"
            events.append(f"{name} owner pid {o['Pid']}: {o['StartTime'] / 1000 - since:.1f} s .. {end}")
    return events


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def infos(url: str, pids: set[int], timeout: float = 60) -> dict[int, dict[str, Any]]:
    """GET /-/info until each of these replicas answered once (the router picks replicas at random)."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not pids <= seen.keys() and time.monotonic() < deadline:
        try:
            info = get(url + "/-/info")
        except (urllib.error.URLError, OSError):  # a replica being replaced answers 5xx for a moment
            time.sleep(0.1)
            continue
        seen[info["pid"]] = info
    assert pids <= seen.keys(), f"replicas {sorted(pids - seen.keys())} never answered /-/info"
    return {pid: seen[pid] for pid in pids}


def expected(model: MLP) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.full((1, WIDTH), INPUT))[0]


def matches(answer: dict[str, Any], model: MLP) -> bool:
    return torch.allclose(torch.tensor(answer["outputs"]), expected(model), atol=1e-5)


def summary(result: dict[str, Any]) -> tuple[int, int]:
    """Requests sent and requests lost (any status but 200, or no answer at all)."""
    statuses = [r[2] for r in result["requests"]]
    return len(statuses), sum(s != 200 for s in statuses)


# --- the scenarios -------------------------------------------------------------------------------


def test_killed_owner_is_republished_once_and_replicas_recover_under_load(
    app: Callable[..., str], tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    """Each replica's health check notices; it is restarted by Serve or re-attaches in place (either is fine)."""
    model, path = checkpoint(tmp_path, seed=0)
    url = app(path, replicas=2)
    before_pids = alive_replica_pids()
    assert len(before_pids) == 2
    replica_ids = {a["Pid"]: a["Name"].rpartition("#")[2] for a in replicas() if a["Pid"] in before_pids}
    before = infos(url, before_pids)
    weights = next(iter(before.values()))["weights"]
    old_copy = next(iter(before.values()))["object_ids"]
    assert len(owners(weights)) == 1
    with load(url) as running:
        killed_at = time.time()
        ray.kill(ray.get_actor(actor_name(weights), namespace=NAMESPACE))
        # Recovered: two replicas, each attached to the one living owner's new copy.
        deadline = time.monotonic() + 90
        recovered_at, now = None, {}
        while recovered_at is None and time.monotonic() < deadline:
            alive = alive_replica_pids()
            living = [o for o in owners(weights) if o["State"] == "ALIVE"]
            if len(alive) == 2 and len(living) == 1:
                now = infos(url, alive)
                if all(i["owner_pid"] == living[0]["Pid"] and i["object_ids"] != old_copy for i in now.values()):
                    recovered_at = time.time()
                    break
            time.sleep(0.2)
        assert recovered_at is not None, (
            "replicas did not all attach to one new copy within 90 s: "
            f"{ {pid: (i['owner_pid'], i['object_ids'] == old_copy) for pid, i in now.items()} } "
            "(replica pid: (owner pid, still on the dead owner's copy)); "
            f"owners of {weights}: {[(o['State'], o['Pid']) for o in owners(weights)]}"
        )
        time.sleep(1)  # a moment of load on the recovered replicas, so their answers are checked too
        result = running.stop()
    after = infos(url, alive_replica_pids())
    restarted = {replica_ids[pid] for pid in before_pids - after.keys()}
    assert marked_unhealthy(restarted) == restarted, "replicas were replaced, but not after failed health checks"
    assert all(after[pid]["reattached"] >= 1 for pid in before_pids & after.keys()), "kept a replica, not re-attached"
    ever = owners(weights)
    assert [o["State"] for o in ever] == ["DEAD", "ALIVE"], f"published more than once again: {ever}"
    assert {i["owner_pid"] for i in after.values()} == {ever[1]["Pid"]}
    assert len({tuple(i["object_ids"]) for i in after.values()}) == 1
    assert all(i["shared"] for i in after.values())
    wrong = [a for a in result["answers"] if not matches(a, model)]
    assert not wrong, f"HTTP 200 with a wrong answer: {wrong[:2]}"
    assert any(start > recovered_at and status == 200 for start, _, status, _ in result["requests"])
    sent, lost = summary(result)
    failed = [end for _, end, status, _ in result["requests"] if status != 200]
    figures = {
        "sent": sent,
        "lost": lost,
        "recovery_s": round(recovered_at - killed_at, 2),
        "errors_until_s": round(max(failed) - killed_at, 2) if failed else None,
        "publishes_after_kill": len(ever) - 1,
        "restarted_by_serve": len(restarted),
        "reattached_in_place": len(before_pids & after.keys()),
        "errors": result["errors"],
    }
    record_property("owner_kill", figures)
    print(f"\nowner killed under load: {figures}")


def test_new_revision_started_on_several_replicas_at_once_is_published_once(
    app: Callable[..., str], tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    old_model, old_path = checkpoint(tmp_path, seed=1)
    new_model, new_path = checkpoint(tmp_path, seed=2)
    url = app(old_path, replicas=1)
    old_pids = alive_replica_pids()
    old_info = infos(url, old_pids)[next(iter(old_pids))]
    old_weights = old_info["weights"]
    # With a surge of 100%, Serve starts all 3 replicas of the new revision at once while the old
    # one keeps serving (without it, a rolling update starts them one or two at a time); the gate
    # then makes those 3 reach find_or_publish together.
    gate = Gate.options(name=GATE[0], namespace=GATE[1]).remote(3)  # type: ignore[attr-defined]
    try:
        with load(url) as running:
            started = time.time()
            app(new_path, replicas=3, surge=100, handler="tests.integration.test_faults:gated_tensor_handler")
            rolled_out = time.time()
            new_pids = alive_replica_pids() - old_pids
            now = infos(url, new_pids)
            time.sleep(1)
            result = running.stop()
        arrived, opened = ray.get(gate.count.remote())
    finally:
        ray.kill(gate)
    assert opened, f"only {arrived} replicas reached the gate: the race did not happen"
    assert len(now) == 3
    new_weights = {i["weights"] for i in now.values()}
    assert len(new_weights) == 1
    weights = new_weights.pop()
    assert weights != old_weights
    assert len({i["owner_pid"] for i in now.values()}) == 1, f"replicas attached to different owners: {now}"
    assert len({tuple(i["object_ids"]) for i in now.values()}) == 1, "replicas attached to different copies"
    ever = owners(weights)
    assert len(ever) == 1, (
        f"the new revision was published {len(ever)} times: {timeline(started, old_weights, weights)}"
    )
    assert ever[0]["State"] == "ALIVE"
    assert ever[0]["Pid"] == next(iter(now.values()))["owner_pid"]
    named = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == actor_name(weights)]
    assert len(named) == 1
    wrong = [a for a in result["answers"] if not (matches(a, old_model) or matches(a, new_model))]
    assert not wrong, f"HTTP 200 with an answer of neither revision: {wrong[:2]}"
    late = {answer for start, _, status, answer in result["requests"] if status == 200 and start > rolled_out}
    assert late, "no request was answered after the rollout"
    assert all(matches(result["answers"][i], new_model) for i in late), "old revision answered after the rollout"
    sent, lost = summary(result)
    figures = {
        "sent": sent,
        "lost": lost,
        "rollout_s": round(rolled_out - started, 2),
        "racing_replicas": arrived if opened else 0,
        "publishes": len(ever),
        "errors": result["errors"],
    }
    record_property("new_revision", figures)
    print(f"\nnew revision on 3 replicas at once under load: {figures}")

    # The old revision's buffers must outlive every replica still serving from them.
    def ended(actor: dict[str, Any]) -> float:  # milliseconds; still alive: never
        return float(actor["EndTime"] or "inf")

    old_owner = next(o for o in owners(old_weights) if o["Pid"] == old_info["owner_pid"])
    last_old_replica = max(ended(a) for a in replicas() if a["Pid"] in old_pids)
    assert ended(old_owner) >= last_old_replica, (
        f"the old revision was released {(last_old_replica - ended(old_owner)) / 1000:.1f} s before its last "
        "replica stopped: its owner saw no registered replica alive (WeightOwner.usage() said not in use)"
    )
    deadline = time.monotonic() + 30
    while [n for n in published_names() if n.startswith(APP + "-")] != [weights] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [n for n in published_names() if n.startswith(APP + "-")] == [weights]


# --- the same faults, made deterministic outside Serve -------------------------------------------


def test_health_check_leaves_no_replica_on_a_replaced_owners_copy(ray_session: None, tmp_path: Path) -> None:
    """Once another replica republished a dead owner's weights, a health check must fail or re-attach.

    Under Serve this is a race: the first replica to notice the owner is gone publishes again under
    the same name; a replica whose next health check finds that new owner must not pass while still
    serving from the dead owner's copy (two copies in the store for good, /-/info naming a dead owner).
    """
    from zerocopy_runtime import ReplicaWeights, find_or_publish
    from zerocopy_runtime._architecture import architecture_factory

    _, path = checkpoint(tmp_path, seed=3)
    args = AppArgs.model_validate(app_args(path, write_guard=False))
    assert args.model.architecture is not None
    factory = architecture_factory(args.model.architecture, path.parent, args.model.dtype)
    replica = ReplicaWeights(args, factory, "cpu")  # a replica's weights, in this process
    try:
        replica.check()
        dead = [ref.hex() for ref in replica.published.refs]
        ray.kill(ray.get_actor(actor_name(replica.published.name), namespace=NAMESPACE))
        republished = find_or_publish(replica.args)  # what the first replica to notice does
        assert [ref.hex() for ref in republished.refs] != dead
        try:
            replica.check()
        except (ZeroCopyError, RuntimeError):
            return  # failed: Serve restarts it, and the new replica attaches to the new copy
        assert [ref.hex() for ref in replica.published.refs] == [ref.hex() for ref in republished.refs], (
            "the health check passed, but the replica still serves from the dead owner's copy"
        )
    finally:
        del replica
        release_model(APP)


def test_replica_waiting_for_a_stalled_publish_gives_up_at_its_deadline(ray_session: None, tmp_path: Path) -> None:
    """find_or_publish(timeout_s=...) must bound the wait for another replica's publish.

    The winner's checkpoint read hangs (a FIFO stands for a stuck network filesystem); a replica
    that lost the race must give up with the error that names the problem, not wait for ever.
    """
    from zerocopy_runtime import find_or_publish
    from zerocopy_runtime._owner import start_owner
    from zerocopy_runtime._source import revision
    from zerocopy_runtime.contract import weights_name

    shards = tmp_path / "shards"
    shards.mkdir()
    fifo = shards / "model.safetensors"
    os.mkfifo(fifo)
    args = AppArgs.model_validate(app_args(shards))
    name = weights_name(args.name, revision(args.model))
    owner = start_owner(name, NAMESPACE)  # the winner: its owner hangs opening the checkpoint
    owner.publish_checkpoint.remote(str(shards), 2**20)
    outcome: list[BaseException | object] = []

    def lose() -> None:
        try:
            outcome.append(find_or_publish(args, timeout_s=1.0))
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    loser = threading.Thread(target=lose, daemon=True)
    loser.start()
    loser.join(10)
    try:
        assert not loser.is_alive(), (
            "find_or_publish(timeout_s=1) still waits after 10 s: lookup() blocks in the owner's describe(), "
            "queued behind the stalled publish_checkpoint(), so the deadline is never checked"
        )
        assert isinstance(outcome[0], ZeroCopyError)
        assert "still being published" in str(outcome[0])
    finally:
        fifo.unlink()  # the loser, if still waiting, then fails to publish an empty directory
        ray.kill(owner)
        loser.join(30)
