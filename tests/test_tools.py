"""Tool calling through the real server and the official `openai` client: tools rendered by the chat template,
`<tool_call>` blocks cut into `tool_calls` (streamed as deltas), tool_choice "required" / a named function enforced
by a grammar, assistant tool calls and tool results accepted back, and the parser robust to any split of the text.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import jsonschema
import openai
import pytest
from gguf_writer import save_tokenizer_folder, train_tiny_vocab
from test_server import DEADLINE_S, chat, live, make_profile
from tiny_folders import write_tiny_pair

from outrider.server.tools import ToolCallParser, split_calls
from outrider.service import Service

# A Hermes-style template, as Qwen2.5's: tools in the system turn, calls as <tool_call> JSON, results as
# <tool_response> in a user turn.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nYou may call these functions:\n<tools>{% for t in tools %}\n{{ t | tojson }}"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n"
    "{% for c in m.tool_calls %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "\n</tool_call>{% endfor %}<|im_end|>\n{% elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ m.content }}\n</tool_response><|im_end|>\n{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["zone"],
    "properties": {"zone": {"enum": ["UTC", "CET"]}}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Service]]:
    target, draft = write_tiny_pair(tmp_path_factory.mktemp("tools"))
    for folder in (target, draft):
        save_tokenizer_folder(train_tiny_vocab(), Path(folder), chat_template=TOOLS_TEMPLATE)
    with live(make_profile((target, draft), max_seq_len=1024, max_tokens=256)) as s:
        yield s


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)


def schema_of(tool: dict) -> dict:
    return tool["function"]["parameters"]


def test_a_required_call_is_one_valid_call_of_an_offered_function(client):
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=chat("Weather in Oslo?"), tools=[WEATHER, TIME],
                                           tool_choice="required", max_tokens=150, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), schema_of(tool))


def test_a_named_function_is_the_one_called_and_streams_as_one_delta(client):
    kw = dict(model="tiny", messages=chat("What time is it?"), tools=[WEATHER, TIME], max_tokens=150,
              temperature=0.8, seed=4, tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    assert whole.function.name == "get_time"
    deltas = [c for chunk in client.chat.completions.create(stream=True, **kw) if chunk.choices
              for c in (chunk.choices[0].delta.tool_calls or [])]
    assert len(deltas) == 1 and deltas[0].index == 0
    assert (deltas[0].function.name, deltas[0].function.arguments) == (whole.function.name, whole.function.arguments)


def test_a_tool_result_goes_back_into_the_conversation(client, server):
    first = client.chat.completions.create(model="tiny", messages=chat("Weather in Lima?"), tools=[WEATHER],
                                           tool_choice="required", max_tokens=150, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    messages = chat("Weather in Lima?") + [
        first.choices[0].message.model_dump(),  # as an agent sends the reply back: refusal, audio, ... all None
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=8,
                                       temperature=0, extra_body={"return_token_ids": True})
    _, service = server
    tok = service.tokenizer
    rendered = tok.decode(r.model_extra["prompt_token_ids"], skip_special_tokens=False)
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in rendered
    assert '"name": "get_weather"' in rendered and "<tools>" in rendered


@pytest.mark.parametrize("change, says", [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required", "tools": None}, "tool_choice needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "assistant", "content": None}]}, "content is required"),
    ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "give one"),
])
def test_bad_tool_requests_are_400(server, change, says):
    import httpx

    body = {"messages": chat(), "tools": [WEATHER], "max_tokens": 4} | change
    r = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=DEADLINE_S)
    assert r.status_code == 400 and says in r.json()["error"]["message"], r.text


def test_tools_for_a_template_without_them_are_refused(tmp_path):
    import httpx

    with live(make_profile(write_tiny_pair(tmp_path))) as (url, _):  # the plain ChatML template
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": chat(), "tools": [WEATHER]},
                       timeout=DEADLINE_S)
        assert r.status_code == 400 and "does not describe tools" in r.json()["error"]["message"]
        plain = {"messages": chat(), "tools": [WEATHER], "tool_choice": "none", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/chat/completions", json=plain, timeout=DEADLINE_S).status_code == 200


TEXT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}\n'
        '</tool_call> and <tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call> done'
        ' <tool_call>not json</tool_call>')


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, len(TEXT)])
def test_the_parser_gives_the_same_calls_and_text_however_the_text_is_split(size):
    parser, shown, calls = ToolCallParser(), "", []
    for i in range(0, len(TEXT), size):
        text, done = parser.push(TEXT[i:i + size])
        assert "<tool_call>" not in text or "not json" in text  # a real call's tag is never shown
        shown, calls = shown + text, calls + done
    shown += parser.flush()
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"}), ("get_time", {"zone": "UTC"})]
    assert shown == "Let me check.  and  done <tool_call>not json</tool_call>"
    assert split_calls(TEXT)[0] == shown.strip()


def test_a_tag_that_is_one_token_is_named_as_that_token_in_the_grammar():
    from outrider.server.tools import Tool, forced_call_grammar

    grammar = forced_call_grammar([Tool.model_validate(WEATHER)], "required", {"<tool_call>": 7, "</tool_call>": 8}.get)
    assert grammar.startswith(r'start: <[7]> "\n" call "\n" <[8]>')
    assert forced_call_grammar([Tool.model_validate(WEATHER)], "auto") is None


def test_an_unfinished_call_is_given_back_as_text():
    parser = ToolCallParser()
    text, calls = parser.push('Hi <tool_call>\n{"name": "x", ')
    assert (text, calls) == ("Hi ", [])
    assert parser.flush() == '<tool_call>\n{"name": "x", '
