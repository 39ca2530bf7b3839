"""Two Ray nodes on one machine: one copy of the weights per node, and what happens when the owner's node goes.

Run as a script: `tests/integration/test_per_node.py` starts it in a subprocess, because a
`ray.cluster_utils.Cluster` cannot live in a process that already called `ray.init`. It measures
and prints one line, `TWO_NODES {json}`; the test asserts on it. Nothing here asserts: a step
that does not happen within its deadline is reported as such, and the run goes on.

The head node is node "b": it runs the driver, the Serve controller and the only HTTP proxy, and
survives. The worker node "a" publishes first, so it holds the owner of the shared copy; node "b"
pulls one copy into its own store. A remote model (http:// on loopback, served by the driver) is
read from the source once, by node "a"; node "b" takes the weights from node a's store and the
config and tokenizer from the files published with them, and reads nothing from the source. Then
node "a" is removed while requests keep coming to the replicas on "b".
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import ray
import torch

ROOT = Path(__file__).resolve().parents[2]
MARKER = "TWO_NODES "
MiB = 2**20
STORE_BYTES = 160 * MiB
WIDTH, DEPTH = 1024, 2  # tests.models.MLP(1024, 2): 8 MiB of float32 in 6 tensors
ACTOR_WEIGHTS = "two-nodes-actors"
APP_MODEL = "mlp-2n"
NODES = ("a", "b")


@ray.remote(num_cpus=0.25)
class Probe:
    """A plain Ray actor that attaches to published weights and says where its bytes are."""

    def __init__(self) -> None:
        from tests.models import MLP

        torch.set_num_threads(1)
        with torch.no_grad():  # warm torch up on a private model, freed again: later PSS changes are the weights
            MLP(WIDTH, DEPTH)(torch.randn(1, WIDTH))

    def pid(self) -> int:
        return os.getpid()

    def publish(self, path: str, name: str) -> int:
        import zerocopy_runtime as zc

        return zc.publish(path, name=name).owner_pid

    def from_remote(self, args: dict[str, Any], x: torch.Tensor) -> dict[str, Any]:
        """What a replica of a remote model does: find (or publish) the weights, get the model folder, attach."""
        import zerocopy_runtime as zc
        from tests.models import MLP
        from zerocopy_runtime import find_or_publish, model_files
        from zerocopy_runtime.config import AppArgs

        parsed = AppArgs.model_validate(args)
        published = find_or_publish(parsed)
        folder = model_files(parsed, published)
        model = zc.attach(published, factory=lambda: MLP(WIDTH, DEPTH)).eval()
        with torch.no_grad():
            output = model(x.unsqueeze(0))[0]
        cache = Path(os.environ["ZEROCOPY_CACHE"])
        return {
            "node_id": zc.attach_report(model).node_id,
            "weights": published.name,
            "object_ids": [ref.hex() for ref in published.refs],
            "folder_in_cache": folder.is_relative_to(cache),
            "files": {str(f.relative_to(folder)): f.read_text() for f in sorted(folder.rglob("*")) if f.is_file()},
            "cached": sorted(str(f.relative_to(cache)) for f in cache.rglob("*") if f.is_file()),
            "output": output,
        }

    def copy_privately(self) -> None:
        """What sharing avoids: a private copy of every weight, for the memory measure to tell apart."""
        self.private = [t.detach().clone() for t in self.model.state_dict().values()]

    def attach(self, name: str, x: torch.Tensor) -> dict[str, Any]:
        import zerocopy_runtime as zc
        from tests.models import MLP

        published = zc.lookup(name)
        self.model = zc.attach(published, factory=lambda: MLP(WIDTH, DEPTH)).eval()
        with torch.no_grad():
            output = self.model(x.unsqueeze(0))[0]
        report = zc.attach_report(self.model)
        pointers = [t.untyped_storage().data_ptr() for t in self.model.state_dict().values()]
        return {
            "pid": os.getpid(),
            "node_id": report.node_id,
            "owner_pid": published.owner_pid,
            "object_ids": [ref.hex() for ref in published.refs],
            "shared": report.in_object_store,
            "inodes": sorted(_inodes_at(pointers)),
            "output": output,
        }


def _inodes_at(addresses: list[int]) -> set[int]:
    """The inodes of the files mapped at these addresses in this process (0 for anonymous memory)."""
    spans = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(v, 16) for v in fields[0].split("-"))
            spans.append((start, end, int(fields[4])))
    return {next((inode for start, end, inode in spans if start <= a < end), -1) for a in addresses}


def store_maps(pid: int) -> dict[str, Any]:
    """How process `pid` maps an object store: file inodes, resident and proportional bytes (from smaps)."""
    inodes: set[int] = set()
    rss = pss = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header: range perms offset dev inode [path]
                inside = len(fields) >= 6 and "/plasma" in fields[5] and "s" in fields[1]
                if inside:
                    inodes.add(int(fields[4]))
            elif inside and fields[0] == "Rss:":
                rss += int(fields[1]) * 1024
            elif inside and fields[0] == "Pss:":
                pss += int(fields[1]) * 1024
    return {"inodes": sorted(inodes), "rss": rss, "pss": pss}


def store_used(node_id: str) -> int:
    """Bytes in use in one node's object store, from its raylet."""
    from ray._private.internal_api import node_stats

    node = next(n for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"])
    stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
    return int(stats.store_stats.object_store_bytes_used)


def owner_of(weights: str) -> dict[str, Any] | None:
    """Node and pid of the live owner actor of `weights`, from the GCS actor table."""
    from zerocopy_runtime._owner import actor_name

    for info in ray._private.state.actors().values():
        if info["Name"] == actor_name(weights) and info["State"] == "ALIVE":
            return {"node_id": info["Address"]["NodeID"], "pid": info["Pid"]}
    return None


def until(condition: Callable[[], Any], timeout_s: float, every_s: float = 0.1) -> Any:
    """Poll `condition` until it returns something true, or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except (OSError, ValueError, ray.exceptions.RayError):  # a replica or node coming and going
            value = None
        if value:
            return value
        time.sleep(every_s)
    return None


def post(url: str, x: torch.Tensor, timeout_s: float = 10) -> tuple[int | str, Any]:
    data = json.dumps({"inputs": x.tolist()}).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")[:300]
    except (OSError, ValueError) as exc:  # refused, reset, timed out
        return f"{type(exc).__name__}: {exc}"[:300], None


def get_info(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/-/info", timeout=10) as response:
        return json.loads(response.read())


def answers(status: int | str, body: Any, expected: torch.Tensor) -> dict[str, bool]:
    wrong = {"ok": False, "bitwise": False}
    if status != 200 or not isinstance(body, dict) or "outputs" not in body:
        return wrong
    try:
        got = torch.tensor(body["outputs"], dtype=expected.dtype)
    except (TypeError, ValueError, RuntimeError):  # not a tensor of numbers
        return wrong
    if got.shape != expected.shape:
        return wrong
    return {"ok": bool(torch.allclose(got, expected, atol=1e-6)), "bitwise": bool(torch.equal(got, expected))}


def raylet_pid(node: Any) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid


def actors_phase(path: Path, x: torch.Tensor, expected: torch.Tensor, node_ids: dict[str, str]) -> dict[str, Any]:
    """Two plain actors per node attach to weights published from node a."""
    import zerocopy_runtime as zc
    from zerocopy_runtime.memory import total_pss

    probes = {n: [Probe.options(resources={f"node_{n}": 0.01}).remote() for _ in range(2)] for n in NODES}
    pids = {n: ray.get([p.pid.remote() for p in probes[n]]) for n in NODES}  # constructed and warm
    before = {n: total_pss(pids[n]) for n in NODES}
    ray.get(probes["a"][0].publish.remote(str(path), ACTOR_WEIGHTS))
    pending = {n: [p.attach.remote(ACTOR_WEIGHTS, x) for p in probes[n]] for n in NODES}  # all four at once
    facts = {n: ray.get(pending[n]) for n in NODES}
    out: dict[str, Any] = {"nbytes": zc.lookup(ACTOR_WEIGHTS).nbytes, "owner": owner_of(ACTOR_WEIGHTS)}
    for n in NODES:
        out[n] = {
            "actors": [
                {k: v for k, v in f.items() if k != "output"} | {"bitwise": bool(torch.equal(f["output"], expected))}
                for f in facts[n]
            ],
            "pss_before": before[n],
            "pss_after": total_pss(pids[n]),
            "store_maps": [store_maps(pid) for pid in pids[n]],
            "store_used": store_used(node_ids[n]),
        }
    ray.get([p.copy_privately.remote() for p in probes["a"] + probes["b"]])
    for n in NODES:
        out[n]["pss_private"] = total_pss(pids[n])
    for actor in probes["a"] + probes["b"]:
        ray.kill(actor)
    zc.release(ACTOR_WEIGHTS)
    return out


#: Beside the weights of the remote model: what a replica reads besides them (a config, a tokenizer).
SIDE_FILES = {"config.json": '{"width": 1024}', "tokenizer.json": '{"model": {"vocab": {"a": 0}}}'}


class _Counting(SimpleHTTPRequestHandler):
    """Serves a folder and counts the body bytes it sends, per file (directory listings apart); with a `rate`
    (bytes/s), through one token bucket shared by every connection, as a link to a remote store would be."""

    sent: dict[str, int]
    rate: float | None
    lock: threading.Lock
    free_at: list[float]  # when the shared link is next free (one cell, shared by the handler's instances)

    def copyfile(self, source: Any, outputfile: Any) -> None:
        path = urllib.parse.unquote(self.path)
        while block := source.read(2**20):
            if self.rate is not None:
                with self.lock:  # each block waits its turn at the cap
                    now = time.monotonic()
                    start = max(now, self.free_at[0])
                    self.free_at[0] = start + len(block) / self.rate
                time.sleep(max(0.0, start - now))
            outputfile.write(block)
            if not path.endswith("/"):
                self.sent[path] = self.sent.get(path, 0) + len(block)

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def http_source(root: Path, rate: float | None = None) -> Iterator[tuple[str, dict[str, int]]]:
    """`root` served over http:// on loopback (at `rate` bytes/s when given), and the body bytes sent per file."""
    sent: dict[str, int] = {}
    fields = {"sent": sent, "rate": rate, "lock": threading.Lock(), "free_at": [0.0]}
    handler = type("Handler", (_Counting,), fields)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", sent
    finally:
        httpd.shutdown()


def remote_phase(checkpoint: Path, work: Path, x: torch.Tensor, expected: torch.Tensor) -> dict[str, Any]:
    """Node a's replica publishes an http:// model; then node b's, with an empty cache of its own, finds it."""
    site = work / "site" / "mlp"
    site.mkdir(parents=True)
    shutil.copy(checkpoint, site / "model.safetensors")
    for name, text in SIDE_FILES.items():
        (site / name).write_text(text)
    out: dict[str, Any] = {"sizes": {f"/mlp/{f.name}": f.stat().st_size for f in site.iterdir()}}
    with http_source(work / "site") as (url, sent):
        arch = {"factory": "tests.models:MLP", "kwargs": {"width": WIDTH, "depth": DEPTH}}
        args = {"name": "remote-mlp", "model": {"uri": f"{url}/mlp/", "architecture": arch}}
        for n in NODES:
            env = {"ZEROCOPY_CACHE": str(work / f"cache-{n}")}  # each node's own disk
            probe = Probe.options(resources={f"node_{n}": 0.01}, runtime_env={"env_vars": env}).remote()
            ray.get(probe.pid.remote())
            before = dict(sent)
            facts = ray.get(probe.from_remote.remote(args, x))
            out[n] = {k: v for k, v in facts.items() if k != "output"} | {
                "bitwise": bool(torch.equal(facts["output"], expected)),
                "read": {path: sent[path] - before.get(path, 0) for path in sent if sent[path] != before.get(path, 0)},
            }
            ray.kill(probe)
    from zerocopy_runtime import release_model

    release_model("remote-mlp")
    return out


def deploy(app: str, checkpoint: Path) -> None:
    from ray import serve

    from zerocopy_runtime.config import AppArgs
    from zerocopy_runtime.serve import ZeroCopyDeployment

    args = {
        "name": APP_MODEL,
        "model": {
            "uri": f"file://{checkpoint}",
            "architecture": {"factory": "tests.models:MLP", "kwargs": {"width": WIDTH, "depth": DEPTH}},
        },
    }
    options = {
        "num_replicas": 2,
        "health_check_period_s": 1,
        "health_check_timeout_s": 5,
        "graceful_shutdown_timeout_s": 1,
        "graceful_shutdown_wait_loop_s": 0.2,
        "ray_actor_options": {"num_cpus": 0.25, "resources": {f"node_{app}": 0.01}},
    }
    bound = ZeroCopyDeployment.options(**options).bind(AppArgs.model_validate(args).model_dump())
    serve.run(bound, name=app, route_prefix=f"/{app}")


def replica_infos(url: str, timeout_s: float, where: Callable[[dict], bool] = lambda info: True) -> list[dict] | None:
    """The /-/info of two distinct replicas behind `url` that satisfy `where`, or None at the deadline."""
    seen: dict[int, dict] = {}

    def two() -> list[dict] | None:
        info = get_info(url)
        if where(info):
            seen[info["pid"]] = info
        return list(seen.values()) if len(seen) >= 2 else None

    return until(two, timeout_s, every_s=0.02)


def serve_phase(
    base: str, checkpoint: Path, x: torch.Tensor, expected: torch.Tensor, nbytes: int
) -> tuple[dict[str, Any], dict[str, list[dict]]]:
    """Two replicas per node; node a deploys (and publishes) first."""
    from zerocopy_runtime.memory import total_pss

    out: dict[str, Any] = {}
    infos: dict[str, list[dict]] = {}
    for n in NODES:
        started = time.monotonic()
        deploy(n, checkpoint)
        out[f"deploy_{n}_s"] = time.monotonic() - started
    for n in NODES:
        url = f"{base}/{n}"
        infos[n] = replica_infos(url, 30) or []
        pids = [info["pid"] for info in infos[n]]
        pss_attached = total_pss(pids)
        # Requests until every replica has read every weight page through its store mapping.
        touched = until(
            lambda url=url, pids=pids: post(url, x) and all(store_maps(p)["rss"] >= nbytes for p in pids), 30
        )
        status, body = post(url, x)
        out[n] = {
            "infos": infos[n],
            "touched": bool(touched),
            "answer": answers(status, body, expected),
            "store_maps": [store_maps(pid) for pid in pids],
            "pss_attached": pss_attached,
            "pss_served": total_pss(pids),
        }
    out["owner"] = owner_of(infos["a"][0]["weights"]) if infos["a"] else None
    return out, infos


class Load(threading.Thread):
    """Sequential requests, each logged as (start, end, status, correct), until stopped."""

    def __init__(self, url: str, x: torch.Tensor, expected: torch.Tensor) -> None:
        super().__init__(daemon=True)
        self.url, self.x, self.expected = url, x, expected
        self.log: list[tuple[float, float, int | str, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            status, body = post(self.url, self.x, timeout_s=30)
            self.log.append((started, time.monotonic(), status, answers(status, body, self.expected)["ok"]))
            self.stop.wait(0.05)  # about 20 requests a second: a steady client, not a CPU hog on 2 cores

    def successes_after(self, t: float) -> int:
        return sum(1 for start, _, _, ok in self.log if ok and start > t)


def recovery_phase(
    cluster: Any, node_a: Any, base: str, before: list[dict], x: torch.Tensor, expected: torch.Tensor, node_b: str
) -> dict[str, Any]:
    """Remove node a (owner of the shared copy) while requests keep coming to the replicas on node b."""
    from zerocopy_runtime import published_names

    url = f"{base}/b"
    old_owner = before[0]["owner_pid"]
    load = Load(url, x, expected)
    load.start()
    until(lambda: load.successes_after(0) >= 3, 30)
    removed_at = time.monotonic()
    cluster.remove_node(node_a, allow_graceful=False)  # a crash: SIGKILL to every process of node a
    removal_s = time.monotonic() - removed_at
    # Recovered: both replicas on node b answer from a new owner's copy.
    seen = until(lambda: get_info(url)["owner_pid"] != old_owner, 60, every_s=0.05)
    infos = (replica_infos(url, 30, where=lambda info: info["owner_pid"] != old_owner) or []) if seen else []
    recovered_at = time.monotonic()
    until(lambda: load.successes_after(recovered_at) >= 3, 30)
    load.stop.set()
    load.join(timeout=35)
    status, body = post(url, x)
    window = [entry for entry in load.log if entry[0] >= removed_at]
    failed = [entry for entry in window if not entry[3]]
    weights = infos[0]["weights"] if infos else None
    return {
        "removal_s": removal_s,
        "recovered_s": recovered_at - removed_at if infos else None,
        "requests": len(window),
        "failed": len(failed),
        "failed_statuses": sorted({str(e[2])[:80] for e in failed}),
        "first_failure_s": failed[0][1] - removed_at if failed else None,
        "last_failure_s": failed[-1][1] - removed_at if failed else None,
        "max_latency_s": max((end - start for start, end, _, _ in window), default=None),
        "ok_after_recovery": load.successes_after(recovered_at),
        "last_request_ok": bool(window) and window[-1][3],
        "infos": infos,
        "replaced": sorted(i["pid"] for i in before) != sorted(i["pid"] for i in infos),
        "owner": owner_of(weights) if weights else None,
        "published": [name for name in published_names() if name.startswith(APP_MODEL + "-")],
        "answer": answers(status, body, expected),
        "store_maps": [store_maps(info["pid"]) for info in infos],
        "store_used_b": store_used(node_b),
    }


def main() -> dict[str, Any]:
    from ray import serve
    from ray.cluster_utils import Cluster
    from safetensors.torch import save_file

    from tests.models import MLP

    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="ray-2n-"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_TMPDIR"] = str(work)  # every node's session, sockets and Ray's address file stay in here
    (work / "ray").mkdir()
    torch.set_num_threads(1)  # as in Ray workers: results are bitwise comparable
    torch.manual_seed(0)
    model = MLP(WIDTH, DEPTH).eval()
    checkpoint = work / "mlp.safetensors"
    save_file(model.state_dict(), checkpoint)
    x = torch.randn(WIDTH)  # one example: Serve's tensor handler adds the batch dimension itself
    with torch.no_grad():
        expected = model(x.unsqueeze(0))[0]

    common = {"object_store_memory": STORE_BYTES, "num_cpus": 2, "include_dashboard": False}
    fast_failure = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(
        initialize_head=True,
        head_node_args=common
        | {
            "resources": {"node_b": 1},
            "_system_config": fast_failure,
            "no_monitor": True,
            "include_log_monitor": False,
        },
    )
    node_a = cluster.add_node(**common, resources={"node_a": 1})
    result: dict[str, Any] = {"work_dir": str(work)}
    try:
        ray.init(address=cluster.address, namespace="two-nodes", log_to_driver=False)
        node_ids = {"a": node_a.node_id, "b": cluster.head_node.node_id}
        raylets = {"a": raylet_pid(node_a), "b": raylet_pid(cluster.head_node)}
        result["node_ids"] = node_ids
        result["raylet_store_inodes"] = {n: store_maps(raylets[n])["inodes"] for n in NODES}
        result["startup_s"] = time.monotonic() - started

        mark = time.monotonic()
        result["actors"] = actors_phase(checkpoint, x, expected, node_ids)
        result["actors_s"] = time.monotonic() - mark

        mark = time.monotonic()
        result["remote"] = remote_phase(checkpoint, work, x, expected)
        result["remote_s"] = time.monotonic() - mark

        mark = time.monotonic()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        base = f"http://127.0.0.1:{port}"
        nbytes = result["actors"]["nbytes"]
        result["serve"], infos = serve_phase(base, checkpoint, x, expected, nbytes)
        result["serve_s"] = time.monotonic() - mark

        if len(infos["b"]) == 2:
            mark = time.monotonic()
            result["recovery"] = recovery_phase(cluster, node_a, base, infos["b"], x, expected, node_ids["b"])
            result["recovery_phase_s"] = time.monotonic() - mark
    except Exception:  # report what was measured so far, and why it stopped
        result["error"] = traceback.format_exc()
    finally:
        mark = time.monotonic()
        ray.shutdown()
        cluster.shutdown()
        result["shutdown_s"] = time.monotonic() - mark
        if "error" not in result:  # keep Ray's logs only when they can explain a failure
            shutil.rmtree(work, ignore_errors=True)
        result["total_s"] = time.monotonic() - started
    return result


if __name__ == "__main__":
    print(MARKER + json.dumps(main()), flush=True)
