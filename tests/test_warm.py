"""Warm starts read a GGUF's config and tokenizer from the record written beside it at the first load, and get
exactly what parsing the GGUF gives; a changed or damaged GGUF record is ignored and rebuilt."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from conftest import random_state
from gguf_writer import CHATML_TEMPLATE, smollm2_path, tiny_hf_config, train_tiny_vocab, write_gguf

from outrider.runtime.checkpoint import _load_gguf, load_checkpoint
from outrider.runtime.gguf_file import open_gguf
from outrider.runtime.loading import load_model
from outrider.runtime.tokenizer import Tokenizer
from outrider.runtime.tokenizer import _load_gguf as parse_tokenizer
from outrider.runtime.warm import meta_path, read_config, read_tokenizer_state

TEXTS = ["def add(a, b):\n    return a + b\n", "café naïve 日本語 😀 <|im_start|>user\nhi<|im_end|>", "  \t\r\n"]
CHAT = [{"role": "user", "content": "Write a haiku."}]


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)
        assert a.decode(a.encode(text)) == b.decode(b.encode(text))
    assert a.apply_chat_template(CHAT) == b.apply_chat_template(CHAT)
    assert (a.eos_token_ids, a.bos_token_id, a.special_tokens) == (b.eos_token_ids, b.bos_token_id, b.special_tokens)


@pytest.fixture
def tiny_gguf(tmp_path):
    vocab = train_tiny_vocab()
    cfg = tiny_hf_config("qwen2", vocab)
    return write_gguf(tmp_path / "tiny.gguf", random_state(cfg, 0), cfg, vocab, chat_template=CHATML_TEMPLATE)


def test_the_record_gives_what_parsing_gives(tiny_gguf):
    assert read_config(tiny_gguf) is None  # nothing recorded before the first load
    model, ckpt = load_model(tiny_gguf, "float32", "int8")
    assert meta_path(tiny_gguf).is_file()
    parsed = _load_gguf(tiny_gguf)
    assert read_config(tiny_gguf) == parsed.config == ckpt.config
    warm = Tokenizer.from_state(read_tokenizer_state(tiny_gguf), tiny_gguf)
    same_tokenizer(warm, parse_tokenizer(open_gguf(tiny_gguf)))
    warm, warm_ckpt = load_model(tiny_gguf, "float32", "int8")  # config from the record, weights from the cache
    ids = torch.tensor([5, 9, 17])
    assert torch.equal(warm.logits(warm.embed(ids)), model.logits(model.embed(ids)))
    assert torch.equal(warm_ckpt.tensors.get("model.norm.weight"), parsed.tensors.get("model.norm.weight"))


def test_the_real_smollm2_tokenizer_from_its_record_equals_the_parsed_one(tmp_path):
    copy = tmp_path / "smollm2.gguf"  # a copy, so the test writes its record beside it, not in the model cache
    shutil.copyfile(smollm2_path(), copy)
    load_model(copy, "bfloat16", "int4")
    same_tokenizer(Tokenizer.load(copy), parse_tokenizer(open_gguf(copy)))
    assert load_checkpoint(copy).config == _load_gguf(copy).config


def test_a_changed_gguf_makes_the_record_stale_and_a_damaged_record_is_ignored(tiny_gguf):
    load_model(tiny_gguf, "float32", "dense")
    assert read_config(tiny_gguf) is not None
    st = tiny_gguf.stat()
    os.utime(tiny_gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # re-fetched: another mtime
    assert read_config(tiny_gguf) is None and read_tokenizer_state(tiny_gguf) is None
    load_model(tiny_gguf, "float32", "dense")  # rewrites the record
    assert read_config(tiny_gguf) is not None
    meta_path(tiny_gguf).write_text("{not json")
    assert read_config(tiny_gguf) is None
    assert load_checkpoint(tiny_gguf).config == _load_gguf(tiny_gguf).config  # falls back to parsing
