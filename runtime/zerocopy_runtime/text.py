"""Text in, text out on shared weights: the engines behind the OpenAI-compatible routes of one replica.

`GenerationEngine` turns protocol requests into token ids (the tokenizer and chat
template come from the model folder), runs them through a token generator (the
runtime's batch generator, or vLLM), and answers in the protocol's types,
streamed as server-sent events when asked; `EmbeddingEngine` pools an encoder's
states. They know nothing of Serve or HTTP: the ingress (`serve`) routes to them.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import openai_protocol as api
from ._errors import CheckpointError
from .generation import BatchGenerator, SamplingParams, TokenGenerator, context_length, decoder_start_token
from .lora import AdapterBank

GENERATION_TASKS = ("text-generation", "text2text-generation")


def load_tokenizer(folder: Path) -> Any:
    """The model's own tokenizer, from its folder only; a clear start-up error when there is none."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # missing files, a bad config beside them, an unknown tokenizer class: all the same fix
        if isinstance(exc, ImportError):
            raise CheckpointError("Text tasks need transformers: pip install 'zerocopy-operator[hf]'") from None
        raise CheckpointError(
            f"Text tasks need the model's tokenizer beside its weights, and {folder} has none usable "
            f"({type(exc).__name__}: {exc}). Save it there with tokenizer.save_pretrained() (tokenizer.json and "
            "tokenizer_config.json), or serve the model with task: tensor."
        ) from None
    return tokenizer


class TextEngine:
    """What every text engine shares: the model's tokenizer, its name on `/v1/models`, and 404s for the routes
    of the other tasks. Subclasses serve their task's routes."""

    task: str

    def __init__(self, task: str, folder: Path, name: str) -> None:
        self.task, self.name = task, name
        self.created = int(time.time())
        self.tokenizer = load_tokenizer(folder)

    def use(self, model: nn.Module) -> None:
        """Serve from a re-attached copy of the weights from now on."""

    def check(self) -> None:
        """Raise when the engine can no longer serve (Serve then replaces the replica)."""

    def shutdown(self) -> None:
        """Stop what the engine started (processes, threads)."""

    def info(self) -> dict[str, Any]:
        return {"task": self.task}

    # --- the routes -------------------------------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        return api.models_response(self.name, self.created).model_dump()

    async def chat(self, body: Any) -> dict[str, Any] | AsyncIterator[str]:
        raise self._not_served("/v1/chat/completions")

    async def completions(self, body: Any) -> dict[str, Any] | AsyncIterator[str]:
        raise self._not_served("/v1/completions")

    async def embeddings(self, body: Any) -> dict[str, Any]:
        raise self._not_served("/v1/embeddings")

    def _not_served(self, route: str) -> api.ApiError:
        return api.ApiError(404, f"{route} is not served by {self.name}, whose task is {self.task}", code="not_found")


