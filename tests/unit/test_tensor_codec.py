"""The default tensor handler: one example per request, named inputs, batching of like examples, refusals."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.helpers import same_bits
from tests.models import MLP
from zerocopy_runtime.tensor_codec import BadRequest, decode, encode, load_handler, tensor_handler

pytestmark = pytest.mark.unit


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_bert() -> Any:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return BertModel(config).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.float16])
def test_base64_round_trip_is_bitwise(dtype: torch.dtype) -> None:
    tensor = (torch.randn(3, 4) * 10).to(dtype)
    encoded = encode(tensor, as_base64=True)
    example = decode({"inputs": encoded})
    assert example.positional
    assert same_bits(example.tensors["inputs"], tensor)


def test_nested_lists_with_dtype_and_named_inputs() -> None:
    assert decode({"inputs": [[1, 2], [3, 4]], "dtype": "int64"}).tensors["inputs"].dtype == torch.int64
    named = decode({"inputs": {"a": [1.5], "b": [1, 2]}, "dtype": {"b": "int64"}})
    assert (named.tensors["a"].dtype, named.tensors["b"].dtype) == (torch.float32, torch.int64)
    assert not named.positional
    assert encode(torch.ones(2))["outputs"] == [1.0, 1.0]


@pytest.mark.parametrize(
    "body",
    [
        {"wrong": 1},
        {"inputs": "text"},
        {"inputs": [1], "dtype": "float99"},
        {"inputs": {"b64": "!!", "dtype": "float32"}},
        {"inputs": {"b64": "AAAA", "dtype": "float32", "shape": [1], "extra": 1}},
        {"inputs": {}},
        {"inputs": [[1, 2], [3]]},
        {"inputs": [1.0], "dtype": {"x": "int64"}},
        {"inputs": {"a": [1.0]}, "dtype": {"b": "int64"}},
    ],
    ids=["no-inputs", "text", "dtype", "b64-no-shape", "b64-extra", "empty", "ragged", "dtype-map", "dtype-unknown"],
)
def test_bodies_that_cannot_be_read_one_way_are_bad_requests(body: dict) -> None:
    with pytest.raises(BadRequest):
        decode(body)


def test_like_examples_run_as_one_batch_and_each_gets_its_row() -> None:
    model = MLP(8, 1).eval()
    xs = [torch.randn(8) for _ in range(3)]
    with torch.no_grad():
        answers = tensor_handler(model, [{"inputs": x.tolist()} for x in xs])
        expected = model(torch.stack(xs))
    for answer, row in zip(answers, expected, strict=True):
        assert answer["shape"] == [10]
        assert torch.allclose(torch.tensor(answer["outputs"]), row, atol=1e-6)


def test_base64_in_gets_base64_out() -> None:
    model = MLP(8, 1).eval()
    x = torch.randn(8)
    with torch.no_grad():
        (answer,) = tensor_handler(model, [{"inputs": encode(x, as_base64=True)}])
        expected = model(x.unsqueeze(0))[0]
    assert torch.allclose(decode({"inputs": answer}).tensors["inputs"], expected)


def test_causal_lm_answers_equal_the_model_run_directly_single_and_batched() -> None:
    model = tiny_llama()
    prompts = [[1, 5, 9, 13, 2, 7], [3, 4, 5, 6, 7, 8], [9, 9, 1]]
    with torch.no_grad():
        answers = tensor_handler(model, [{"inputs": p} for p in prompts])  # the plain form: one sequence
        for prompt, answer in zip(prompts, answers, strict=True):
            expected = model(torch.tensor([prompt])).logits[0]
            assert answer["shape"] == list(expected.shape)
            assert torch.allclose(torch.tensor(answer["outputs"]), expected, atol=1e-5)


def test_a_batch_dimension_the_client_added_is_refused_not_misread() -> None:
    """[[ids]] would reach attention as many one-token sequences: 400, never wrong logits."""
    model = tiny_llama()
    with pytest.raises(BadRequest, match="without a batch dimension"):
        tensor_handler(model, [{"inputs": [[1, 5, 9, 13]], "dtype": "int64"}])
    with pytest.raises(BadRequest, match="attention_mask has shape"):
        tensor_handler(model, [{"inputs": {"input_ids": [1, 2, 3], "attention_mask": [1, 1]}}])


def test_encoder_with_padding_and_attention_mask_equals_the_model_run_directly() -> None:
    model = tiny_bert()
    ids, mask = [2, 7, 11, 5, 0, 0], [1, 1, 1, 1, 0, 0]
    bodies = [{"inputs": {"input_ids": ids, "attention_mask": mask}}, {"inputs": {"input_ids": [2, 7, 11, 5]}}]
    with torch.no_grad():
        padded, unpadded = tensor_handler(model, bodies)
        expected = model(input_ids=torch.tensor([ids]), attention_mask=torch.tensor([mask])).last_hidden_state[0]
        short = model(input_ids=torch.tensor([[2, 7, 11, 5]])).last_hidden_state[0]
    assert torch.allclose(torch.tensor(padded["outputs"]), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(unpadded["outputs"]), short, atol=1e-5)
    # the mask matters: the real tokens' states equal the unpadded sequence's
    assert torch.allclose(torch.tensor(padded["outputs"])[:4], short, atol=1e-4)


def test_unknown_handler_path_says_what_to_check() -> None:
    with pytest.raises(ValueError, match=r"serving\.handler"):
        load_handler("tests.models:nope")
    assert load_handler("tensor") is tensor_handler
