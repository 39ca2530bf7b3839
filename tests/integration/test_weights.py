"""Publish once, attach zero-copy: round trips, ties, lifetimes, the write guard and bad input."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import ray
import torch
from safetensors.torch import save_file
from torch import nn

import zerocopy_runtime as zc
from tests.conftest import ROOT, STORE_BYTES
from tests.helpers import ALL_DTYPES, same_bits, sample
from tests.models import MLP, ConvNet, Sized, TinyTransformer
from zerocopy_runtime._store import local_store_usage

pytestmark = pytest.mark.integration


def _publish(published: list, source, **kwargs) -> zc.PublishedModel:
    handle = zc.publish(source, **kwargs)
    published.append(handle.name)
    return handle


def _inputs(model: nn.Module) -> torch.Tensor:
    torch.manual_seed(0)
    if isinstance(model, TinyTransformer):
        return torch.randint(0, 50, (2, 7))
    if isinstance(model, ConvNet):
        return torch.randn(2, 3, 12, 12)
    return torch.randn(4, 64)


@pytest.mark.parametrize("make", [MLP, ConvNet, TinyTransformer], ids=["mlp", "convnet-bn", "transformer-tied"])
def test_attached_model_is_bitwise_identical(published: list, make) -> None:
    model = make().eval()
    x = _inputs(model)
    handle = _publish(published, model)
    attached = zc.attach(handle).eval()
    with torch.no_grad():
        assert same_bits(attached(x), model(x))
    assert list(attached.state_dict()) == list(model.state_dict())
    for (name, a), (_, b) in zip(attached.state_dict().items(), model.state_dict().items(), strict=True):
        assert same_bits(a, b), name
        assert a.data_ptr() != b.data_ptr()
    report = zc.attach_report(attached)
    assert report.in_object_store
    assert report.tensor_count == len({id(t) for t in [*model.parameters(), *model.buffers()]})
    unique = {t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}
    assert report.bytes_shared == sum(unique.values())


def test_every_dtype_round_trips_through_byte_views(published: list) -> None:
    state = {str(d): sample(d) for d in ALL_DTYPES}
    state |= {"scalar": torch.tensor(3.5), "empty": torch.empty(0, 4), "noncontig": torch.randn(6, 8).t()}
    attached = zc.attach(_publish(published, state))
    assert list(attached) == list(state)
    for name, tensor in state.items():
        assert same_bits(attached[name], tensor), name
        assert attached[name].stride() == tensor.stride(), name
    assert not attached["noncontig"].is_contiguous()


def test_ties_buffers_and_parameter_types_survive(published: list) -> None:
    model = TinyTransformer()
    attached = zc.attach(_publish(published, model))
    assert attached.lm_head.weight is attached.embed.weight
    assert "positions" in attached._non_persistent_buffers_set
    assert "positions" not in attached.state_dict()
    assert isinstance(attached.embed.weight, nn.Parameter)
    assert attached.config.vocab == 50


def test_attach_with_factory_from_safetensors_shards(published: list, tmp_path: Path) -> None:
    model = TinyTransformer().eval()
    state = model.state_dict()
    del state["lm_head.weight"]  # safetensors stores a tied weight once
    names = sorted(state)
    save_file({k: state[k].contiguous() for k in names[: len(names) // 2]}, tmp_path / "model-1.safetensors")
    save_file({k: state[k].contiguous() for k in names[len(names) // 2 :]}, tmp_path / "model-2.safetensors")
    handle = _publish(published, tmp_path)
    attached = zc.attach(handle, factory=TinyTransformer).eval()
    x = _inputs(model)
    with torch.no_grad():
        assert same_bits(attached(x), model(x))
    assert attached.lm_head.weight is attached.embed.weight
    assert zc.attach_report(attached).in_object_store
    assert not any(p.is_meta for p in attached.parameters())


def test_attach_with_factory_from_torch_state_dict(published: list, tmp_path: Path) -> None:
    model = ConvNet().eval()
    torch.save(model.state_dict(), tmp_path / "convnet.pt")
    attached = zc.attach(_publish(published, tmp_path / "convnet.pt"), factory=ConvNet).eval()
    x = _inputs(model)
    with torch.no_grad():
        assert same_bits(attached(x), model(x))


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def test_the_owner_never_imports_torch_whatever_the_checkpoint(published: list, tmp_path: Path) -> None:
    """It copies bytes as bytes (every dtype, an empty tensor, a scalar): its cost is an idle Ray worker's. A torch
    state dict, which only torch can read, is read by a child process that exits once it has handed the bytes
    over. (This process maps torch: the check can fail.)"""
    state = {str(d): sample(d) for d in ALL_DTYPES} | {"scalar": torch.tensor(2.5), "empty": torch.empty(0, 3)}
    save_file(state, tmp_path / "every-dtype.safetensors")
    torch.save(state, tmp_path / "every-dtype.pt")
    from_safetensors = _publish(published, tmp_path / "every-dtype.safetensors")
    from_pickle = _publish(published, tmp_path / "every-dtype.pt")
    assert _maps_torch(os.getpid())
    assert not _maps_torch(from_safetensors.owner_pid)
    assert not _maps_torch(from_pickle.owner_pid)
    for handle in (from_safetensors, from_pickle):
        attached = zc.attach(handle)
        assert sorted(attached) == sorted(state)
        for name, tensor in state.items():
            assert same_bits(attached[name], tensor), name
    assert from_safetensors.nbytes == from_pickle.nbytes


def test_factory_mismatch_names_the_offending_tensors(published: list) -> None:
    handle = _publish(published, MLP(64).state_dict())
    with pytest.raises(zc.CheckpointError, match=r"net\.0\.weight.*\(64, 64\).*\(32, 32\)"):
        zc.attach(handle, factory=lambda: MLP(32))
    with pytest.raises(zc.CheckpointError, match="not in the architecture"):
        zc.attach(handle, factory=lambda: MLP(64, depth=2))
    with pytest.raises(zc.CheckpointError, match=r"float32.*float16"):
        zc.attach(handle, factory=lambda: MLP(64).half())


def test_missing_checkpoint_fails_before_anything_is_published(ray_session: None, tmp_path: Path) -> None:
    with pytest.raises(zc.CheckpointError, match="does not exist"):
        zc.publish(tmp_path / "missing.safetensors", name="missing-ckpt")
    with pytest.raises(zc.WeightsNotFoundError):
        zc.lookup("missing-ckpt")


def test_a_damaged_torch_checkpoint_is_refused_naming_it_and_nothing_stays_published(
    ray_session: None, tmp_path: Path
) -> None:
    """The child process that reads it reports the reader's own error; its files are removed."""
    from zerocopy_runtime._spool import _folder

    damaged = tmp_path / "damaged.pt"
    torch.save({"w": torch.ones(256)}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:200])
    with pytest.raises(zc.CheckpointError, match=r"damaged\.pt"):
        zc.publish(damaged, name="damaged-ckpt")
    with pytest.raises(zc.WeightsNotFoundError):
        zc.lookup("damaged-ckpt")
    assert not list(_folder(0).glob("zerocopy-convert-*"))


