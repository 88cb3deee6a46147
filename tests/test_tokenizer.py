"""Tokenizers from HF folders and GGUF metadata: ids equal transformers', chat templates render as transformers
renders them, and streaming detokenization reassembles exactly the full decode without half characters."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf_writer import (
    CHATML_TEMPLATE,
    TinyVocab,
    save_tokenizer_folder,
    smollm2_path,
    tiny_hf_config,
    train_tiny_vocab,
    write_gguf,
)

from outrider.runtime.tokenizer import Tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "def add(a, b):\n    return a + b\n\n\tprint(add(1, 23))  # sum\r\n",
    "café naïve — über straße 日本語のテキスト 中文 😀🎉👍🏽",
    "  leading   spaces,\n\n\nnewlines and trailing   ",
    "I'm sure you're right; they'll say WE'VE done it.",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
]
MESSAGES = [
    {"role": "user", "content": "Write a palindrome check in Python."},
    {"role": "assistant", "content": "def is_pal(s):\n    return s == s[::-1]"},
    {"role": "user", "content": "Thanks! 👍"},
]


@pytest.fixture(scope="module")
def vocab() -> TinyVocab:
    return train_tiny_vocab()


@pytest.fixture(scope="module")
def folder(vocab, tmp_path_factory) -> Path:
    return save_tokenizer_folder(vocab, tmp_path_factory.mktemp("tok"))


def tiny_gguf(vocab: TinyVocab, folder: Path, pre: str, **kwargs) -> Path:
    """A GGUF holding the tiny vocabulary (and no tensors: the tokenizer needs only metadata)."""
    return write_gguf(folder / f"tiny-{pre}.gguf", {}, tiny_hf_config("qwen2", vocab), vocab, pre=pre, **kwargs)


def transformers_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def check_stream(tok: Tokenizer, ids: list[int]) -> None:
    """Pushing one id at a time reassembles decode(ids) exactly and never emits U+FFFD."""
    stream = tok.stream_decoder()
    pieces = [stream.push([i]) for i in ids]
    pieces.append(stream.flush())
    assert all("\ufffd" not in p for p in pieces), pieces
    assert "".join(pieces) == tok.decode(ids)


def test_hf_folder_tokenizer(vocab, folder):
    from transformers import AutoTokenizer

    tok = Tokenizer.load(folder)
    assert tok.vocab_size == len(vocab.tokens)
    assert tok.eos_token_ids == (vocab.token_id("<|im_end|>"),) and tok.bos_token_id is None
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == vocab.tokenizer.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_end|>") == [vocab.token_id("<|im_end|>")]
    assert tok.decode(tok.encode(TEXTS[-1])) == "user\nHi there\nassistant\n"  # specials skipped by default
    hf = AutoTokenizer.from_pretrained(str(folder))
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("pre", ["gpt-2", "qwen2", "llama-bpe", "smollm"])
def test_gguf_tokenizer_matches_transformers(vocab, folder, pre, tmp_path):
    path = tiny_gguf(vocab, tmp_path, pre)
    tok = Tokenizer.load(path)
    hf = transformers_gguf_tokenizer(path)
    assert tok.vocab_size == len(vocab.tokens)
    assert tok.eos_token_ids == (vocab.token_id("<|im_end|>"), vocab.token_id("<|endoftext|>"))
    assert tok.bos_token_id == vocab.token_id("<|endoftext|>")
    for text in TEXTS:
        ids = tok.encode(text)
        if pre != "smollm":  # transformers does not split digits for smollm; checked against llama.cpp below
            assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    if pre == "gpt-2":  # the same vocabulary and pre-tokenizer as tokenizer.json: the same ids
        assert all(tok.encode(t) == Tokenizer.load(folder).encode(t) for t in TEXTS)
    if pre == "smollm":  # llama.cpp's smollm pre-tokenizer splits off every digit first
        ids = tok.encode("x 2024")
        assert [tok.decode([i]) for i in ids][-4:] == ["2", "0", "2", "4"]
    rendered = tok.apply_chat_template(MESSAGES)
    assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.encode(rendered)[0] == vocab.token_id("<|im_start|>")


def test_gguf_add_bos_and_missing_template(vocab, tmp_path):
    path = write_gguf(tmp_path / "nobos.gguf", {}, tiny_hf_config("llama", vocab), vocab, chat_template=None)
    tok = Tokenizer.load(path)
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # the file says add_bos_token = false
    with pytest.raises(ValueError, match="no chat template") as err:
        tok.apply_chat_template(MESSAGES)
    assert str(path) in str(err.value)


def test_chat_template_helpers_and_errors(vocab, tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
                "{{ strftime_now('%Y') | length }}|{{ messages | tojson }}|{{ eos_token }}")
    folder = save_tokenizer_folder(vocab, tmp_path / "t", chat_template=template)
    tok = Tokenizer.load(folder)
    assert tok.apply_chat_template([{"role": "user", "content": "é<>"}]) == (
        '4|[{"role": "user", "content": "é<>"}]|<|im_end|>')
    with pytest.raises(ValueError, match="first message must be user") as err:
        tok.apply_chat_template([{"role": "assistant", "content": "x"}])
    assert str(folder) in str(err.value)


def test_tokenizer_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        Tokenizer.load(tmp_path / "missing.gguf")


@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_stream_decoder_multibyte(vocab, folder, tmp_path, source):
    tok = Tokenizer.load(folder if source == "folder" else tiny_gguf(vocab, tmp_path, "qwen2"))
    text = "Hi 日本語 😀🎉 café 👍🏽!"
    ids = tok.encode(text)
    assert len(ids) > len(text)  # the tiny vocabulary splits characters into byte tokens
    check_stream(tok, ids)
    check_stream(tok, tok.encode("<|im_start|>assistant\n中文<|im_end|>"))  # specials skipped in both
    stream = tok.stream_decoder()
    first_byte = tok.encode("日")[0]  # one byte of a three-byte character: nothing to show yet
    assert stream.push([first_byte]) == ""
    assert stream.push(tok.encode("日")[1:]) == "日"


def test_real_smollm2_tokenizer_matches_transformers():
    path = smollm2_path()
    tok = Tokenizer.load(path)
    hf = transformers_gguf_tokenizer(path)
    assert tok.vocab_size == 49152 and tok.bos_token_id == 1 and tok.eos_token_ids[0] == 2
    for text in [*TEXTS, CHATML_TEMPLATE, "x = [i ** 2 for i in range(100)]  # 3.14159 and 2024-01-01"]:
        ids = tok.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=False) == text
        check_stream(tok, ids)
    rendered = tok.apply_chat_template(MESSAGES)
    assert rendered == hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert tok.encode(rendered) == hf.encode(rendered, add_special_tokens=False)
    assert tok.decode(tok.encode(rendered)).startswith("system\nYou are a helpful AI assistant named SmolLM")
