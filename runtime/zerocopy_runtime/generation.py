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
on without it. Continuous batching: requests that arrive while a causal LM's
batch runs join it between decode steps (prefilled on their own, then padded
into the running cache), up to `max_batch_size` rows.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from .lora import AdapterBank


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; temperature 0 is greedy (equal to `generate(do_sample=False)`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    #: The LoRA adapter to answer with (None: the base model).
    adapter: str | None = None


@dataclass
class Token:
    """One generated token as it is streamed; `finish_reason` is set on the last one."""

    token_id: int | None
    finish_reason: str | None = None


class TokenGenerator(Protocol):
    """What the text routes need from an engine: token ids in, token ids out as they are made."""

    #: Prompt and answer together fit in this many tokens (None: the engine does not say).
    context: int | None

    def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Token]:
        """The tokens of one completion; the last carries the finish reason ('stop', 'length', 'error: ...')."""
        ...

    def info(self) -> dict[str, Any]:
        """Counters for `/-/info`."""
        ...

    def check(self) -> None:
        """Raise when the generator can no longer serve (Serve then replaces the replica)."""
        ...

    def shutdown(self) -> None:
        """Stop what the generator started."""
        ...


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
        adapters: AdapterBank | None = None,
    ) -> None:
        self.model = model
        self.adapters = adapters
        self.eos = set(eos_token_ids)
        self.pad = pad_token_id
        self.decode = decode
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.largest_batch = 0
        self.forward_passes = 0
        self.joined = 0  # requests that joined a running batch between its decode steps
        # transformers 5.24 renamed past_key_values to cache; vLLM's releases pin an earlier 5.x.
        takes_cache = "cache" in inspect.signature(model.forward).parameters
        self._cache_keyword = "cache" if takes_cache else "past_key_values"
        self.context = context_length(model)
        self._pending: list[_Row] = []
        self._stopping = False
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

    def info(self) -> dict[str, Any]:
        return {
            "engine": "transformers",
            "largest_batch": self.largest_batch,
            "forward_passes": self.forward_passes,
            "joined_running_batch": self.joined,
        }

    def check(self) -> None:
        if not self._thread.is_alive() and not self._stopping:
            raise RuntimeError("The generation thread has stopped; restarting this replica.")

    def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._stopping:
                    self._wake.wait()
                if self._stopping:
                    return
                # Give concurrent requests the batch window to join, then take up to max_batch_size.
                self._wake.wait_for(lambda: len(self._pending) >= self.max_batch_size, self.batch_wait_timeout_s)
                rows = self._take(self.max_batch_size)
            members = list(rows)  # every row this batch ever held, the ones that join later too
            try:
                with torch.inference_mode():
                    batch = self._prefill(rows)
                    while batch is not None:
                        self._join(batch, members)
                        batch = self._after(batch, self._forward(batch.rows, batch.steps.inputs, batch.cache))
            except Exception as exc:  # a failed batch fails its requests, never the loop
                for row in members:
                    row.emit(Token(None, finish_reason=f"error: {type(exc).__name__}: {exc}"))

    def _take(self, room: int) -> list[_Row]:
        taken, self._pending = self._pending[:room], self._pending[room:]
        return taken

    def _forward(self, rows: list[_Row], inputs: dict[str, Any], cache: Any) -> Any:
        """One forward pass of `rows` (in the batch's order): each row with its own adapter, if it asked for one."""
        self.forward_passes += 1
        if self.adapters is None:
            return self.model(**inputs, **{self._cache_keyword: cache}, use_cache=True)
        with self.adapters.rows([row.params.adapter for row in rows]):
            return self.model(**inputs, **{self._cache_keyword: cache}, use_cache=True)

    def _prefill(self, rows: list[_Row]) -> _Batch | None:
        """The prompts' forward pass, which also picks each row's first token."""
        self.largest_batch = max(self.largest_batch, len(rows))
        device = self._device()
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row.prompt) :] = torch.tensor(row.prompt)
            mask[i, width - len(row.prompt) :] = 1
        steps = self._steps(ids.to(device), mask.to(device))
        return self._after(_Batch(rows, steps, None), self._forward(rows, steps.inputs, None))

    def _after(self, batch: _Batch, output: Any) -> _Batch | None:
        """Send each row its token; rows that finished leave, and the rest get their next step's inputs."""
        batch.cache = getattr(output, self._cache_keyword)
        chosen = self._choose(output.logits[:, -1, :], batch.rows)
        keep: list[int] = []
        for slot, (row, token) in enumerate(zip(batch.rows, chosen.tolist(), strict=True)):
            reason = self._finish(row, token)
            if reason != "skip":
                row.emit(Token(None if reason == "stop" and token in self.eos else token, reason))
            if reason is None:
                keep.append(slot)
        if not keep:
            return None
        if len(keep) < len(batch.rows):
            index = torch.tensor(keep, device=chosen.device)
            batch.cache.batch_select_indices(index)
            batch.steps.select(index)
            chosen = chosen[index]
            batch.rows = [batch.rows[slot] for slot in keep]
        batch.steps.advance(chosen)
        return batch

    def _join(self, batch: _Batch, members: list[_Row]) -> None:
        """Continuous batching: requests that arrived meanwhile join between decode steps, where there is room.

        Only a causal LM on a plain KV cache can take rows of another length (both sides are left-padded
        to one width); an encoder-decoder, or a model with sliding-window or static caches, waits for
        the running batch to end.
        """
        if not isinstance(batch.steps, _CausalSteps) or not _paddable(batch.cache):
            return
        with self._wake:
            new = self._take(self.max_batch_size - len(batch.rows))
        if not new:
            return
        members.extend(new)
        self.joined += len(new)
        fresh = self._prefill(new)
        if fresh is not None:
            batch.merge(fresh)
            self.largest_batch = max(self.largest_batch, len(batch.rows))

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


