"""The OpenAI-compatible protocol: request and response types and errors, shared by every engine.

Only what the routes serve is declared; unknown request fields are refused
(400) rather than silently ignored, so a client never believes a setting
took effect when it did not.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer, model_validator

#: Why a choice ended: an end-of-sequence token or a stop string, or max_tokens.
FinishReason = Literal["stop", "length"]

#: Fields OpenAI clients send by default that change nothing here.
_IGNORED = {"user", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "stream_options"}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if isinstance(data, dict):
            neutral = {k for k in _IGNORED & data.keys() if data[k] in (None, False, 0, 0.0)}
            return {k: v for k, v in data.items() if k not in neutral}
        return data


class _Sampling(_Request):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def limit(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class EmbeddingRequest(_Request):
    model: str | None = None
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32, as OpenAI's client asks
    dimensions: int | None = None

    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class ApiError(Exception):
    """An error answered in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def parse(model: type[_Request], body: Any) -> Any:
    """The typed request, or a 400 naming the field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where) from None


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class _Response(BaseModel):
    """Responses are validated like requests: a field an engine fills wrongly fails here, not in a client."""

    model_config = ConfigDict(extra="forbid")


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    finish_reason: FinishReason | None

    @field_serializer("delta")
    def _only_what_changed(self, delta: ChatDelta) -> dict[str, Any]:
        return delta.model_dump(exclude_none=True)  # OpenAI's deltas name only the fields they carry


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]


class CompletionChoice(_Response):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    #: Floats, or base64 of little-endian float32 bytes (encoding_format base64).
    embedding: list[float] | str


class EmbeddingList(_Response):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "zerocopy"


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def chat_response(ident: str, model: str, choices: list[tuple[str, str]], use: Usage) -> ChatCompletion:
    return ChatCompletion(
        id=ident,
        model=model,
        choices=[
            ChatChoice(index=i, message=AssistantMessage(content=text), finish_reason=reason)  # type: ignore[arg-type]
            for i, (text, reason) in enumerate(choices)
        ],
        usage=use,
    )


def chat_chunk(ident: str, model: str, index: int, delta: ChatDelta, reason: str | None) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=delta, finish_reason=reason)  # type: ignore[arg-type]
    return ChatCompletionChunk(id=ident, model=model, choices=[choice])


def completion_response(ident: str, model: str, choices: list[tuple[str, str]], use: Usage) -> Completion:
    return Completion(
        id=ident,
        model=model,
        choices=[
            CompletionChoice(index=i, text=text, finish_reason=reason)  # type: ignore[arg-type]
            for i, (text, reason) in enumerate(choices)
        ],
        usage=use,
    )


def completion_chunk(ident: str, model: str, index: int, text: str, reason: str | None) -> Completion:
    choice = CompletionChoice(index=index, text=text, finish_reason=reason)  # type: ignore[arg-type]
    return Completion(id=ident, model=model, choices=[choice])


def embeddings_response(model: str, vectors: list[Any], prompt_tokens: int) -> EmbeddingList:
    """`vectors` are lists of floats, or base64 strings of float32 bytes for encoding_format base64."""
    return EmbeddingList(
        data=[Embedding(index=i, embedding=v) for i, v in enumerate(vectors)],
        model=model,
        usage=Usage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens),
    )


def models_response(model: str, created: int) -> ModelList:
    return ModelList(data=[ModelCard(id=model, created=created)])