def test_store_too_small_is_refused_with_sizes_and_the_setting(ray_session: None) -> None:
    # torch.empty never touches its pages: the check must refuse before any byte is copied.
    huge = {"w": torch.empty(STORE_BYTES // 4 + 1024, dtype=torch.float32)}
    with pytest.raises(zc.ObjectStoreFullError, match=r"needs .* MiB.*free of .*object_store_memory") as info:
        zc.publish(huge, name="too-big")
    assert "384.0 MiB" in str(info.value)
    with pytest.raises(zc.WeightsNotFoundError):
        zc.lookup("too-big")


def test_duplicate_name_is_refused(published: list) -> None:
    _publish(published, MLP(8).state_dict(), name="dup")
    with pytest.raises(zc.ZeroCopyError, match="already published"):
        zc.publish(MLP(8).state_dict(), name="dup")


def test_release_frees_the_store(published: list) -> None:
    before = local_store_usage().used
    handle = _publish(published, Sized(32), name="to-release")
    assert local_store_usage().used - before >= 0.95 * 32 * 2**20
    attached = zc.attach(handle)
    del attached
    zc.release(handle)
    with pytest.raises(zc.WeightsNotFoundError):
        zc.lookup("to-release")
    del handle
    _wait_for(lambda: local_store_usage().used - before < 2**20, "store memory to be freed after release")


def _wait_for(condition, what: str, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


_PUBLISHER = textwrap.dedent(
    """
    import os, ray, torch, json, sys
    import zerocopy_runtime as zc
    from tests.models import MLP
    ray.init(address=sys.argv[1], namespace="publisher", log_to_driver=False)
    torch.manual_seed(7)
    handle = zc.publish(MLP(), name="outlives-publisher")
    print(json.dumps([r.hex() for r in handle.refs]))
    """
)


def test_objects_outlive_the_publishing_process(published: list) -> None:
    published.append("outlives-publisher")
    address = ray.get_runtime_context().gcs_address
    out = subprocess.run(
        [sys.executable, "-c", _PUBLISHER, address],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    published_refs = out.stdout.strip().splitlines()[-1]
    # The publisher has exited; its weights are still served by the owner.
    handle = zc.lookup("outlives-publisher")
    assert [r.hex() for r in handle.refs] == __import__("json").loads(published_refs)
    torch.manual_seed(7)
    reference = MLP()
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert same_bits(zc.attach(handle)(x), reference(x))


@ray.remote(max_restarts=1, num_cpus=0.25)
class Replica:
    def __init__(self, name: str, write_guard: bool = True) -> None:
        import zerocopy_runtime

        self.model = zerocopy_runtime.attach(name, write_guard=write_guard)

    def info(self) -> tuple[int, list[str], bool]:
        report = __import__("zerocopy_runtime").attach_report(self.model)
        refs = [r.hex() for r in __import__("zerocopy_runtime").lookup(report.name).refs]
        return os.getpid(), refs, report.in_object_store

    def first_weight(self) -> float:
        return float(self.model.net[0].weight[0, 0])

    def write(self) -> None:
        with torch.no_grad():
            self.model.net[0].weight.add_(1.0)

    def crash(self) -> None:
        os._exit(1)


def test_restarted_replica_reattaches_to_the_same_objects(published: list, actors: list) -> None:
    handle = _publish(published, MLP(), name="restart")
    replica = Replica.remote("restart")
    actors.append(replica)
    pid, refs, shared = ray.get(replica.info.remote())
    assert shared
    assert refs == [r.hex() for r in handle.refs]
    replica.crash.remote()
    _wait_for(lambda: _pid_after_restart(replica, pid), "the replica to restart")
    new_pid, new_refs, shared = ray.get(replica.info.remote())
    assert new_pid != pid
    assert new_refs == refs
    assert shared


def _pid_after_restart(replica, old_pid: int) -> bool:
    try:
        return ray.get(replica.info.remote(), timeout=5)[0] != old_pid
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return False


def test_write_guard_kills_the_writer_and_protects_other_processes(published: list, actors: list) -> None:
    torch.manual_seed(3)
    model = MLP()
    original = model.net[0].weight[0, 0].item()
    _publish(published, model, name="guarded")
    reader = zc.attach("guarded")
    writer = Replica.options(max_restarts=0).remote("guarded")
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(writer.write.remote())
    assert reader.net[0].weight[0, 0].item() == original
    assert same_bits(reader.net[0].weight, model.net[0].weight)
    other = Replica.remote("guarded")
    actors.append(other)
    assert ray.get(other.first_weight.remote()) == original


def test_without_the_guard_a_write_reaches_every_process(published: list, actors: list) -> None:
    """The control for the test above: the bytes really are shared, so the guard matters."""
    model = MLP()
    original = model.net[0].weight[0, 0].item()
    _publish(published, model, name="unguarded")
    writer = Replica.remote("unguarded", write_guard=False)
    ray.get(writer.write.remote())
    reader = Replica.remote("unguarded")
    actors += [writer, reader]
    assert ray.get(reader.first_weight.remote()) == pytest.approx(original + 1.0)


def test_guard_in_this_process_raises_on_in_place_write(published: list) -> None:
    code = textwrap.dedent(
        """
        import sys, ray, torch
        import zerocopy_runtime as zc
        ray.init(address=sys.argv[1], namespace="writer", log_to_driver=False)
        model = zc.attach("guard-here")
        print("attached", flush=True)
        with torch.no_grad():
            model.net[0].weight.copy_(torch.zeros_like(model.net[0].weight))
        print("wrote", flush=True)
        """
    )
    _publish(published, MLP(), name="guard-here")
    out = subprocess.run(
        [sys.executable, "-c", code, ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert "attached" in out.stdout
    assert "wrote" not in out.stdout
    assert out.returncode == -11  # SIGSEGV
    # faulthandler names the Python line that wrote.
    line = next(i for i, text in enumerate(code.splitlines(), 1) if ".copy_(" in text)
    assert "Segmentation fault" in out.stderr
    assert f'File "<string>", line {line}' in out.stderr


_PEAK_PROBE = textwrap.dedent(
    """
    import resource, sys, ray, torch
    import zerocopy_runtime as zc
    from tests.models import Sized
    ray.init(address=sys.argv[1], namespace="peak", log_to_driver=False)
    model = Sized(96, tensors=12)
    for p in model.parameters():
        p.data.add_(0)  # fault every page in before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    handle = zc.publish(model, name="peak", chunk_bytes=32 * 2**20)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(peak - before, handle.nbytes)
    """
)


def test_publisher_peak_memory_stays_near_one_model(published: list) -> None:
    published.append("peak")
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE, ray.get_runtime_context().gcs_address],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    extra, nbytes = map(int, out.stdout.split()[-2:])
    assert nbytes == 96 * 2**20
    # The publisher only writes two 32 MiB spool buffers; a deep copy would add 1x the model (96 MiB).
    assert extra < 2 * 32 * 2**20 + 16 * 2**20


def test_publish_leaves_no_spool_files_behind(published: list, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("ZEROCOPY_SPOOL_DIR", str(tmp_path))
    model = Sized(8, tensors=40)  # 40 tensors of 0.2 MiB: 5 per 1 MiB chunk
    handle = _publish(published, model, chunk_bytes=2**20)
    assert list(tmp_path.iterdir()) == []
    assert handle.manifest.chunk_count == 8  # both spool buffers were reused several times
    attached = zc.attach(handle)
    for mine, theirs in zip(attached.parameters(), model.parameters(), strict=True):
        assert same_bits(mine, theirs)


def test_small_storages_are_aligned_for_every_dtype(published: list) -> None:
    state = {"odd": torch.ones(3, dtype=torch.uint8), "c128": torch.randn(2, dtype=torch.complex128)}
    state |= {f"k{i}": torch.ones(i + 1, dtype=torch.int8) for i in range(5)}
    attached = zc.attach(_publish(published, state))
    for name, tensor in attached.items():
        assert tensor.data_ptr() % 64 == 0, name
        assert same_bits(tensor, state[name]), name


def test_factory_keeps_ties_made_before_registration(published: list, tmp_path: Path) -> None:
    def tied() -> nn.Module:
        shared = nn.Parameter(torch.randn(4, 4))
        model = nn.Module()
        model.a, model.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        model.a.weight = shared
        model.b.weight = shared
        return model

    save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "tied.safetensors")  # stored once
    attached = zc.attach(_publish(published, tmp_path / "tied.safetensors"), factory=tied)
    assert attached.a.weight is attached.b.weight


def test_publishing_nothing_is_refused(ray_session: None) -> None:
    with pytest.raises(zc.ZeroCopyError, match="no tensors"):
        zc.publish(nn.ReLU())


@pytest.mark.parametrize("from_file", [False, True], ids=["module", "checkpoint"])
def test_progress_reports_bytes_up_to_the_whole_model(published: list, tmp_path: Path, from_file: bool) -> None:
    model = Sized(24, tensors=12)
    source: object = model
    if from_file:
        save_file(model.state_dict(), tmp_path / "sized.safetensors")
        source = tmp_path / "sized.safetensors"
    calls: list[tuple[int, int]] = []
    handle = _publish(published, source, chunk_bytes=4 * 2**20, progress=lambda *call: calls.append(call))
    assert calls, "progress was never reported"
    assert calls[-1] == (handle.nbytes, handle.nbytes)
    done = [d for d, total in calls if total]
    assert done == sorted(done)  # never goes backwards