class GenerationEngine(TextEngine):
    """Chat and completions from a causal LM (`text-generation`) or an encoder-decoder (`text2text-generation`).

    The tokens come from a `TokenGenerator`: the runtime's own batch generator on
    the attached model, or another engine (vLLM) passed in with no model here at all.
    """

    def __init__(
        self,
        task: str,
        model: nn.Module | None,
        folder: Path,
        name: str,
        batch: tuple[int, float],
        generator: TokenGenerator | None = None,
        adapters: AdapterBank | None = None,
    ) -> None:
        super().__init__(task, folder, name)
        self.adapters = adapters
        self.context = generator.context if generator is not None else context_length(model)
        self.seq2seq = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
        if generator is None:
            assert model is not None
            _check_kind(task, model, self.seq2seq)
            eos = _eos_ids(folder, self.tokenizer)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos or [0])[0]
            generator = BatchGenerator(
                model, eos, pad, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), *batch, adapters
            )
        self.generator: TokenGenerator = generator

    def use(self, model: nn.Module) -> None:
        if isinstance(self.generator, BatchGenerator):
            self.generator.model = model
        if self.adapters is not None:
            self.adapters.use(model)

    def models(self) -> dict[str, Any]:
        """The base model, then each adapter as `<model>:<adapter>`."""
        names = [self.name, *self._adapter_names()]
        return api.ModelList(data=[api.ModelCard(id=n, created=self.created) for n in names]).model_dump()

    def _adapter_names(self) -> list[str]:
        return [f"{self.name}:{a}" for a in sorted(self.adapters.adapters)] if self.adapters is not None else []

    def _adapter(self, model: str | None) -> str | None:
        """The adapter a request's `model` names (`<model>:<adapter>`); None for the base model."""
        if model is None or ":" not in model:
            return None
        base, _, adapter = model.partition(":")
        if base != self.name or self.adapters is None or adapter not in self.adapters.adapters:
            served = ", ".join([self.name, *self._adapter_names()])
            message = f"The model {model!r} does not exist here; this model serves {served}"
            raise api.ApiError(404, message, param="model", code="model_not_found")
        return adapter

    def _served(self, params: SamplingParams) -> str:
        """The model name answers carry: the one the request asked for."""
        return f"{self.name}:{params.adapter}" if params.adapter else self.name

    def check(self) -> None:
        self.generator.check()

    def shutdown(self) -> None:
        self.generator.shutdown()

    def info(self) -> dict[str, Any]:
        adapters = {"adapters": self._adapter_names()} if self.adapters is not None else {}
        return {"task": self.task, "context_length": self.context, **self.generator.info(), **adapters}

    async def chat(self, body: Any) -> dict[str, Any] | AsyncIterator[str]:
        request = api.parse(api.ChatCompletionRequest, body)
        if not getattr(self.tokenizer, "chat_template", None):
            raise api.ApiError(400, f"{self.name} has no chat template (chat_template.jinja or tokenizer_config.json)")
        messages = [m.model_dump() for m in request.messages]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        prompt = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        params = self._params(request, len(prompt), request.limit(self._room(len(prompt))))
        ident = api.completion_id("chatcmpl")
        if request.stream:
            if request.n != 1:
                raise api.ApiError(400, "stream: true takes n: 1", param="n")
            return self._stream_chat(ident, prompt, params)
        results = [await self._complete(prompt, params, i) for i in range(request.n)]
        used = api.usage(len(prompt), sum(n for _, _, n in results))
        return api.chat_response(ident, self._served(params), [(t, r) for t, r, _ in results], used).model_dump()

    async def completions(self, body: Any) -> dict[str, Any] | AsyncIterator[str]:
        request = api.parse(api.CompletionRequest, body)
        prompts = [self.tokenizer(p, add_special_tokens=True)["input_ids"] for p in request.prompts()]
        ident = api.completion_id("cmpl")
        params_each = [self._params(request, len(p), request.max_tokens or 16) for p in prompts]
        if request.stream:
            if len(prompts) != 1 or request.n != 1:
                raise api.ApiError(400, "stream: true takes one prompt and n: 1", param="stream")
            return self._stream_completion(ident, prompts[0], params_each[0])
        choices, generated = [], 0
        for prompt, params in zip(prompts, params_each, strict=True):
            for i in range(request.n):
                text, reason, count = await self._complete(prompt, params, i)
                choices.append((text, reason))
                generated += count
        used = api.usage(sum(map(len, prompts)), generated)
        return api.completion_response(ident, self._served(params_each[0]), choices, used).model_dump()

    # --- generation ---------------------------------------------------------------------------------------------

    def _room(self, prompt_tokens: int) -> int:
        if self.seq2seq:  # the answer has the decoder's positions to itself
            return self.context or 256
        return max(1, (self.context or prompt_tokens + 256) - prompt_tokens)

    def _params(self, request: Any, prompt_tokens: int, max_tokens: int) -> SamplingParams:
        if self.context is not None and self._too_long(prompt_tokens, max_tokens):
            where = "the encoder and the decoder each take" if self.seq2seq else "prompt and answer together take"
            raise api.ApiError(
                400,
                f"This model's maximum context length is {self.context} tokens ({where} at most that); the prompt "
                f"has {prompt_tokens} and max_tokens asks for {max_tokens}. Shorten the prompt or lower max_tokens.",
                param="messages" if hasattr(request, "messages") else "prompt",
                code="context_length_exceeded",
            )
        adapter = self._adapter(request.model)
        return SamplingParams(max_tokens, request.temperature, request.top_p, request.stops(), request.seed, adapter)

    def _too_long(self, prompt_tokens: int, max_tokens: int) -> bool:
        assert self.context is not None
        if self.seq2seq:
            return prompt_tokens > self.context or max_tokens > self.context
        return prompt_tokens + max_tokens > self.context

    async def _complete(self, prompt: list[int], params: SamplingParams, index: int) -> tuple[str, str, int]:
        assert self.generator is not None
        tokens: list[int] = []
        reason = "length"
        seeded = params if params.seed is None else SamplingParams(**{**params.__dict__, "seed": params.seed + index})
        async for token in self.generator.generate(prompt, seeded):
            if token.token_id is not None:
                tokens.append(token.token_id)
            if token.finish_reason is not None:
                reason = token.finish_reason
        if reason.startswith("error"):
            raise api.ApiError(500, f"generation failed: {reason}", kind="server_error")
        return _cut(self._text(tokens), params.stop), reason, len(tokens)

    def _text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=True))

    async def _deltas(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[tuple[str, str | None]]:
        """Text as it grows (only the part that cannot change any more), then the finish reason."""
        assert self.generator is not None
        tokens: list[int] = []
        sent = ""
        async for token in self.generator.generate(prompt, params):
            if token.token_id is not None:
                tokens.append(token.token_id)
            text = _cut(self._text(tokens), params.stop)
            reason = token.finish_reason
            if reason is not None and reason.startswith("error"):
                raise api.ApiError(500, f"generation failed: {reason}", kind="server_error")
            # Hold back an incomplete character (a multi-byte token split) until the next token completes it.
            ready = text if reason is not None else text.rstrip("\ufffd")
            if len(ready) > len(sent) or reason is not None:
                yield ready[len(sent) :], reason
                sent = ready

    async def _stream_chat(self, ident: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[str]:
        yield _event(api.chat_chunk(ident, self._served(params), 0, api.ChatDelta(role="assistant", content=""), None))
        async for text, reason in self._deltas(prompt, params):
            yield _event(api.chat_chunk(ident, self._served(params), 0, api.ChatDelta(content=text or None), reason))
        yield "data: [DONE]\n\n"

    async def _stream_completion(self, ident: str, prompt: list[int], params: SamplingParams) -> AsyncIterator[str]:
        async for text, reason in self._deltas(prompt, params):
            yield _event(api.completion_chunk(ident, self._served(params), 0, text, reason))
        yield "data: [DONE]\n\n"


class EmbeddingEngine(TextEngine):
    """`/v1/embeddings` from an encoder, pooled as its sentence-transformers files say."""

    def __init__(self, model: nn.Module, folder: Path, name: str) -> None:
        super().__init__("embeddings", folder, name)
        self.model = model
        self.context = context_length(model)
        self.pooling, self.normalize = _pooling(folder)

    def use(self, model: nn.Module) -> None:
        self.model = model

    def info(self) -> dict[str, Any]:
        return {"task": self.task, "context_length": self.context}

    async def embeddings(self, body: Any) -> dict[str, Any]:
        request = api.parse(api.EmbeddingRequest, body)
        if request.dimensions is not None:
            raise api.ApiError(400, "dimensions is not supported: the model's embedding size is fixed", "dimensions")
        # The forward pass runs off the event loop: health checks and other requests are answered meanwhile.
        return await asyncio.to_thread(self._embed, request)

    def _embed(self, request: api.EmbeddingRequest) -> dict[str, Any]:
        assert self.model is not None
        encoded = self.tokenizer(request.texts(), padding=True, truncation=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        with torch.inference_mode():
            hidden = self.model(**{k: v.to(device) for k, v in encoded.items()}).last_hidden_state
            vectors = pool(hidden, encoded["attention_mask"].to(device), self.pooling)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
        tokens = int(encoded["attention_mask"].sum())
        rows = vectors.float().cpu()
        if request.encoding_format == "base64":
            encoded_rows: list[Any] = [base64.b64encode(row.numpy().astype("<f4").tobytes()).decode() for row in rows]
            return api.embeddings_response(self.name, encoded_rows, tokens).model_dump()
        return api.embeddings_response(self.name, rows.tolist(), tokens).model_dump()


def _check_kind(task: str, model: nn.Module, seq2seq: bool) -> None:
    """The task must fit the model's kind: a start-up error, not nonsense at the first request."""
    kind = type(model).__name__
    if task == "text-generation" and seq2seq:
        raise CheckpointError(f"{kind} is an encoder-decoder model: serve it with task: text2text-generation")
    if task == "text2text-generation":
        if not seq2seq:
            raise CheckpointError(f"{kind} is not an encoder-decoder model: serve it with task: text-generation")
        try:
            decoder_start_token(model)
        except ValueError as exc:
            raise CheckpointError(f"{kind}: {exc}") from None


def _event(body: api.ChatCompletionChunk | api.Completion) -> str:
    return f"data: {body.model_dump_json()}\n\n"


def _cut(text: str, stops: tuple[str, ...]) -> str:
    """The text up to the first stop string (which OpenAI leaves out of the answer)."""
    cut = min((text.find(s) for s in stops if s in text), default=-1)
    return text if cut < 0 else text[:cut]


def _eos_ids(folder: Path, tokenizer: Any) -> list[int]:
    """End-of-sequence ids: generation_config.json's (often several for chat models), else the tokenizer's."""
    path = folder / "generation_config.json"
    ids: Any = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        raise CheckpointError(f"{folder}: no eos_token_id in generation_config.json or the tokenizer; set one")
    return [int(i) for i in (ids if isinstance(ids, list) else [ids])]


def _pooling(folder: Path) -> tuple[str, bool]:
    """The sentence-transformers pooling beside the weights (default mean) and whether it normalizes."""
    config = folder / "1_Pooling" / "config.json"
    mode = "mean"
    if config.is_file():
        settings = json.loads(config.read_text())
        keys = {"cls": "pooling_mode_cls_token", "max": "pooling_mode_max_tokens", "mean": "pooling_mode_mean_tokens"}
        mode = next((m for m, key in keys.items() if settings.get(key)), "mean")
    modules = folder / "modules.json"
    normalize = modules.is_file() and "Normalize" in modules.read_text()
    return mode, normalize


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per sequence from its tokens' states, padding excluded."""
    if mode == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
