"""Structured output through the engine: a JSON schema's grammar masks the target's rows (each at the state after
the drafts before it) and the draft's proposals. Greedy output equals plain constrained decoding and always
parses and validates; the draft never proposes a forbidden token; sampled output has the constrained target's
exact distribution (chi-square against enumeration, with a control that must fail).
"""
from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from tiny_folders import write_tiny_folder

from outrider.runtime.batch import ForwardBatch
from outrider.runtime.loading import load_model
from outrider.runtime.tokenizer import Tokenizer
from outrider.scheduler.drafters import ModelDrafter
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.grammar import GrammarTokenizer
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams, warp
from outrider.scheduler.target import LocalTarget

CAPACITY = 512
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["colour", "ok", "size"],
          "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                         "size": {"enum": [1, 2, 3]}}}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("structured")
    return write_tiny_folder(root / "target", seed=1, layers=4), write_tiny_folder(root / "draft", seed=2)


@pytest.fixture(scope="module")
def models(pair):
    return tuple(load_model(str(p), "float32", "dense")[0] for p in pair)


@pytest.fixture(scope="module")
def tokenizer(pair) -> Tokenizer:
    return Tokenizer.load(pair[0])


@pytest.fixture(scope="module")
def grammars(tokenizer, models) -> GrammarTokenizer:
    return GrammarTokenizer(tokenizer.backend.to_str(), models[0].config.vocab_size, tokenizer.eos_token_ids)


def prompt(tokenizer: Tokenizer) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "A colour as JSON."}]))


class Recording:
    """A real drafter whose proposals are kept, to check each against the grammar afterwards."""

    def __init__(self, drafter: ModelDrafter) -> None:
        self.drafter, self.proposals = drafter, []

    def prefill(self, seq_id, tokens):
        self.drafter.prefill(seq_id, tokens)

    def propose(self, requests):
        drafts = self.drafter.propose(requests)
        self.proposals += [(r.tokens[r.prompt_len:], d.tokens) for r, d in zip(requests, drafts)]
        return drafts

    def release(self, seq_id):
        self.drafter.release(seq_id)

    def slots_in_use(self):
        return self.drafter.slots_in_use()


def test_greedy_json_schema_output_is_plain_constrained_decodings_and_valid(models, tokenizer, grammars):
    target, draft = models
    ids, stop = prompt(tokenizer), frozenset(tokenizer.eos_token_ids)
    grammar = grammars.json_schema(SCHEMA)
    alone = Engine(LocalTarget(target, capacity=CAPACITY)).generate(Request(ids, 60, stop_ids=stop, grammar=grammar))
    assert alone.finish_reason == "stop"
    document = json.loads(tokenizer.decode(alone.generated))
    jsonschema.validate(document, SCHEMA)
    free = Engine(LocalTarget(target, capacity=CAPACITY)).generate(Request(ids, 60, stop_ids=stop))
    with pytest.raises(ValueError):  # control: unconstrained, the random model writes no JSON
        json.loads(tokenizer.decode(free.generated))
    spec = Engine(LocalTarget(target, capacity=CAPACITY), ModelDrafter(draft, capacity=CAPACITY),
                  lambda: FixedK(4)).generate(Request(ids, 60, stop_ids=stop, grammar=grammar))
    assert spec.generated == alone.generated
    assert spec.stats.draft_tokens > spec.stats.rounds


def test_the_draft_never_proposes_a_token_the_grammar_forbids(models, tokenizer, grammars):
    target, draft = models
    ids, stop, grammar = prompt(tokenizer), frozenset(tokenizer.eos_token_ids), grammars.json_schema(SCHEMA)

    def forbidden(request_grammar) -> int:
        drafter = Recording(ModelDrafter(draft, capacity=CAPACITY))
        Engine(LocalTarget(target, capacity=CAPACITY), drafter, lambda: FixedK(4)).generate(
            Request(ids, 60, SamplingParams(temperature=1.0, seed=5), stop, grammar=request_grammar))
        bad = 0
        for committed, drafted in drafter.proposals:
            guide = grammar.start()
            guide.commit(committed)
            # what follows an end token is never scored (the sequence stops there)
            end = next((i + 1 for i, t in enumerate(drafted) if t in stop), len(drafted))
            rows = guide.constrain(torch.zeros(end, target.config.vocab_size), [drafted[:i] for i in range(end)])
            bad += not all(torch.isfinite(rows[i, t]) for i, t in enumerate(drafted[:end]))
        return bad

    assert forbidden(grammar) == 0
    assert forbidden(None) > 0  # control: the same draft unmasked proposes what the grammar forbids


def test_sampled_constrained_decoding_with_speculation_has_the_constrained_distribution(models, tokenizer, grammars):
    target, draft = models
    ids, grammar = prompt(tokenizer), grammars.json_schema({"type": "integer"})
    params = SamplingParams(temperature=1.5)

    def dist(generated: list[int], masked: bool) -> torch.Tensor:
        cache = target.new_cache(1, CAPACITY)
        logits = target.forward(ForwardBatch.chain([0], [ids + generated], [0]), cache).logits[-1:]
        if masked:
            guide = grammar.start()
            guide.commit(generated)
            logits = guide.constrain(logits, [[]])
        return warp(logits, params)[0].double()

    def exact(masked: bool) -> dict[tuple[int, int], float]:
        first = dist([], masked)
        out = {}
        for a in torch.nonzero(first > 1e-12)[:, 0].tolist():
            second = dist([a], masked)
            for b in torch.nonzero(second > 1e-12)[:, 0].tolist():
                out[(a, b)] = (first[a] * second[b]).item()
        return out

    engine = Engine(LocalTarget(target, capacity=CAPACITY), ModelDrafter(draft, capacity=CAPACITY), lambda: FixedK(2))
    counts: dict[tuple[int, int], int] = {}
    for seed in range(1500):
        out = engine.generate(Request(ids, 2, SamplingParams(temperature=1.5, seed=seed), grammar=grammar))
        key = (out.generated[0], out.generated[1])
        counts[key] = counts.get(key, 0) + 1

    def p_value(reference: dict[tuple[int, int], float]) -> float:
        cells = sorted(set(reference) | set(counts))
        obs = np.array([counts.get(c, 0) for c in cells], dtype=float)
        exp = np.array([reference.get(c, 0.0) for c in cells]) * obs.sum()
        if obs[exp == 0].sum():
            return 0.0
        keep = exp > 0
        big = exp[keep] >= 5
        o, e = obs[keep][big], exp[keep][big]
        if (~big).any():
            o, e = np.append(o, obs[keep][~big].sum()), np.append(e, exp[keep][~big].sum())
        return chisquare(o, e * o.sum() / e.sum()).pvalue

    assert len(exact(True)) >= 3  # several continuations: the test has something to tell apart
    assert p_value(exact(True)) > 1e-3
    assert p_value(exact(False)) < 1e-6  # control: the unconstrained target


def test_an_invalid_schema_is_refused_naming_it(grammars):
    with pytest.raises(ValueError, match="JSON schema"):
        grammars.json_schema({"type": "object", "properties": {"x": {"type": "no-such-type"}}})


def test_any_json_object_when_no_schema(models, tokenizer, grammars):
    target, _ = models
    out = Engine(LocalTarget(target, capacity=CAPACITY)).generate(
        Request(prompt(tokenizer), 40, SamplingParams(temperature=0.7, seed=1), frozenset(tokenizer.eos_token_ids),
                grammar=grammars.json_schema(None)))
    text = tokenizer.decode(out.generated)
    if out.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert text.startswith("{")