@dataclass
class _Batch:
    """The rows still generating, their next inputs and their KV cache."""

    rows: list[_Row]
    steps: _CausalSteps | _Seq2SeqSteps
    cache: Any

    def merge(self, other: _Batch) -> None:
        """Take in another batch of a causal LM, left-padding the shorter one's cache and mask to one width."""
        assert isinstance(self.steps, _CausalSteps)
        assert isinstance(other.steps, _CausalSteps)
        width = max(self.steps.mask.shape[1], other.steps.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            for name in ("keys", "values"):
                ours, new = getattr(mine, name), getattr(theirs, name)
                setattr(mine, name, torch.cat([_left_pad(ours, width - 1, 2), _left_pad(new, width - 1, 2)]))
        self.steps.merge(other.steps, width)
        self.rows += other.rows


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _paddable(cache: Any) -> bool:
    """Whether the cache is transformers' plain DynamicCache, whose layers are whole tensors we can pad."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer for layer in cache.layers)


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
        self._decode_inputs(chosen.unsqueeze(-1))

    def merge(self, other: _CausalSteps, width: int) -> None:
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(other.mask, width, 1)])
        self.positions = torch.cat([self.positions, other.positions])
        self._decode_inputs(torch.cat([self.inputs["input_ids"], other.inputs["input_ids"]]))

    def _decode_inputs(self, ids: torch.Tensor) -> None:
        self.inputs = {"input_ids": ids, "attention_mask": self.mask, "position_ids": self.positions}


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


def context_length(model: nn.Module | None) -> int | None:
    """The model's context (max_position_embeddings in its config), None when it does not say."""
    config = getattr(model, "config", None)
    return int(getattr(config, "max_position_embeddings", 0) or 0) or None


def decoder_start_token(model: nn.Module) -> int:
    """The token every decoder row starts from (T5: the pad token; BART: the end-of-sequence token)."""
    for settings in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        start = getattr(settings, "decoder_start_token_id", None)
        if start is not None:
            return int(start)
    raise ValueError("the encoder-decoder model has no decoder_start_token_id in its config; set one")
