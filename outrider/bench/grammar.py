"""`outrider bench grammar`: what each grammar library costs on this CPU for the target's vocabulary — building its
view of the tokenizer (once per served model), compiling a JSON schema (once per request: a server gets a new
schema with each), and computing the next-token mask (once per row scored) while teacher-forcing a document valid
for the schema. llguidance is what the server uses; xgrammar and outlines-core are measured when installed
(`pip install xgrammar outlines-core`), else reported as absent.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from typing import Callable

from outrider.runtime.tokenizer import Tokenizer, _bytes_to_unicode

MODE = "grammar"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "tags": {"type": "array", "items": {"type": "string"}}}}
DOCUMENT = json.dumps({"name": "Bob Smith", "age": 42, "tags": ["admin", "ops", "dev"]})


def _timed(fn: Callable[[], object]) -> tuple[object, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _llguidance(tok: Tokenizer, vocab: int, ids: list[int]) -> tuple[float, float, list[float]]:
    import llguidance

    ll, t_tok = _timed(lambda: llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab,
                                                      eos_token=list(tok.eos_token_ids)))
    options = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
    matcher, t_compile = _timed(lambda: llguidance.LLMatcher(
        ll, llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=options), log_level=0))
    masks = []
    for t in ids:
        masks.append(_timed(matcher.compute_bitmask)[1])
        assert matcher.consume_token(t), matcher.get_error()
    return t_tok, t_compile, masks


def _xgrammar(tok: Tokenizer, vocab: int, ids: list[int]) -> tuple[float, float, list[float]]:
    import xgrammar as xgr

    tokens = [tok.backend.id_to_token(i) or "" for i in range(tok.vocab_size)]
    info, t_tok = _timed(lambda: xgr.TokenizerInfo(tokens, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab,
                                                   stop_token_ids=list(tok.eos_token_ids)))
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    compiled, t_compile = _timed(lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False,
                                                                      separators=(", ", ": ")))
    matcher, bitmask, masks = xgr.GrammarMatcher(compiled), xgr.allocate_token_bitmask(1, vocab), []
    for t in ids:
        masks.append(_timed(lambda: matcher.fill_next_token_bitmask(bitmask))[1])
        assert matcher.accept_token(t)
    return t_tok, t_compile, masks


def _outlines(tok: Tokenizer, vocab: int, ids: list[int]) -> tuple[float, float, list[float]]:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = {c: b for b, c in _bytes_to_unicode().items()}

    def build() -> Vocabulary:
        by_bytes: dict[bytes, list[int]] = {}
        for i in range(tok.vocab_size):
            text = tok.backend.id_to_token(i)
            if text is None or i in tok.eos_token_ids:
                continue
            raw = bytes(byte_of[c] for c in text) if all(c in byte_of for c in text) else text.encode()
            by_bytes.setdefault(raw, []).append(i)
        return Vocabulary(tok.eos_token_ids[0], by_bytes)

    vocabulary, t_tok = _timed(build)
    regex = build_regex_from_schema(json.dumps(SCHEMA), whitespace_pattern=r" ?")
    index, t_compile = _timed(lambda: Index(regex, vocabulary))
    guide, masks = Guide(index), []
    for t in ids:
        masks.append(_timed(guide.get_tokens)[1])
        guide.advance(t)
    return t_tok, t_compile, masks


LIBRARIES = {"llguidance": ("llguidance", _llguidance), "xgrammar": ("xgrammar", _xgrammar),
             "outlines-core": ("outlines_core", _outlines)}


def run_grammar_bench(a: argparse.Namespace) -> int:
    from outrider.hub import resolve

    path = resolve(a.target)
    tok = Tokenizer.load(path)
    vocab = tok.vocab_size
    ids = tok.encode(DOCUMENT)
    print(f"tokenizer of {path.name}: {tok.vocab_size} tokens; schema of {len(SCHEMA['properties'])} fields, "
          f"document of {len(ids)} tokens")
    rows = {}
    for name, (module, measure) in LIBRARIES.items():
        if importlib.util.find_spec(module) is None:
            print(f"{name:14} not installed")
            continue
        t_tok, t_compile, masks = measure(tok, vocab, ids)
        rows[name] = {"tokenizer_s": round(t_tok, 3), "compile_ms": round(t_compile * 1e3, 2),
                      "mask_ms_median": round(statistics.median(masks) * 1e3, 4),
                      "mask_ms_max": round(max(masks) * 1e3, 3)}
        r = rows[name]
        print(f"{name:14} tokenizer {r['tokenizer_s']:6.2f} s   compile {r['compile_ms']:9.2f} ms   mask median "
              f"{r['mask_ms_median']:7.4f} ms   max {r['mask_ms_max']:7.3f} ms")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"model": str(path), "schema": SCHEMA, "document_tokens": len(ids), "libraries": rows}, f,
                      indent=2)
    return 0
