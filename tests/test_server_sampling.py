"""What real clients send beyond the basics, through the real HTTP server and the official `openai` client:
logprobs (chat and completions, streamed and not), echo with prompt logprobs (what lm-eval's loglikelihood
requests), n > 1, batched prompts, penalties, min_p and logit_bias. The reference for every output is the
in-process engine decoding plainly over the same target model.
"""
from __future__ import annotations

import json
from typing import Iterator

import openai
import pytest
from test_server import DEADLINE_S, PROMPT, chat, live, make_profile, metric_values, sse_events
from tiny_folders import write_tiny_pair

from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget
from outrider.service import Service


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Service]]:
    with live(make_profile(write_tiny_pair(tmp_path_factory.mktemp("pair")))) as s:
        yield s


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=DEADLINE_S)


@pytest.fixture()
def http(server):
    import httpx

    with httpx.Client(base_url=server[0], timeout=DEADLINE_S) as c:
        yield c


def plain(service: Service, prompt_ids: list[int], max_tokens: int, params: SamplingParams = SamplingParams(),
          logprobs: int | None = None, prompt_logprobs: int | None = None):
    """The target alone, in this process, on the served target's weights: no speculation, no server."""
    engine = Engine(LocalTarget(service.engine.target.model, capacity=service.engine.target.capacity))
    stop = frozenset(service.tokenizer.eos_token_ids)
    return engine.generate(Request(prompt_ids, max_tokens, params, stop, logprobs, prompt_logprobs))


def test_completion_logprobs_are_plain_decodings_and_stream_the_same(server, client):
    url, service = server
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    ref = plain(service, service.tokenizer.encode(PROMPT), 12, logprobs=3)
    assert r.model_extra["outrider"]["accepted_tokens"] > 0  # speculation ran
    assert lp.token_logprobs == [e.logprob for e in ref.logprobs]  # exact floats
    assert lp.tokens == [service.tokenizer.decode([t], skip_special_tokens=False) for t in ref.generated]
    for entry, top in zip(ref.logprobs, lp.top_logprobs):
        alternatives = {service.tokenizer.decode([t], skip_special_tokens=False): v for t, v in entry.top}
        assert top == alternatives | {k: v for k, v in top.items() if k not in alternatives}
        # the three alternatives, and the chosen token when it is not among them (keys are texts: partial UTF-8
        # byte tokens all read "\ufffd" and share one key, as in every OpenAI-compatible server)
        assert 1 <= len(top) <= 4 and service.tokenizer.decode([entry.token], skip_special_tokens=False) in top
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed = {"tokens": [], "token_logprobs": []}
    for chunk in client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=3,
                                           stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed["tokens"] += chunk.choices[0].logprobs.tokens
            streamed["token_logprobs"] += chunk.choices[0].logprobs.token_logprobs
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs}


def test_chat_logprobs_with_alternatives_streamed_and_not(server, client):
    _, service = server
    r = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=10, temperature=0, logprobs=True,
                                       top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)
    assert all(c.bytes == list(c.token.encode()) and c.logprob <= 0 for c in content)
    prompt_ids = service.tokenizer.encode(service.tokenizer.apply_chat_template(chat()))
    assert [c.logprob for c in content] == [e.logprob for e in plain(service, prompt_ids, 10, logprobs=2).logprobs]
    streamed = []
    for chunk in client.chat.completions.create(model="tiny", messages=chat(), max_tokens=10, temperature=0,
                                                logprobs=True, top_logprobs=2, stream=True):
        if chunk.choices and chunk.choices[0].logprobs:
            streamed += chunk.choices[0].logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]


