"""The OpenAI-compatible wire format: request bodies (closed pydantic models), response and SSE chunk bodies, and
the error body `{"error": {"message", "type", "param", "code"}}`.

Request bodies are closed (`extra="forbid"`): an unknown field is a 400 naming it, never silently ignored. Fields
OpenAI clients commonly send that would change generation (penalties, logit_bias, logprobs, n > 1, ...) are
declared and accepted only at their neutral value; anything else is a 400 naming the field. Purely informational
fields (user, metadata, store, service_tier) are accepted and ignored.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from outrider.scheduler.engine import SpecStats
from outrider.scheduler.sampling import SamplingParams

# Field -> values that change nothing here. None (omitted) is always neutral.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",),
    "frequency_penalty": (0,), "presence_penalty": (0,), "repetition_penalty": (1,), "min_p": (0,),
    "min_tokens": (0,), "logit_bias": ({},), "top_logprobs": (0,), "skip_special_tokens": (True,),
    "include_stop_str_in_output": (False,), "tools": ([],), "tool_choice": ("none",),
    "response_format": ({"type": "text"},),
}
# `logprobs` is an int on /v1/completions and a bool on /v1/chat/completions; only "off" is supported.
LOGPROBS_OFF = (None, False)


class APIError(Exception):
    """An error that becomes an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # usage comes once, in a last chunk with no choices


class _Sampling(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # None: the served model
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # None: 1.0 as OpenAI (0 = greedy)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # vLLM extension: -1 or 0 = off
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    return_token_ids: bool = False  # vLLM extension: token ids in the response and in every streamed text chunk
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted only at their neutral value (NEUTRAL)
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    logit_bias: dict[str, float] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # informational: ignored
    user: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None

    @field_validator(*NEUTRAL, check_fields=False)
    @classmethod
    def _neutral(cls, v: Any, info: ValidationInfo) -> Any:
        allowed = NEUTRAL[info.field_name]
        if v is not None and v not in allowed:
            raise ValueError(f"{v!r} is not supported by this server; omit {info.field_name} or set it to "
                             f"{allowed[0]!r}")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is not None and any(s == "" for s in ([v] if isinstance(v, str) else v)):
            raise ValueError("must not contain an empty string")
        return v

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true")
        return self

    def sampling_params(self) -> SamplingParams:
        """OpenAI's defaults (temperature 1, top_p 1); temperature 0 is the greedy (lossless, seedless) path."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        return SamplingParams(temperature, max(self.top_k or 0, 0), top_p, self.seed)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    prompt: str | list[int]  # text, or token ids
    max_tokens: int | None = Field(None, ge=1)  # None: 16, OpenAI's default
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None

    def requested_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        # One clear message instead of one error per branch of the union.
        is_ids = isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        if not (isinstance(v, str) or is_ids):
            raise ValueError("must be a string or a list of token ids (integers), one prompt per request")
        return v

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: int | None) -> int | None:
        if v is not None:
            raise ValueError("logprobs are not supported by this server; omit it")
        return v


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    parallel_tool_calls: bool | None = None  # meaningless without tools
    response_format: dict[str, Any] | None = None

    @field_validator("logprobs")
    @classmethod
    def _logprobs(cls, v: bool | None) -> bool | None:
        if v not in LOGPROBS_OFF:
            raise ValueError("logprobs are not supported by this server; omit it or set it to false")
        return v

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one finished request reports: its text, why it ended, token counts and speculative stats."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: SpecStats
    ttft_s: float | None
    token_ids: list[int] | None = None  # return_token_ids: the completion's ids (len == completion_tokens)
    prompt_token_ids: list[int] | None = None

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def spec_stats(self) -> dict[str, Any]:
        """The `outrider` extension field: this request's speculative decoding counters."""
        s = self.stats
        return {"rounds": s.rounds, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
                "mean_acceptance_length": round(s.mean_acceptance_length, 4),
                "accepted_per_position": list(s.accepted_per_position),
                "drafted_per_position": list(s.drafted_per_position),
                "drafts_per_position": s.drafts_per_position,
                "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6)}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class Envelope:
    """The fields every response and chunk of one request share."""

    id: str
    model: str
    chat: bool
    created: int = 0

    @classmethod
    def new(cls, model: str, chat: bool) -> "Envelope":
        return cls(new_id("chatcmpl" if chat else "cmpl"), model, chat, int(time.time()))

    def _head(self, object: str) -> dict[str, Any]:
        return {"id": self.id, "object": object, "created": self.created, "model": self.model}

    def response(self, out: Outcome) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                      "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        obj = "chat.completion" if self.chat else "text_completion"
        body = self._head(obj) | {"choices": [choice], "usage": out.usage(), "outrider": out.spec_stats()}
        if out.token_ids is not None:  # return_token_ids
            choice["token_ids"] = out.token_ids
            body["prompt_token_ids"] = out.prompt_token_ids
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              token_ids: list[int] | None = None) -> dict[str, Any]:
        """One SSE chunk with one choice: a text delta, the role announcement (chat) or the finish. `token_ids`
        (return_token_ids) are the ids received since the previous chunk, so the chunks' lists concatenate to
        the non-streamed response's `token_ids`."""
        if self.chat:
            delta: dict[str, str] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def final_chunk(self, out: Outcome, token_ids: list[int] | None = None) -> dict[str, Any]:
        return self.chunk(None, out.finish_reason, token_ids=token_ids) | {"outrider": out.spec_stats()}

    def usage_chunk(self, out: Outcome) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": out.usage(), "outrider": out.spec_stats()}
