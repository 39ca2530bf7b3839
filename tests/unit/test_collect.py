"""Describing weights without copying them: records, ties, spans and refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.models import Pipeline, TinyTransformer
from zerocopy_runtime import UnsupportedWeightsError
from zerocopy_runtime._collect import collect
from zerocopy_runtime._owner import plan_chunks

pytestmark = pytest.mark.unit


def test_tied_weights_are_one_record_with_both_names() -> None:
    collected = collect(TinyTransformer())
    tied = [r for r in collected.records if "embed.weight" in r.names]
    assert len(tied) == 1
    assert set(tied[0].names) >= {"embed.weight", "lm_head.weight"}


def test_non_persistent_buffer_is_marked() -> None:
    records = {r.names[0]: r for r in collect(TinyTransformer()).records}
    assert records["positions"].persistent is False
    assert records["embed.weight"].persistent is True


def test_storages_are_views_of_the_original_memory() -> None:
    model = nn.Linear(8, 4)
    collected = collect(model)
    pointers = {s.data_ptr() for s in collected.storages}
    assert model.weight.data_ptr() in pointers
    assert model.bias.data_ptr() in pointers


def test_views_of_one_storage_share_it_and_unused_bytes_are_trimmed() -> None:
    base = torch.arange(1024, dtype=torch.float32)
    holder = {"a": base[512:520], "b": base[516:530].view(2, 7)}
    collected = collect(holder)
    assert len(collected.storages) == 1
    # Only the span used by the two views is published (aligned down to 64 bytes).
    assert collected.storages[0].numel() < 64 * 4
    a, b = collected.records
    assert a.storage == b.storage
    assert b.storage_offset - a.storage_offset == 4


def test_pipeline_walk_reaches_private_and_nested_modules_without_properties() -> None:
    pipe = Pipeline()
    names = {n for r in collect(pipe).records for n in r.names}
    assert "encoder.net.0.weight" in names
    assert "_decoder.weight" in names
    assert "extras.heads.0.weight" in names
    assert pipe.property_reads == 0


def test_only_limits_sharing_to_named_attributes() -> None:
    names = {n for r in collect(Pipeline(), only=["encoder"]).records for n in r.names}
    assert names
    assert all(n.startswith("encoder.") for n in names)


def test_only_rejects_attributes_that_are_not_models() -> None:
    with pytest.raises(TypeError, match="threshold"):
        collect(Pipeline(), only=["threshold"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.qint8), "quantized"),
        (lambda: torch.randn(4, 4).to_sparse(), "to_dense"),
        (lambda: torch.empty(4, device="meta"), "meta device"),
        (lambda: torch.randn(2, dtype=torch.complex64).conj(), "resolve_conj"),
    ],
)
def test_unsupported_tensors_are_refused_by_name(make, message: str) -> None:
    with pytest.raises(UnsupportedWeightsError, match=message) as info:
        collect({"layer.weight": make()})
    assert "layer.weight" in str(info.value)


def test_tensor_subclass_is_refused() -> None:
    class Tagged(torch.Tensor):
        pass

    with pytest.raises(UnsupportedWeightsError, match="subclass"):
        collect({"w": torch.randn(3).as_subclass(Tagged)})


def test_torchscript_is_refused_with_the_fix() -> None:
    with pytest.raises(UnsupportedWeightsError, match=r"eager nn\.Module"):
        collect(torch.jit.script(nn.Linear(2, 2)))


def test_chunks_group_in_order_and_keep_oversized_storages_alone() -> None:
    assert plan_chunks([10, 10, 10, 100, 5], 25) == [[0, 1], [2], [3], [4]]
    assert plan_chunks([], 25) == [[]]


def test_views_reporting_different_storage_lengths_share_the_longest() -> None:
    import numpy as np

    base = np.arange(64, dtype=np.float32)
    holder = {"small": torch.from_numpy(base[:10]), "big": torch.from_numpy(base)}
    collected = collect(holder)
    assert len(collected.storages) == 1
    assert collected.storages[0].numel() == 64 * 4
