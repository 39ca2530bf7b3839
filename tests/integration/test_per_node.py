"""Zero-copy holds per node: two Ray nodes, plain actors and Serve replicas, and losing the owner's node.

The scenario runs in a subprocess (tests/integration/two_nodes.py): a two-node `ray.cluster_utils.Cluster`
cannot share a process with the session's single-node Ray. It prints what it measured as one JSON line;
each test here checks one claim on it. Node "a" publishes (it holds the owner), node "b" pulls.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import ROOT
from tests.integration.two_nodes import MARKER, NODES

pytestmark = pytest.mark.integration

#: The scenario takes about a minute on 2 quiet cores, two when other Ray jobs share them; past this it is stuck.
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def run() -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another Ray
    env |= {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}
    script = [sys.executable, "-m", "tests.integration.two_nodes"]
    # Its own session: whatever Ray leaves behind in it is killed below, and nothing else.
    proc = subprocess.Popen(
        script, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the two-node scenario ran past {TIMEOUT_S} s; its stderr ends with:\n{err[-4000:]}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    lines = [line for line in out.splitlines() if line.startswith(MARKER)]
    assert lines, (
        f"the scenario printed no result (exit status {proc.returncode}); its stderr ends with:\n{err[-4000:]}"
    )
    return json.loads(lines[-1].removeprefix(MARKER))


def part(run: dict[str, Any], key: str) -> Any:
    """One phase's measurements; a phase that did not run fails with the reason the script gave."""
    if key not in run:
        pytest.fail(f"the scenario stopped before {key!r}: {run.get('error', 'no error reported')}")
    return run[key]


def in_store_of(node: str, run: dict[str, Any], inodes: list[int]) -> bool:
    """True when these mapped files are that node's object store (as its raylet maps it) and not the other's."""
    stores = run["raylet_store_inodes"]
    other = next(n for n in NODES if n != node)
    return bool(inodes) and set(inodes) <= set(stores[node]) and not set(inodes) & set(stores[other])


def test_plain_actors_share_one_copy_per_node(run: dict[str, Any]) -> None:
    actors = part(run, "actors")
    nbytes = actors["nbytes"]
    assert actors["owner"]["node_id"] == run["node_ids"]["a"]  # published from an actor on node a
    assert set(run["raylet_store_inodes"]["a"]).isdisjoint(run["raylet_store_inodes"]["b"])  # two stores
    objects = {tuple(a["object_ids"]) for n in NODES for a in actors[n]["actors"]}
    assert len(objects) == 1  # every actor on both nodes attached to the same store objects
    for n in NODES:
        here = actors[n]
        for actor in here["actors"]:
            assert actor["node_id"] == run["node_ids"][n]
            assert actor["shared"] is True  # every storage's data pointer lies in a store mapping...
            assert in_store_of(n, run, actor["inodes"])  # ... of this node's store
            assert actor["bitwise"] is True  # the attached model computes exactly what the original does
        for mapped in here["store_maps"]:
            assert mapped["rss"] >= nbytes, mapped  # each actor reads all the weights through the store
        # PSS charges a shared page 1/k to each of its k mappers: two private copies would be 2 x nbytes.
        assert sum(m["pss"] for m in here["store_maps"]) <= 1.25 * nbytes, here["store_maps"]
        # Two private copies would be 2 x nbytes; up to 0.5 x of 8 MiB is left for what else two Ray workers
        # allocate meanwhile (1.27 x was seen once under CI load, where 1.25 x failed a correct run).
        attached = here["pss_after"] - here["pss_before"]
        assert attached <= 1.5 * nbytes, f"node {n}: the two actors grew by {attached} B for {nbytes} B of weights"
        copied = here["pss_private"] - here["pss_after"]  # then each actor copies the weights privately
        assert copied >= 1.75 * nbytes, f"node {n}: two private copies measured as {copied} B, not 2 x {nbytes} B"
        # One copy in each node's store: node b pulled it once for both of its actors.
        assert nbytes <= here["store_used"] <= 1.5 * nbytes, f"node {n} store holds {here['store_used']} B"


