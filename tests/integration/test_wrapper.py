"""ModelWrapper as the public guide describes it: task mode, actor mode, Ray Data, pipelines."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import ray
import torch
from ray.data import ActorPoolStrategy

import zerocopy_runtime as zc
from tests.helpers import same_bits
from tests.models import MLP, Introspective, Pipeline, Sized, TinyTransformer

pytestmark = pytest.mark.integration


@pytest.fixture
def wrappers(ray_session: None):
    made: list[zc.ModelWrapper] = []
    yield made
    for wrapper in made:
        wrapper.release()


def _wrap(wrappers: list, model, *args, **kwargs) -> zc.ModelWrapper:
    wrapper = zc.ModelWrapper.from_model(model, *args, **kwargs)
    wrappers.append(wrapper)
    return wrapper


def test_task_mode_is_callable_like_the_model_and_forwards_attributes(wrappers: list) -> None:
    model = TinyTransformer().eval()
    wrapper = _wrap(wrappers, model, mode="task", num_cpus=0.5)
    remote = wrapper.load()
    tokens = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        assert same_bits(remote(tokens), model(tokens))
    assert remote.config.vocab == 50
    assert remote.config is not model.config  # a copy travelled, the weights did not


def test_for_tasks_returns_the_stand_in_directly(ray_session: None) -> None:
    model = MLP().eval()
    remote = zc.ModelWrapper.for_tasks(model, num_cpus=0.5)
    try:
        assert isinstance(remote, zc.TaskModel)
        x = torch.randn(2, 64)
        with torch.no_grad():
            assert same_bits(remote(x), model(x))
    finally:
        remote.release()


def test_task_workers_attach_once_and_honour_resources(wrappers: list) -> None:
    wrapper = _wrap(
        wrappers, Introspective(), mode="task", method_names=("__call__", "whoami", "resources"), num_cpus=0.5
    )
    remote = wrapper.load()
    seen: dict[int, set[int]] = {}
    for _ in range(6):
        pid, model_id = remote.whoami()
        seen.setdefault(pid, set()).add(model_id)
    assert all(len(ids) == 1 for ids in seen.values()), seen
    assert remote.resources()["CPU"] == 0.5
    with pytest.raises(AttributeError, match="add it to method_names"):
        remote.forward(torch.randn(1, 64))


def test_wrapper_pickles_without_weights(wrappers: list) -> None:
    wrapper = _wrap(wrappers, Sized(16))
    assert len(pickle.dumps(wrapper)) < 64 * 1024
    assert wrapper.published.nbytes >= 16 * 2**20


@ray.remote(num_cpus=0.5)
class Holder:
    def __init__(self, wrapper: zc.ModelWrapper) -> None:
        self.model = wrapper.load()

    def facts(self) -> tuple[bool, bool, str]:
        report = zc.attach_report(self.model)
        return report.in_object_store, self.model.training, str(next(self.model.parameters()).device)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


def test_actor_mode_shares_one_copy_across_four_actors(wrappers: list, actors: list) -> None:
    model = MLP().train()
    wrapper = _wrap(wrappers, model, mode="actor")
    actors += [Holder.remote(wrapper) for _ in range(4)]
    facts = ray.get([a.facts.remote() for a in actors])
    assert facts == [(True, False, "cpu")] * 4  # in the store, eval mode, on CPU
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model.eval()(x)
    for out in ray.get([a.predict.remote(x) for a in actors]):
        assert same_bits(out, expected)


def test_loaded_model_moves_to_another_device_or_dtype(wrappers: list) -> None:
    loaded = _wrap(wrappers, MLP()).load()
    moved = loaded.to(torch.float64)  # .to() makes private copies; the shared bytes stay intact
    assert moved.net[0].weight.dtype == torch.float64
    assert zc.attach_report(loaded).in_object_store


class InferenceActor:
    def __init__(self, model_wrapper: zc.ModelWrapper) -> None:
        self.model = model_wrapper.load()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            out = self.model(torch.from_numpy(batch["x"]))
        shared = zc.attach_report(self.model).in_object_store
        return {"y": out.numpy(), "shared": np.full(len(out), shared)}


def test_ray_data_actor_pool_shares_the_model(wrappers: list) -> None:
    model = MLP().eval()
    wrapper = _wrap(wrappers, model, mode="actor")
    rows = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    ds = ray.data.from_items([{"x": row} for row in rows])
    out = ds.map_batches(
        InferenceActor,
        fn_constructor_kwargs={"model_wrapper": wrapper},
        compute=ActorPoolStrategy(size=4),
        num_cpus=0.5,
        batch_size=8,
        batch_format="numpy",
    ).take_all()
    assert len(out) == 64
    assert all(r["shared"] for r in out)
    got = np.stack([r["y"] for r in out])
    with torch.no_grad():
        expected = model(torch.from_numpy(rows)).numpy()
    # Ray Data may reorder rows across actors; compare as sets of rows.
    assert np.array_equal(np.sort(got, axis=0), np.sort(expected, axis=0))


def test_pipeline_shares_every_reachable_model_in_actor_mode(wrappers: list) -> None:
    pipe = Pipeline()
    wrapper = _wrap(wrappers, pipe, mode="actor")
    names = {n for r in wrapper.published.manifest.tensors for n in r.names}
    assert {"encoder.net.0.weight", "_decoder.weight", "extras.heads.0.weight"} <= names
    assert pipe.property_reads == 0
    loaded = wrapper.load()
    report = zc.attach_report(loaded)
    assert report.in_object_store
    assert report.tensor_count == len(names)
    assert loaded.threshold == 0.5
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), pipe(x))


def test_pipeline_in_task_mode_runs_each_model_remotely(wrappers: list) -> None:
    pipe = Pipeline()
    remote = _wrap(wrappers, pipe, mode="task", num_cpus=0.5).load()
    assert isinstance(remote.encoder, zc.TaskModel)
    assert isinstance(remote._decoder, zc.TaskModel)
    assert isinstance(remote.extras["heads"][0], zc.TaskModel)
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert torch.equal(remote(x), pipe(x))


def test_model_attr_names_shares_only_those_models(wrappers: list) -> None:
    pipe = Pipeline()
    wrapper = _wrap(wrappers, pipe, model_attr_names=["encoder"])
    names = {n for r in wrapper.published.manifest.tensors for n in r.names}
    assert names
    assert all(n.startswith("encoder.") for n in names)
    loaded = wrapper.load()
    x = torch.randn(2, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), pipe(x))


def test_bad_mode_is_refused(ray_session: None) -> None:
    with pytest.raises(ValueError, match="mode must be"):
        zc.ModelWrapper.from_model(MLP(), mode="process")  # type: ignore[arg-type]


def test_task_mode_refuses_state_dicts_before_publishing(ray_session: None) -> None:
    with pytest.raises(TypeError, match="not a state dict"):
        zc.ModelWrapper.from_model(MLP().state_dict(), mode="task")


def test_task_mode_explains_models_in_tuples(wrappers: list) -> None:
    class Stages:
        def __init__(self) -> None:
            self.stages = (MLP(8, 1), MLP(10, 1))

    wrapper = _wrap(wrappers, Stages(), mode="task")
    with pytest.raises(TypeError, match="tuple"):
        wrapper.load()