def test_echo_with_logprobs_scores_the_prompt_as_lm_eval_asks(server, http):
    """lm-eval's local-completions loglikelihood request: token ids, echo, logprobs 1, max_tokens 1, greedy."""
    _, service = server
    ids = service.tokenizer.encode("def add(a, b):\n    return a + b\n")
    body = {"model": "tiny", "prompt": ids, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    lp = choice["logprobs"]
    ref = plain(service, ids, 1, logprobs=1, prompt_logprobs=1)
    assert choice["text"] == service.tokenizer.decode(ids) + service.tokenizer.decode(ref.generated)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == [e.logprob for e in ref.prompt_logprobs[1:]] + [ref.logprobs[0].logprob]
    assert len(lp["tokens"]) == len(ids) + 1
    # is_greedy as lm-eval reads it: the chosen token's logprob is the best of its alternatives
    last = lp["top_logprobs"][-1]
    assert lp["token_logprobs"][-1] == max(last.values())


def test_n_choices_are_independent_seeded_streams(server, client):
    kw = dict(model="tiny", prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7)
    r = client.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    singles = [client.completions.create(**(kw | {"seed": 7 + i}), extra_body={"return_token_ids": True}).choices[0]
               for i in range(3)]
    assert texts == [c.text for c in singles]
    assert len(set(texts)) > 1  # control: the seeds differ
    assert r.usage.completion_tokens == sum(len(c.model_extra["token_ids"]) for c in singles)
    # the choices share one prompt prefill: the later ones copy the first's K/V
    prompt_tokens = r.usage.prompt_tokens
    assert [c["cached_prompt_tokens"] for c in r.model_extra["outrider"]["choices"][1:]] == [prompt_tokens - 1] * 2
    streamed = ["", "", ""]
    for chunk in client.completions.create(n=3, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == texts


def test_a_batch_of_prompts_gives_one_choice_each(server, client):
    prompts = ["def fib(n):", "class Stack:"]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0)
    assert [c.text for c in r.choices] == [client.completions.create(model="tiny", prompt=p, max_tokens=8,
                                                                     temperature=0).choices[0].text for p in prompts]
    _, service = server
    assert r.usage.prompt_tokens == sum(len(service.tokenizer.encode(p)) for p in prompts)


def test_penalties_and_logit_bias_match_plain_decoding_with_them(server, client):
    _, service = server
    ids = service.tokenizer.encode(PROMPT)
    banned = plain(service, ids, 24).generated[0]  # the unbiased first token
    kw = dict(model="tiny", prompt=ids, max_tokens=24, temperature=0, frequency_penalty=1.0, presence_penalty=0.5,
              logit_bias={str(banned): -100}, extra_body={"repetition_penalty": 1.2, "min_p": 0.1,
                                                          "return_token_ids": True})
    got = client.completions.create(**kw).choices[0].model_extra["token_ids"]
    params = SamplingParams(min_p=0.1, frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.2,
                            logit_bias=((banned, -100.0),))
    assert got == plain(service, ids, 24, params).generated
    assert banned not in got  # control: without the bias it came first


def test_a_bad_prompt_in_a_batch_is_400_and_the_others_give_their_kv_back(server, http):
    _, service = server
    before = service.kv_slots_in_use()
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": [[5, 6], [5] * 300], "max_tokens": 4})
    assert r.status_code == 400 and "context limit" in r.json()["error"]["message"]
    assert http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert service.kv_slots_in_use() == before


def test_streamed_n_with_usage_counts_every_choice(server, http):
    body = {"model": "tiny", "messages": chat(), "max_tokens": 6, "n": 2, "temperature": 0.8, "seed": 1,
            "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as resp:
        events = list(sse_events(resp))
    assert events[-1] == "[DONE]"
    finishes = [c for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert sorted(c["index"] for c in finishes) == [0, 1]
    roles = [c["index"] for e in events[:-1] for c in e["choices"] if c["delta"].get("role")]
    assert sorted(roles) == [0, 1]
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] <= 12 and usage["prompt_tokens"] > 0


def test_a_second_chat_turn_reports_its_cached_prompt_tokens_and_answers_as_without(server, client, http):
    _, service = server
    tok = service.tokenizer
    first = chat("Write a loop.")
    r1 = client.chat.completions.create(model="tiny", messages=first, max_tokens=8, temperature=0)
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "Now count down."}]
    hits = metric_values(http)[("outrider:prefix_cache_hits_total", ())]
    r2 = client.chat.completions.create(model="tiny", messages=second, max_tokens=8, temperature=0,
                                        extra_body={"return_token_ids": True})
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert cached >= len(tok.encode(tok.apply_chat_template(first))) - 1  # the whole first prompt at least
    assert r2.choices[0].model_extra["token_ids"] == plain(service, tok.encode(tok.apply_chat_template(second)),
                                                           8).generated
    assert metric_values(http)[("outrider:prefix_cache_hits_total", ())] == hits + cached


SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "ok"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}}}


def test_json_schema_responses_parse_and_validate_streamed_and_not(client):
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "colour", "schema": SCHEMA, "strict": True}}
    for seed in range(4):  # sampled: a different document each time, every one valid
        r = client.chat.completions.create(model="tiny", messages=chat("A colour, as JSON."), max_tokens=40,
                                           temperature=1.0, seed=seed, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=chat("A colour, as JSON."), max_tokens=40, temperature=1.0, seed=3,
        response_format=fmt, stream=True) if c.choices)
    assert streamed == r.choices[0].message.content
    any_object = client.chat.completions.create(model="tiny", messages=chat(), max_tokens=30, temperature=0,
                                                response_format={"type": "json_object"}).choices[0].message.content
    assert any_object.startswith("{")


@pytest.mark.parametrize("fmt, says", [
    ({"type": "json_schema"}, "json_schema is required"),
    ({"type": "xml"}, "Input should be 'text', 'json_object' or 'json_schema'"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}, "JSON schema"),
])
def test_a_bad_response_format_is_400_naming_it(http, fmt, says):
    r = http.post("/v1/chat/completions", json={"messages": chat(), "max_tokens": 4, "response_format": fmt})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["param"].startswith("response_format")