def test_a_remote_model_is_read_from_its_source_once_for_both_nodes(run: dict[str, Any]) -> None:
    """Node a downloads and publishes; node b pulls the weights from node a's store and the config and tokenizer
    from the files published with them: not one byte of any file from the source, and nothing in its cache
    but those side files."""
    from tests.integration.two_nodes import SIDE_FILES

    remote = part(run, "remote")
    a, b = remote["a"], remote["b"]
    assert a["read"] == remote["sizes"], "node a should read each file of the source exactly once"
    assert b["read"] == {}, f"node b read {b['read']} from the source"
    assert a["weights"] == b["weights"]
    assert a["object_ids"] == b["object_ids"]
    assert (a["node_id"], b["node_id"]) == (run["node_ids"]["a"], run["node_ids"]["b"])
    assert a["bitwise"] is True
    assert b["bitwise"] is True
    for facts in (a, b):
        assert facts["folder_in_cache"] is True  # written from the published side files on each node
        assert facts["files"] == SIDE_FILES  # the config and tokenizer, and never the weights
    assert all(path.startswith("published/") for path in b["cached"]), b["cached"]


def test_serve_replicas_share_one_copy_per_node(run: dict[str, Any]) -> None:
    serve = part(run, "serve")
    nbytes = part(run, "actors")["nbytes"]
    infos = {n: serve[n]["infos"] for n in NODES}
    assert all(len({i["pid"] for i in infos[n]}) == 2 for n in NODES), infos
    assert serve["owner"]["node_id"] == run["node_ids"]["a"]  # node a deployed first and published
    assert len({i["owner_pid"] for n in NODES for i in infos[n]}) == 1  # one owner for both nodes
    assert len({tuple(i["object_ids"]) for n in NODES for i in infos[n]}) == 1  # the same store objects
    for n in NODES:
        here = serve[n]
        assert {i["node_id"] for i in infos[n]} == {run["node_ids"][n]}
        assert all(i["shared"] is True for i in infos[n])
        assert here["answer"]["ok"] is True  # the replica's answer equals the original model's
        assert here["touched"] is True  # requests made each replica read every weight page
        for mapped in here["store_maps"]:
            assert in_store_of(n, run, mapped["inodes"])
            assert mapped["rss"] >= nbytes, mapped
        assert sum(m["pss"] for m in here["store_maps"]) <= 1.25 * nbytes, here["store_maps"]


def test_losing_the_owners_node_republishes_on_the_surviving_node(run: dict[str, Any]) -> None:
    recovery = part(run, "recovery")
    before = part(run, "serve")["b"]["infos"]
    after = recovery["infos"]
    node_b = run["node_ids"]["b"]
    summary = {k: recovery[k] for k in recovery if k not in ("infos", "store_maps")}
    print("recovery after removing node a:", json.dumps(summary))
    assert len({i["pid"] for i in after}) == 2, "node b's replicas never attached to a new owner"
    # Re-attached in place by their health check, not restarted: no moment without a replica on node b.
    assert {i["pid"] for i in after} == {i["pid"] for i in before}
    assert all(i["reattached"] >= 1 for i in after)
    assert recovery["owner"]["node_id"] == node_b  # published again where it is needed
    assert {i["owner_pid"] for i in after} == {recovery["owner"]["pid"]}
    assert recovery["owner"]["pid"] != before[0]["owner_pid"]
    assert len({tuple(i["object_ids"]) for i in after}) == 1  # both replicas share the new copy
    assert after[0]["object_ids"] != before[0]["object_ids"]
    assert all(i["node_id"] == node_b and i["shared"] is True for i in after)
    assert all(in_store_of("b", run, mapped["inodes"]) for mapped in recovery["store_maps"])
    assert recovery["published"] == [after[0]["weights"]]  # the dead owner's name did not stay behind
    assert recovery["answer"]["ok"] is True
    assert recovery["ok_after_recovery"] >= 3  # service resumed: requests answer correctly again
    assert recovery["last_request_ok"] is True
