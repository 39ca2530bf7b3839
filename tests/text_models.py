"""Tiny language models with real tokenizers trained here (no downloads), saved as a model folder would be."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CORPUS = [
    "the weights are published once per node and every replica maps the same bytes",
    "a chat model answers a message with its history",
    "hello world, hello zero copy serving on ray",
    "tokens stream back one by one until the end of the answer",
] * 8
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _bpe_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


#: A Llama shape vLLM's CPU attention takes (head size 64) with logits far apart, so that greedy picks
#: cannot flip between two implementations' rounding.
VLLM_LLAMA = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
              "initializer_range": 0.2}  # fmt: skip


def causal_lm_folder(folder: Path, **shape: Any) -> tuple[Any, Any]:
    """A 2-layer Llama with its BPE tokenizer, chat template and generation config in `folder`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    settings = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2} | shape
    config = LlamaConfig(
        vocab_size=len(tokenizer), num_hidden_layers=2, max_position_embeddings=96,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        **settings,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def encoder_folder(folder: Path) -> tuple[Any, Any]:
    """A 2-layer BERT with a WordPiece tokenizer and a sentence-transformers mean pooling + Normalize config."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=special))
    from tokenizers.processors import TemplateProcessing

    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    return model, fast


def seq2seq_folder(folder: Path) -> tuple[Any, Any]:
    """A 2+2-layer T5 (an encoder-decoder, as a text2text model is) with the BPE tokenizer and chat template."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = _bpe_tokenizer()
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
        initializer_factor=20.0,  # at T5's own scale a random model answers <pad> to everything
    )  # fmt: skip
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def lora_adapter_folder(base: Any, folder: Path, seed: int, targets: list[str], rank: int = 4) -> Any:
    """A PEFT LoRA adapter for `base` (random, not zero, so it changes answers) saved in `folder`; returns
    `base`'s adapter merged into a private copy with PEFT: the reference answers come from it."""
    import copy

    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():  # large enough to change greedy picks of a tiny random model
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
    peft_model.save_pretrained(folder)
    merged = PeftModel.from_pretrained(copy.deepcopy(base), folder).merge_and_unload()
    return merged.eval()
