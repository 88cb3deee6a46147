"""Tool calling in OpenAI's format over the model's own: Qwen2.5 (and Hermes-style templates) describe the tools in
the system turn and have the model answer a call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`.

Requests: `tools` go to the chat template as it expects them; assistant messages carrying `tool_calls` and `tool`
messages are rendered by it too. Responses: the calls are cut out of the text into `message.tool_calls` (streamed
as one `tool_calls` delta per call, once its closing tag arrives), finish_reason "tool_calls". `tool_choice`:
"none" renders no tools; "auto" lets the model choose; "required" or a named function constrains the output by a
grammar to one call of an offered function with arguments valid for its parameters.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from outrider.scheduler.grammar import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError as e:
            raise ValueError(f"must be a JSON object as text: {e}") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object as text")
        return v


class ToolCall(BaseModel):
    """A call the assistant made earlier in the conversation, sent back by the client."""

    model_config = ConfigDict(extra="forbid")
    id: str
    type: Literal["function"]
    function: CalledFunction

    def as_template_input(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.function.name,
                                                 "arguments": json.loads(self.function.arguments)}}


def template_tools(tools: list[Tool] | None, choice: str | NamedToolChoice | None) -> list[dict[str, Any]] | None:
    """The tools the chat template describes (None: none, as with tool_choice "none")."""
    if not tools or choice == "none":
        return None
    return [t.model_dump(exclude_none=True) for t in tools]


def check_choice(tools: list[Tool] | None, choice: str | NamedToolChoice | None) -> None:
    """ValueError (a 400) for a tool_choice the tools cannot satisfy."""
    if choice in (None, "none", "auto"):
        return
    if not tools:
        raise ValueError("tool_choice needs tools: give the functions the model may call")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
        raise ValueError(f"tool_choice names {choice.function.name!r}, which is not among the tools "
                         f"({', '.join(t.function.name for t in tools)})")


def forced_call_grammar(tools: list[Tool], choice: str | NamedToolChoice | None,
                        token_id: Callable[[str], int | None] = lambda _: None) -> str | None:
    """A Lark grammar (llguidance's dialect) of exactly one call, for tool_choice "required" or a named function;
    None when the model may answer freely. `token_id`: a tag's token where the vocabulary has one (Qwen2.5's
    `<tool_call>` is token 151657), which the grammar must name as that token, not as its characters."""
    if choice not in ("required",) and not isinstance(choice, NamedToolChoice):
        return None
    names = [choice.function.name] if isinstance(choice, NamedToolChoice) else [t.function.name for t in tools]
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": t.function.name},
                             "arguments": t.function.parameters or {"type": "object"}}}
             for t in tools if t.function.name in names]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema["x-guidance"] = JSON_OPTIONS  # compact JSON, as the template writes calls: no room to spin on whitespace
    newline = json.dumps("\n")
    return (f"start: {_tag(OPEN, token_id)} {newline} call {newline} {_tag(CLOSE, token_id)}\n"
            f"call: %json {json.dumps(schema)}\n")


def _tag(text: str, token_id: Callable[[str], int | None]) -> str:
    """The tag as a Lark terminal: its token (`<[id]>`) where it is one, else its characters."""
    token = token_id(text)
    return f"<[{token}]>" if token is not None else json.dumps(text)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ParsedCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=new_call_id)

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index} | call


def _parse_call(body: str) -> ParsedCall | None:
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string already
        return ParsedCall(obj["name"], arguments)
    return ParsedCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Cuts `<tool_call>` blocks out of a stream of text pieces. `push` returns the plain text that is safe to
    show now (never the start of a tag that the next piece may complete) and the calls completed so far."""

    def __init__(self) -> None:
        self.buffer = ""
        self.inside = False
        self.calls: list[ParsedCall] = []

    def push(self, piece: str) -> tuple[str, list[ParsedCall]]:
        self.buffer += piece
        text, done = "", []
        while True:
            if not self.inside:
                at = self.buffer.find(OPEN)
                if at < 0:
                    cut = len(self.buffer) - _partial_tag(self.buffer, OPEN)
                    text, self.buffer = text + self.buffer[:cut], self.buffer[cut:]
                    return text, done
                text, self.buffer, self.inside = text + self.buffer[:at], self.buffer[at + len(OPEN):], True
            at = self.buffer.find(CLOSE)
            if at < 0:
                return text, done
            body, self.buffer, self.inside = self.buffer[:at], self.buffer[at + len(CLOSE):], False
            call = _parse_call(body.strip())
            if call is None:  # not a call after all: give the text back as it was
                text += OPEN + body + CLOSE
            else:
                self.calls.append(call)
                done.append(call)

    def flush(self) -> str:
        """At the end: text held back, and an unfinished block given back as text."""
        rest = (OPEN if self.inside else "") + self.buffer
        self.buffer, self.inside = "", False
        return rest


def _partial_tag(text: str, tag: str) -> int:
    """How many trailing characters of `text` could begin `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_calls(text: str) -> tuple[str, list[ParsedCall]]:
    """(the text outside the calls, the calls) of a whole response."""
    parser = ToolCallParser()
    shown, calls = parser.push(text)
    return (shown + parser.flush()).strip(), calls
