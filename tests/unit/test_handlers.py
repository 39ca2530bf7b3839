"""The default tensor handler's JSON codec, and its refusals."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import same_bits
from tests.models import MLP
from zerocopy_runtime.handlers import BadRequest, decode, encode, load_handler, tensor_handler

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float16])
def test_base64_round_trip_is_bitwise(dtype: torch.dtype) -> None:
    tensor = (torch.randn(3, 4) * 10).to(dtype)
    encoded = encode(tensor, as_base64=True)
    assert same_bits(decode({"inputs": encoded}), tensor)


def test_nested_lists_with_dtype() -> None:
    assert decode({"inputs": [[1, 2], [3, 4]], "dtype": "int64"}).dtype == torch.int64
    assert encode(torch.ones(2))["outputs"] == [1.0, 1.0]


@pytest.mark.parametrize(
    "body",
    [
        {"wrong": 1},
        {"inputs": "text"},
        {"inputs": [1], "dtype": "float99"},
        {"inputs": {"b64": "!!", "dtype": "float32"}},
    ],
)
def test_malformed_bodies_are_bad_requests(body: dict) -> None:
    with pytest.raises(BadRequest):
        decode(body)


def test_handler_batches_same_shapes_and_answers_in_kind() -> None:
    model = MLP(8, 1).eval()
    x = torch.randn(8)
    with torch.no_grad():
        plain, b64 = tensor_handler(model, [{"inputs": x.tolist()}, {"inputs": encode(x, as_base64=True)}])
        expected = model(x.unsqueeze(0))[0]
    assert torch.allclose(torch.tensor(plain["outputs"]), expected)
    assert torch.allclose(decode({"inputs": b64}), expected)  # a batch of 2 may round differently


def test_unknown_handler_path_says_what_to_check() -> None:
    with pytest.raises(ValueError, match=r"serving\.handler"):
        load_handler("tests.models:nope")
    assert load_handler("tensor") is tensor_handler
