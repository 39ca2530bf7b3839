"""Faults under load on a ~256 MiB model: the shared copy's owner killed, a new revision on several replicas at once.

Two scenarios, each under a bounded load of C clients from a second process
(bench/fault_load.py, closed loop, same body for every request):

  owner killed   2 replicas serve; the detached owner of the shared copy is killed with
                 `ray.kill`. Replicas fail their health checks, Serve restarts them, and
                 their constructors publish the weights again (once) and attach.
  new revision   the deployment is redeployed with a new checkpoint and 3 replicas, with a
                 surge of 100% so that Serve starts the 3 together while the old replicas
                 keep serving; the new revision must be published exactly once.

For each: requests sent and lost (any status but 200, or no answer), the slowest request,
the recovery time (owner killed: until every replica serves from one new copy; new revision:
from the redeploy until Serve reports it running), and the publishes counted in Ray's actor
table, which keeps every `WeightOwner` actor ever created, dead ones included. Every HTTP 200
answer is compared with the model run in this process. Writes bench/results/faults.md and
faults.json; exits 1 (after writing them) if any check failed.

    python bench/bench_faults.py [--mib 256] [--replicas 2] [--new-replicas 3] [--clients 8] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import ray
import torch
from bench_serve import build
from ray import serve
from safetensors.torch import save_file

from zerocopy_runtime._owner import NAMESPACE, actor_name, published_names
from zerocopy_runtime.config import AppArgs
from zerocopy_runtime.serve import ZeroCopyDeployment
from zerocopy_runtime.weights import release

MiB = 2**20
HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
APP = "faults"
WIDTH = 2048  # bench_serve.build's layers
INPUT = 0.5


def app_args(path: Path, mib: int) -> dict[str, Any]:
    architecture = {"factory": "bench_serve:build", "kwargs": {"mib": mib}}
    model: dict[str, Any] = {"uri": f"file://{path}"}
    args = {"name": APP, "model": model | {"architecture": architecture}}
    return AppArgs.model_validate(args).model_dump()


def deploy(path: Path, mib: int, replicas: int, clients: int, surge: int = 0) -> None:
    options = {
        "num_replicas": replicas,
        "health_check_period_s": 1,
        "max_ongoing_requests": 2 * clients,
        "max_surge_percent": surge,
    }
    serve.run(ZeroCopyDeployment.options(**options).bind(app_args(path, mib)), name=APP, route_prefix="/" + APP)


def actors(class_name: str, name: str | None = None) -> list[dict[str, Any]]:
    """Every actor of this class ever created, dead ones included (the GCS actor table), oldest first.

    `ray.util.state.list_actors` says the same but needs the dashboard, which this Ray does not run.
    """
    from ray._private.state import actors as actor_table

    found = [a for a in actor_table().values() if a["ActorClassName"] == class_name and name in (None, a["Name"])]
    return sorted(found, key=lambda a: a["StartTime"] or float("inf"))


def owners(weights: str) -> list[dict[str, Any]]:
    return actors("WeightOwner", actor_name(weights))


def timeline(since: float, *weights: str) -> list[str]:
    """When each owner of these weights started and ended, in seconds after `since`."""
    events = []
    for name in weights:
        for o in owners(name):
            end = f"{o['EndTime'] / 1000 - since:.1f} s" if o["EndTime"] else "alive at the end"
            events.append(f"{name}: owner pid {o['Pid']} from {o['StartTime'] / 1000 - since:.1f} s to {end}")
    return events


def replicas() -> list[dict[str, Any]]:
    return actors(f"ServeReplica:{APP}:ZeroCopyDeployment")


def alive_replica_pids() -> set[int]:
    return {a["Pid"] for a in replicas() if a["State"] == "ALIVE"}


def infos(url: str, pids: set[int], timeout: float = 120) -> dict[int, dict[str, Any]]:
    """GET /-/info until each of these replicas answered once."""
    seen: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while not pids <= seen.keys() and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/-/info", timeout=60) as response:
                info = json.loads(response.read())
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
            continue
        seen[info["pid"]] = info
    return {pid: seen[pid] for pid in pids if pid in seen}


class Load:
    """bench/fault_load.py in its own process."""

    def __init__(self, url: str, clients: int, bound_s: float) -> None:
        command = [sys.executable, str(HERE / "fault_load.py"), url, "--clients", str(clients)]
        command += ["--seconds", str(bound_s), "--width", str(WIDTH), "--value", str(INPUT)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        first = self.process.stdout.readline().strip()
        if first != "ready":
            self.process.kill()
            raise RuntimeError(f"the load never got an answer from {url}: {first!r}")
        self.started = time.time()

    def stop_at(self, until: float) -> dict[str, Any]:
        """Let the load run until wall-clock `until`, then stop it and read its records."""
        time.sleep(max(0.0, until - time.time()))
        out, _ = self.process.communicate("", timeout=300)
        return json.loads(out.splitlines()[-1])


def expected_output(path: Path, mib: int) -> torch.Tensor:
    from safetensors.torch import load_file

    with torch.device("meta"):
        model = build(mib)
    model.load_state_dict(load_file(path), assign=True)
    with torch.inference_mode():
        out = model(torch.full((1, WIDTH), INPUT))[0].clone()
    del model
    return out


def wrong_answers(result: dict[str, Any], *right: torch.Tensor) -> int:
    """HTTP 200 answers (distinct bodies) equal to none of the right outputs."""
    return sum(
        not any(torch.allclose(torch.tensor(a["outputs"]), r, rtol=1e-4, atol=1e-6) for r in right)
        for a in result["answers"]
    )


def counts(result: dict[str, Any], fault: float, recovered: float | None) -> dict[str, Any]:
    requests = result["requests"]
    lost = [r for r in requests if r[2] != 200]
    until = recovered or float("inf")
    return {
        "sent": len(requests),
        "answered_during_recovery": sum(r[2] == 200 and fault <= r[0] <= until for r in requests),
        "lost": len(lost),
        "lost_pct": 100 * len(lost) / max(1, len(requests)),
        "slowest_s": max((end - start for start, end, _, _ in requests), default=0.0),
        "errors": result["errors"],
        "lost_window_s": [min(r[0] for r in lost), max(r[1] for r in lost)] if lost else None,
    }


def owner_killed(url: str, path: Path, mib: int, args: argparse.Namespace) -> dict[str, Any]:
    right = expected_output(path, mib)
    deploy(path, mib, args.replicas, args.clients)
    before_pids = alive_replica_pids()
    before = infos(url, before_pids)
    weights = next(iter(before.values()))["weights"]
    load = Load(url, args.clients, bound_s=args.seconds + 240)
    time.sleep(args.kill_after)
    killed_at = time.time()
    ray.kill(ray.get_actor(actor_name(weights), namespace=NAMESPACE))
    # Recovered: every replica (restarted by Serve, or re-attached in place) on the one living owner's new copy.
    old_copy = next(iter(before.values()))["object_ids"]
    recovered_at, after = None, {}
    deadline = time.monotonic() + 120
    while recovered_at is None and time.monotonic() < deadline:
        alive = alive_replica_pids()
        living = [o for o in owners(weights) if o["State"] == "ALIVE"]
        if len(alive) == args.replicas and len(living) == 1:
            after = infos(url, alive, timeout=30)
            if len(after) == len(alive) and all(
                i["owner_pid"] == living[0]["Pid"] and i["object_ids"] != old_copy for i in after.values()
            ):
                recovered_at = time.time()
                break
        time.sleep(0.2)
    result = load.stop_at(max(load.started + args.seconds, (recovered_at or time.time()) + 3))
    ever = owners(weights)
    after = infos(url, alive_replica_pids(), timeout=30)
    row = {
        "scenario": f"owner killed, {args.replicas} replicas",
        **counts(result, killed_at, recovered_at),
        "recovery_s": None if recovered_at is None else recovered_at - killed_at,
        "publishes": len(ever) - 1,  # owners created after the first one: republishes
        "restarted_by_serve": len(before_pids - after.keys()),
        "reattached_in_place": sum(after[p].get("reattached", 0) >= 1 for p in before_pids & after.keys()),
        "left_on_the_dead_owners_copy": sum(i["object_ids"] == old_copy for i in after.values()),
        "owners": timeline(killed_at, weights),
        "checks": {
            "replicas recovered": recovered_at is not None,
            "republished exactly once": [o["State"] for o in ever] == ["DEAD", "ALIVE"],
            "every replica attached to the one new copy": len({tuple(i["object_ids"]) for i in after.values()}) == 1
            and all(i["object_ids"] != old_copy for i in after.values()),
            "every HTTP 200 answer right": wrong_answers(result, right) == 0,
        },
    }
    if row["lost_window_s"]:
        row["lost_window_s"] = [t - killed_at for t in row["lost_window_s"]]
    serve.delete(APP)
    release_all()
    return row


def new_revision(url: str, old: Path, new: Path, mib: int, args: argparse.Namespace) -> dict[str, Any]:
    right_old, right_new = expected_output(old, mib), expected_output(new, mib)
    deploy(old, mib, args.replicas, args.clients)
    old_pids = alive_replica_pids()
    old_info = next(iter(infos(url, old_pids).values()))
    load = Load(url, args.clients, bound_s=args.seconds + 240)
    time.sleep(args.kill_after)
    started = time.time()
    deploy(new, mib, args.new_replicas, args.clients, surge=100)
    rolled_out = time.time()
    new_pids = alive_replica_pids() - old_pids
    now = infos(url, new_pids)
    result = load.stop_at(max(load.started + args.seconds, rolled_out + 3))
    weights = {i["weights"] for i in now.values()}
    ever = owners(weights.pop()) if len(weights) == 1 else []
    new_replicas = [a for a in replicas() if a["Pid"] in new_pids]
    starts = [a["StartTime"] / 1000 for a in new_replicas]

    def ended(actor: dict[str, Any]) -> float:
        return float(actor["EndTime"] or "inf") / 1000

    old_owner = next(o for o in owners(old_info["weights"]) if o["Pid"] == old_info["owner_pid"])
    last_old_replica = max(ended(a) for a in replicas() if a["Pid"] in old_pids)
    late = {a for start, _, status, a in result["requests"] if status == 200 and start > rolled_out}
    row = {
        "scenario": f"new revision on {args.new_replicas} replicas at once",
        **counts(result, started, rolled_out),
        "recovery_s": rolled_out - started,
        "publishes": len(ever),
        "replica_processes_started_within_s": max(starts) - min(starts) if starts else None,
        "owners": timeline(started, old_info["weights"], *{i["weights"] for i in now.values()}),
        "old_revision_released_before_its_last_replica_stopped_s": max(0.0, last_old_replica - ended(old_owner)),
        "checks": {
            "new revision published exactly once": len(ever) == 1 and ever[0]["State"] == "ALIVE",
            "every new replica reports the same owner pid and object ids": len(now) == args.new_replicas
            and len({(i["owner_pid"], tuple(i["object_ids"])) for i in now.values()}) == 1,
            "every HTTP 200 answer is the old or the new revision's": wrong_answers(result, right_old, right_new) == 0,
            "only the new revision answers after the rollout": bool(late)
            and all(wrong_answers({"answers": [result["answers"][i]]}, right_new) == 0 for i in late),
            "old revision kept until its last replica stopped": ended(old_owner) >= last_old_replica,
        },
    }
    if row["lost_window_s"]:
        row["lost_window_s"] = [t - started for t in row["lost_window_s"]]
    serve.delete(APP)
    release_all()
    return row


def release_all() -> None:
    for name in published_names():
        if name.startswith(APP + "-"):
            release(name)


def write_report(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "faults.json").write_text(json.dumps({"config": vars(args), "scenarios": rows}, indent=1))
    lines = [
        f"# Faults under load: a {args.mib} MiB model, {args.clients} clients in a second process",
        "",
        "Lost: requests answered with any status but 200, or not at all. Recovery: owner killed, from "
        "`ray.kill` of the owner until every replica serves from one new copy; new revision, from the "
        "redeploy until Serve reports it running. Publishes: owner actors created (Ray's actor table "
        "keeps dead ones too); for the owner kill, those created after the kill.",
        "",
        "| scenario | requests sent | lost | lost % | slowest request s | recovery s | publishes counted |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recovery = "never" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        lines.append(
            f"| {r['scenario']} | {r['sent']} | {r['lost']} | {r['lost_pct']:.2f} | {r['slowest_s']:.1f} | "
            f"{recovery} | {r['publishes']} |"
        )
    lines += ["", "## Checks", ""]
    for r in rows:
        for check, passed in r["checks"].items():
            lines.append(f"- {r['scenario']}: {check}: {'yes' if passed else '**NO**'}")
    for r in rows:
        lines.append(
            f"- {r['scenario']}: {r['answered_during_recovery']} requests answered (HTTP 200) during the recovery; "
            f"errors: {r['errors'] or 'none'}"
        )
        if r.get("replica_processes_started_within_s") is not None:
            lines.append(
                f"- {r['scenario']}: the replica processes started within "
                f"{r['replica_processes_started_within_s']:.1f} s of each other"
            )
        if r.get("left_on_the_dead_owners_copy"):
            lines.append(
                f"- {r['scenario']}: {r['left_on_the_dead_owners_copy']} replica(s) still serving from the dead "
                "owner's copy at the end"
            )
        if "restarted_by_serve" in r:
            lines.append(
                f"- {r['scenario']}: {r['restarted_by_serve']} replica(s) restarted by Serve, "
                f"{r['reattached_in_place']} re-attached in place"
            )
        lines.append(f"- {r['scenario']}: owners (seconds after the fault): " + "; ".join(r["owners"]))
        if r.get("old_revision_released_before_its_last_replica_stopped_s"):
            lines.append(
                f"- {r['scenario']}: the old revision was released "
                f"{r['old_revision_released_before_its_last_replica_stopped_s']:.1f} s before its last replica stopped"
            )
    (RESULTS / "faults.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--replicas", type=int, default=2, help="replicas serving before each fault")
    parser.add_argument("--new-replicas", type=int, default=3, help="replicas of the new revision")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20, help="the load's length (longer if recovery is slower)")
    parser.add_argument("--kill-after", type=float, default=5, help="seconds of load before each fault")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(1)  # as in the replicas: answers compare bitwise-close
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), "RAY_AUTH_MODE": "disabled"}
    ray.init(
        _temp_dir=tempfile.mkdtemp(prefix="ray-bf-"), num_cpus=8, object_store_memory=(3 * args.mib + 512) * MiB,
        include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env},
    )  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/{APP}"
    rows = []
    try:
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            paths = []
            for seed in (0, 1, 2):  # one revision for the owner kill, two for the redeploy
                torch.manual_seed(seed)
                path = Path(tmp) / f"m{seed}.safetensors"
                save_file(build(args.mib).state_dict(), path)
                paths.append(path)
            for run in (lambda: owner_killed(url, paths[0], args.mib, args),
                        lambda: new_revision(url, paths[1], paths[2], args.mib, args)):  # fmt: skip
                rows.append(run())
                print(json.dumps(rows[-1]), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    write_report(rows, args)
    print((RESULTS / "faults.md").read_text())
    if not all(all(r["checks"].values()) for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
