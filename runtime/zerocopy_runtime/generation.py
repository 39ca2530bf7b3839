"""Batched text generation on a causal LM or an encoder-decoder: concurrent requests share every forward pass.

Requests that arrive within the batch window form one batch. A causal LM
reads left-padded prompts with an attention mask and matching position ids;
an encoder-decoder encodes the (padded) prompts once and starts every
decoder row from the decoder start token together, so its decoder needs no
padding at all. The KV cache holds the past, and each decode step runs one
forward pass for every row still generating. Only the next-token ids (one
integer per row) cross to the host each step, never whole logits. A row that
finishes (end of sequence, a stop string, `max_tokens`, or a client that
went away) leaves the batch and its cache rows are dropped, so the others go
on without it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy (equal to `generate(do_sample=False)`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Token:
    """One generated token as it is streamed; `finish_reason` is set on the last one."""

    token_id: int | None
    finish_reason: str | None = None


@dataclass
class _Row:
    prompt: list[int]
    params: SamplingParams
    out: asyncio.Queue[Token]
    loop: asyncio.AbstractEventLoop
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    cancelled: bool = False

    def emit(self, token: Token) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, token)


class BatchGenerator:
    """Runs the model's decode loop for batches of requests, in one background thread per replica."""

    def __init__(
        self,
        model: nn.Module,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        decode: Callable[[list[int]], str],
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
    ) -> None:
        self.model = model
        self.eos = set(eos_token_ids)
        self.pad = pad_token_id
        self.decode = decode
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.largest_batch = 0
        self.forward_passes = 0
        self._pending: list[_Row] = []
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="zerocopy-generation", daemon=True)
        self._thread.start()

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        """The tokens of one completion as they are made; leaving the loop early stops this row."""
        loop = asyncio.get_running_loop()
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=self._device()).manual_seed(params.seed)
        row = _Row(list(prompt), params, asyncio.Queue(), loop, generator)
        with self._wake:
            self._pending.append(row)
            self._wake.notify()
        try:
            while True:
                token = await row.out.get()
                yield token
                if token.finish_reason is not None:
                    return
        finally:
            row.cancelled = True  # a disconnected client: its row leaves the batch at the next step

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending:
                    self._wake.wait()
                # Give concurrent requests the batch window to join, then take up to max_batch_size.
                self._wake.wait_for(lambda: len(self._pending) >= self.max_batch_size, self.batch_wait_timeout_s)
                batch, self._pending = self._pending[: self.max_batch_size], self._pending[self.max_batch_size :]
            try:
                with torch.inference_mode():
                    self._generate(batch)
            except Exception as exc:  # a failed batch fails its requests, never the loop
                for row in batch:
                    row.emit(Token(None, finish_reason=f"error: {type(exc).__name__}: {exc}"))

    def _generate(self, rows: list[_Row]) -> None:
        self.largest_batch = max(self.largest_batch, len(rows))
        device = self._device()
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        steps = self._steps(ids.to(device), mask.to(device))
        cache: Any = None
        live = list(range(len(rows)))
        while live:
            output = self.model(**steps.inputs, cache=cache, use_cache=True)
            self.forward_passes += 1
            cache = output.cache
            chosen = self._choose(output.logits[:, -1, :], [rows[i] for i in live])
            keep: list[int] = []
            for slot, (i, token) in enumerate(zip(live, chosen.tolist(), strict=True)):
                row = rows[i]
                reason = self._finish(row, token)
                if reason != "skip":
                    row.emit(Token(None if reason == "stop" and token in self.eos else token, reason))
                if reason is None:
                    keep.append(slot)
            if not keep:
                return
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                cache.batch_select_indices(index)
                steps.select(index)
                chosen = chosen[index]
                live = [live[slot] for slot in keep]
            steps.advance(chosen)

    def _steps(self, ids: torch.Tensor, mask: torch.Tensor) -> _CausalSteps | _Seq2SeqSteps:
        config = getattr(self.model, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return _Seq2SeqSteps(self.model, ids, mask, decoder_start_token(self.model))
        return _CausalSteps(ids, mask, "logits_to_keep" in inspect.signature(self.model.forward).parameters)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """The next token of each row: argmax for greedy rows, top-p sampling for the others."""
        chosen = logits.argmax(dim=-1)
        for slot, row in enumerate(rows):
            if row.params.temperature > 0:
                chosen[slot] = _sample(logits[slot], row.params, row.generator)
        return chosen

    def _finish(self, row: _Row, token: int) -> str | None:
        """Why this row stops after `token` (None: it goes on; 'skip': nothing more to send)."""
        if row.cancelled:
            return "skip"
        if token in self.eos:
            return "stop"
        row.generated.append(token)
        if row.params.stop and any(s in self.decode(row.generated) for s in row.params.stop):
            return "stop"
        if len(row.generated) >= row.params.max_tokens:
            return "length"
        return None


def _sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > params.top_p  # keep the smallest set reaching top_p
        ordered[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, ordered)
    return torch.multinomial(probs, 1, generator=generator)[0]


class _CausalSteps:
    """A decoder-only model's inputs: positions count real tokens only, and every step adds a mask column."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, last_logits_only: bool) -> None:
        self.mask = mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)
        self.inputs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": self.positions}
        if last_logits_only:  # the prompt's other logits would be computed only to be thrown away
            self.inputs["logits_to_keep"] = 1

    def select(self, index: torch.Tensor) -> None:
        self.mask, self.positions = self.mask[index], self.positions[index]

    def advance(self, chosen: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(chosen), 1))], dim=-1)
        self.positions = self.positions[:, -1:] + 1
        self.inputs = {"input_ids": chosen.unsqueeze(-1), "attention_mask": self.mask, "position_ids": self.positions}


class _Seq2SeqSteps:
    """An encoder-decoder's inputs: the encoder's states once, then one decoder token per row and step."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        self.mask = mask
        encoder: Any = model.get_encoder()  # type: ignore[operator]
        self.encoded = encoder(input_ids=ids, attention_mask=mask)
        self.inputs: dict[str, Any] = {}
        self.advance(ids.new_full((len(ids),), start))

    def select(self, index: torch.Tensor) -> None:
        self.mask = self.mask[index]
        self.encoded = type(self.encoded)(last_hidden_state=self.encoded.last_hidden_state[index])

    def advance(self, chosen: torch.Tensor) -> None:
        self.inputs = {
            "encoder_outputs": self.encoded,
            "attention_mask": self.mask,
            "decoder_input_ids": chosen.unsqueeze(-1),
        }


def decoder_start_token(model: nn.Module) -> int:
    """The token every decoder row starts from (T5: the pad token; BART: the end-of-sequence token)."""
    for settings in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        start = getattr(settings, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ValueError("the encoder-decoder model has no decoder_start_token_id in its config; set one")
