"""Small models the tests build themselves (no downloads), importable by Ray workers."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Config:
    """A plain attribute a task-mode proxy must forward (like a Hugging Face config)."""

    def __init__(self, vocab: int, dim: int) -> None:
        self.vocab = vocab
        self.dim = dim


class TinyTransformer(nn.Module):
    """Tied input/output embeddings and a non-persistent buffer, like real language models."""

    def __init__(self, vocab: int = 50, dim: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.config = Config(vocab, dim)
        self.embed = nn.Embedding(vocab, dim)
        layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("positions", torch.arange(64, dtype=torch.float32) / 64, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.positions[: tokens.shape[-1], None]
        return self.lm_head(self.encoder(h))


class Sized(nn.Module):
    """A model of about `mib` MiB spread over `tensors` parameters."""

    def __init__(self, mib: float, tensors: int = 8) -> None:
        super().__init__()
        per = int(mib * 2**20 / 4 / tensors)
        self.weights = nn.ParameterList(nn.Parameter(torch.randn(per)) for _ in range(tensors))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((w[: x.numel()] * x).sum() for w in self.weights)  # type: ignore[return-value]


class Pipeline:
    """Two models behind ordinary attributes, a private one, containers, and a property."""

    def __init__(self) -> None:
        self.encoder = MLP(16, 1)
        self._decoder = nn.Linear(10, 4)
        self.extras = {"heads": [nn.Linear(4, 2)]}
        self.threshold = 0.5
        self.property_reads = 0

    @property
    def expensive(self) -> int:
        self.property_reads += 1
        raise AssertionError("properties must not be evaluated while publishing")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.extras["heads"][0](self._decoder(self.encoder(x))) > self.threshold


class Introspective(MLP):
    """An MLP whose extra methods report where and how it runs (for task-mode tests)."""

    def whoami(self) -> tuple[int, int]:
        import os

        return os.getpid(), id(self)

    def resources(self) -> dict[str, float]:
        import ray

        return ray.get_runtime_context().get_assigned_resources()


def argmax_handler(model: nn.Module, bodies: list[dict]) -> list[dict]:
    """A user handler: pre-process the JSON bodies, post-process outputs into labels."""
    batch = torch.tensor([body["features"] for body in bodies], dtype=torch.float32)
    return [{"label": int(i)} for i in model(batch).argmax(dim=-1)]


def gated_handler(model: nn.Module, bodies: list[dict]) -> list[dict]:
    """A model call the test controls: it marks each body's `started` file, then waits for its `gate` file."""
    for body in bodies:
        Path(body["started"]).touch()
        deadline = time.monotonic() + 30
        while not Path(body["gate"]).exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the test never opened {body['gate']}")
            time.sleep(0.01)
    return [{"done": True} for _ in bodies]
