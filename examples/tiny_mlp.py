"""A small MLP a newcomer can serve with no download.

`python examples/tiny_mlp.py` writes its checkpoint to examples/.cache/ (once);
`zerocopy serve examples/tiny-mlp.yaml` then serves it. The replicas import
`build` from this file: files next to the resource are on their path.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

CHECKPOINT = Path(__file__).resolve().parent / ".cache" / "tiny-mlp.safetensors"


def build(width: int = 256, depth: int = 4, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def main() -> None:
    if CHECKPOINT.exists():
        print(f"checkpoint already at {CHECKPOINT}")
        return
    from safetensors.torch import save_file

    torch.manual_seed(0)
    CHECKPOINT.parent.mkdir(parents=True, exist_ok=True)
    save_file(build().state_dict(), CHECKPOINT)
    print(f"wrote {CHECKPOINT} ({CHECKPOINT.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
