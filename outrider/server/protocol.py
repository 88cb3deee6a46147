"""The OpenAI-compatible wire format: request bodies (closed pydantic models), response and SSE chunk bodies, and
the error body `{"error": {"message", "type", "param", "code"}}`.

Request bodies are closed (`extra="forbid"`): an unknown field is a 400 naming it, never silently ignored. Fields
OpenAI clients commonly send that this server does not implement yet (best_of, tools, response_format, ...) are
declared and accepted only at their neutral value; anything else is a 400 naming the field. Purely informational
fields (user, metadata, store, service_tier) are accepted and ignored.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from outrider.scheduler.engine import MAX_LOGPROBS, SpecStats
from outrider.scheduler.sampling import SamplingParams, TokenLogprob
from outrider.server.tools import NamedToolChoice, Tool, ToolCall, check_choice

# Field -> values that change nothing here. None (omitted) is always neutral.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1,), "suffix": ("",), "min_tokens": (0,), "skip_special_tokens": (True,),
    "include_stop_str_in_output": (False,),
}
MAX_N = 16  # choices per request: each is its own sequence in the batch


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


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # the output always follows the schema here, strict or not


class ResponseFormat(BaseModel):
    """OpenAI's structured output: plain text, any JSON object, or JSON valid for a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and allowed only with it")
        return self

    @property
    def structured(self) -> bool:
        return self.type != "text"

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON schema to follow (None: any JSON object)."""
        return self.json_schema.schema_ if self.json_schema is not None else None


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
    n: int = Field(1, ge=1, le=MAX_N)  # independent choices; with a seed, choice i samples with seed + i
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, le=2, allow_inf_nan=False)  # vLLM extension
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False)  # vLLM extension
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None  # on completions too, as vLLM accepts it
    # accepted only at their neutral value (NEUTRAL)
    min_tokens: int | None = None
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids (decimal integers), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias of token {key} must be in [-100, 100], got {bias}")
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

    def sampling_params(self, choice: int = 0) -> SamplingParams:
        """OpenAI's defaults (temperature 1, top_p 1); temperature 0 is the greedy (lossless, seedless) path.
        Choice i of n draws with seed + i (wrapping at 2**64), so the choices differ and each repeats."""
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        seed = None if self.seed is None else (self.seed + choice) % 2**64
        bias = tuple(sorted((int(k), float(b)) for k, b in (self.logit_bias or {}).items()))
        return SamplingParams(temperature, max(self.top_k or 0, 0), top_p, seed, self.min_p, self.frequency_penalty,
                              self.presence_penalty, self.repetition_penalty, bias)

    def logprobs_wanted(self) -> int | None:
        """Alternatives per generated token the response reports (None: no logprobs)."""
        return None

    def prompt_logprobs_wanted(self) -> int | None:
        return None

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


MAX_PROMPTS = 16  # prompts in one /v1/completions request (a batch, as lm-eval's local-completions sends)


def _is_ids(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]  # a prompt (text or token ids), or a batch of them
    max_tokens: int | None = Field(None, ge=1)  # None: 16, OpenAI's default
    echo: bool = False  # the prompt before the completion, in the text and (with logprobs) the logprobs
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token (0: the chosen token's only)

    def requested_max_tokens(self) -> int:
        return 16 if self.max_tokens is None else self.max_tokens

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:
        # One clear message instead of one error per branch of the union.
        if isinstance(v, str) or (_is_ids(v) and v):
            return v
        batch = isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(_is_ids(p) for p in v))
        if not batch:
            raise ValueError("must be a string, a list of token ids (integers), or a non-empty list of either")
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(v)}")
        return v

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: text or token ids."""
        if isinstance(self.prompt, str) or _is_ids(self.prompt):
            return [self.prompt]
        return list(self.prompt)

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_logprobs_wanted(self) -> int | None:
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None only for an assistant turn that made tool calls
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, sent back by the client
    tool_call_id: str | None = None  # a tool turn: the call it answers
    # what the openai client's `message.model_dump()` also holds when an agent sends a reply back as it came:
    # accepted and ignored when empty
    refusal: str | None = None
    annotations: list[Any] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.function_call is not None or self.audio is not None:
            raise ValueError("function_call and audio are not supported; send calls as tool_calls")
        return self

    def as_template_input(self) -> dict[str, Any]:
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.tool_calls:
            message["tool_calls"] = [c.as_template_input() for c in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)  # alternatives per token; needs logprobs: true
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool | None = None  # accepted; the model may make several calls either way

    @model_validator(mode="after")
    def _top_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @model_validator(mode="after")
    def _tools(self):
        check_choice(self.tools, self.tool_choice)
        forced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        if forced and self.response_format is not None and self.response_format.structured:
            raise ValueError("response_format and a required tool call both constrain the output; give one")
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the response may hold tool calls (tools offered, and not tool_choice "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# -- responses ---------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one finished choice reports: its text, why it ended, token counts and speculative stats."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stats: SpecStats
    ttft_s: float | None
    token_ids: list[int] | None = None  # return_token_ids: the completion's ids (len == completion_tokens)
    prompt_token_ids: list[int] | None = None
    index: int = 0  # the choice's place in `choices`
    logprobs: dict[str, Any] | None = None  # rendered (`Logprobs`), None when not asked for
    tool_calls: list[dict[str, Any]] | None = None  # chat: the calls cut out of `text` (OpenAI's shape)

    def spec_stats(self) -> dict[str, Any]:
        """The `outrider` extension field: this request's speculative decoding counters."""
        s = self.stats
        return {"rounds": s.rounds, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
                "mean_acceptance_length": round(s.mean_acceptance_length, 4),
                "accepted_per_position": list(s.accepted_per_position),
                "drafted_per_position": list(s.drafted_per_position),
                "drafts_per_position": s.drafts_per_position, "cached_prompt_tokens": s.cached_prompt_tokens,
                "ttft_s": None if self.ttft_s is None else round(self.ttft_s, 6)}


def usage(outs: list[Outcome], prompts: int) -> dict[str, Any]:
    """Token counts of a request: each prompt once (its n choices share it; its first choice's cache hits count),
    every choice's completion. `cached_tokens`: prompt tokens whose K/V came from the prefix cache, as OpenAI's."""
    firsts = outs[::max(len(outs) // max(prompts, 1), 1)]
    prompt = sum(o.prompt_tokens for o in firsts)
    completion = sum(o.completion_tokens for o in outs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.stats.cached_prompt_tokens for o in firsts)}}


class Logprobs:
    """OpenAI's two logprobs shapes from `TokenLogprob`s; `text` turns one token id into its text.

    /v1/completions: {tokens, token_logprobs, top_logprobs (a dict per token: its alternatives and the chosen
    token), text_offset}; a prompt's first token has null logprob and alternatives. /v1/chat/completions:
    {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""

    def __init__(self, text: Callable[[int], str]) -> None:
        self.text = text

    def completion(self, entries: list[TokenLogprob | None], ids: list[int], offset: int = 0) -> dict[str, Any]:
        """`entries[i]` scores `ids[i]`; `offset`: characters of text before the first token."""
        tokens, values, tops, offsets = [], [], [], []
        for token, entry in zip(ids, entries):
            text = self.text(token)
            tokens.append(text)
            offsets.append(offset)
            offset += len(text)
            values.append(None if entry is None else entry.logprob)
            if entry is None:
                tops.append(None)
                continue
            top = {self.text(t): v for t, v in entry.top}
            top.setdefault(text, entry.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        return {"content": [self._chat_entry(e.token, e.logprob)
                            | {"top_logprobs": [self._chat_entry(t, v) for t, v in e.top]} for e in entries]}

    def _chat_entry(self, token: int, logprob: float) -> dict[str, Any]:
        text = self.text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


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

    def response(self, outs: list[Outcome], prompts: int = 1) -> dict[str, Any]:
        """The whole response: one choice per outcome. The `outrider` stats are the first choice's, and with
        several choices they list every choice's under `choices`."""
        choices = []
        for out in outs:
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": out.text}
                if out.tool_calls:
                    message = {"role": "assistant", "content": out.text or None, "tool_calls": out.tool_calls}
                choice = {"index": out.index, "message": message}
            else:
                choice = {"index": out.index, "text": out.text}
            choice |= {"logprobs": out.logprobs, "finish_reason": out.finish_reason}
            if out.token_ids is not None:  # return_token_ids
                choice["token_ids"] = out.token_ids
            choices.append(choice)
        obj = "chat.completion" if self.chat else "text_completion"
        stats = outs[0].spec_stats() | ({"choices": [o.spec_stats() for o in outs]} if len(outs) > 1 else {})
        body = self._head(obj) | {"choices": choices, "usage": usage(outs, prompts), "outrider": stats}
        if outs[0].token_ids is not None:
            body["prompt_token_ids"] = outs[0].prompt_token_ids if len(outs) == 1 else \
                [o.prompt_token_ids for o in outs]
        return body

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False,
              token_ids: list[int] | None = None, index: int = 0, logprobs: dict[str, Any] | None = None,
              tool_calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """One SSE chunk with one choice: a text delta, the role announcement (chat) or the finish. `token_ids`
        (return_token_ids) are the ids received since the previous chunk of this choice, so the chunks' lists
        concatenate to the non-streamed response's `token_ids`; `logprobs` are theirs."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text:
                delta["content"] = text
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return self._head("chat.completion.chunk" if self.chat else "text_completion") | {"choices": [choice]}

    def final_chunk(self, out: Outcome, token_ids: list[int] | None = None,
                    logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.chunk(None, out.finish_reason, token_ids=token_ids, index=out.index, logprobs=logprobs) \
            | {"outrider": out.spec_stats()}

    def usage_chunk(self, outs: list[Outcome], prompts: int = 1) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._head(obj) | {"choices": [], "usage": usage(outs, prompts), "outrider": outs[0].spec_stats()}
