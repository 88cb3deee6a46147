"""The vLLM `return_token_ids` extension over real HTTP with tiny random models: the non-streamed response carries
the completion's ids (as many as usage.completion_tokens, decoding to its text) and the prompt's ids; every
streamed text chunk carries the ids received since the previous chunk, so the chunks' ids concatenate to the
non-streamed ids, also when stop-string holdback leaves rounds without a text chunk of their own."""
from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest
from test_server import DEADLINE_S, PROMPT, chat, live, make_profile, sse_events
from tiny_folders import write_tiny_pair

from outrider.service import Service

K = 3  # make_profile's strategy: a round yields at most k + 1 tokens
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Service]]:
    with live(make_profile(write_tiny_pair(tmp_path_factory.mktemp("pair")))) as s:
        yield s


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0], timeout=DEADLINE_S) as c:
        yield c


def whole(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = http.post(path, json=body | {"return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()


def streamed(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed request with return_token_ids, checked to end in `[DONE]`."""
    body = body | {"return_token_ids": True, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        events = list(sse_events(r))
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) and "error" not in e for e in events[:-1])
    return events[:-1]


def text_of(choice: dict[str, Any]) -> str:
    if "text" in choice:  # completions
        return choice["text"]
    return (choice.get("delta") or choice.get("message") or {}).get("content") or ""  # chat


def chunk_ids(chunks: list[dict[str, Any]]) -> list[int]:
    return [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])]


CASES = [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": chat()})]
SAMPLING = [{"temperature": 0}, {"temperature": 0.8, "top_p": 0.9, "seed": 11}]


@pytest.mark.parametrize("path, prompt", CASES, ids=["completions", "chat"])
@pytest.mark.parametrize("sampling", SAMPLING, ids=["greedy", "seeded"])
def test_streamed_ids_concatenate_to_the_non_streamed_ids(http, server, path, prompt, sampling):
    body = prompt | sampling | {"max_tokens": 40, "ignore_eos": True}
    ref = whole(http, path, body)
    ids = ref["choices"][0]["token_ids"]
    assert len(ids) == ref["usage"]["completion_tokens"] == 40
    assert server[1].tokenizer.decode(ids) == text_of(ref["choices"][0])
    assert len(ref["prompt_token_ids"]) == ref["usage"]["prompt_tokens"]

    chunks = streamed(http, path, body)
    assert chunk_ids(chunks) == ids
    assert "".join(text_of(c["choices"][0]) for c in chunks if c["choices"]) == text_of(ref["choices"][0])
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)
    texts = [c["choices"][0] for c in chunks if c["choices"] and text_of(c["choices"][0])]
    assert texts and texts[0]["token_ids"]  # the first text chunk carries its round's ids


def test_prompt_token_ids_echo_a_token_prompt(http):
    prompt = [5, 17, 42, 99, 7]
    ref = whole(http, "/v1/completions", {"prompt": prompt, "max_tokens": 6, "temperature": 0})
    assert ref["prompt_token_ids"] == prompt and len(ref["choices"][0]["token_ids"]) <= 6


def test_held_back_rounds_ride_on_the_next_chunk(http):
    """A stop string longer than several rounds' text holds those rounds back: no chunk of their own, so a
    later chunk carries more than one round's (k + 1) ids, and none are lost."""
    body = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": ["\x00" * 48]}
    ids = whole(http, "/v1/completions", body)["choices"][0]["token_ids"]
    chunks = streamed(http, "/v1/completions", body)
    assert chunk_ids(chunks) == ids and len(ids) == 40
    assert max(len(c["choices"][0]["token_ids"]) for c in chunks if c["choices"]) > K + 1


def test_a_stop_string_at_the_start_puts_every_id_on_the_final_chunk(http):
    """The stop string begins the text: no text chunk at all; the tokens up to the one completing it ride on
    the finish chunk, exactly as many as usage counts and the same as non-streamed."""
    base = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = whole(http, "/v1/completions", base)["choices"][0]["text"]
    body = base | {"stop": [full[:2]]}
    ref = whole(http, "/v1/completions", body)
    assert ref["choices"][0]["text"] == "" and ref["choices"][0]["finish_reason"] == "stop"
    chunks = streamed(http, "/v1/completions", body)
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "stop" and all(c["choices"][0]["text"] == "" for c in chunks[:-1])
    assert finish["choices"][0]["token_ids"] == chunk_ids(chunks) == ref["choices"][0]["token_ids"]
    assert 0 < len(ref["choices"][0]["token_ids"]) == usage["usage"]["completion_tokens"]


def test_with_a_stop_string_the_ids_end_at_the_token_that_completes_it(http, server):
    """Not at the end of the round that held it: how many tokens a round commits depends on speculation (and so
    on load), the ids must not."""
    base = {"prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    full = whole(http, "/v1/completions", base)["choices"][0]
    stop = full["text"][10:13]
    ids = whole(http, "/v1/completions", base | {"stop": [stop]})["choices"][0]["token_ids"]
    decode = server[1].tokenizer.decode
    assert stop in decode(ids) and stop not in decode(ids[:-1])
    assert ids == full["token_ids"][:len(ids)]


@pytest.mark.parametrize("path, prompt", CASES, ids=["completions", "chat"])
def test_ids_are_absent_unless_asked(http, path, prompt):
    r = http.post(path, json=prompt | {"max_tokens": 4}).json()
    assert "token_ids" not in r["choices"][0] and "prompt_token_ids" not in r
    body = prompt | {"max_tokens": 4, "stream": True}
    with http.stream("POST", path, json=body) as s:
        events = list(sse_events(s))
    assert not any("token_ids" in e["choices"][0] for e in events[:-1] if e["choices"])


def test_chat_role_chunk_has_no_ids(http):
    chunks = streamed(http, "/v1/chat/completions", {"messages": chat(), "max_tokens": 8, "temperature": 0})
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and "token_ids" not in chunks[0]["choices"][0]


def test_return_token_ids_must_be_a_bool(http):
    r = http.post("/v1/completions", json={"prompt": PROMPT, "return_token_ids": "maybe"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_token_ids"
