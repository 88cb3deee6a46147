"""Tokenizers from Hugging Face folders (tokenizer.json) or GGUF metadata, chat templates, streaming detokenization.

GGUF files carry a byte-level BPE vocabulary, its merges and a pre-tokenizer name; this module rebuilds the
`tokenizers` pipeline those describe, with the split regexes llama.cpp and the original tokenizer.json use.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from outrider.runtime.gguf_file import REFETCH_HINT, GGUFFile, end_of_generation_ids, open_gguf
from outrider.runtime.warm import read_tokenizer_state

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> family, grouped as llama.cpp's llama-vocab.cpp groups them.
_PRE_FAMILIES = {
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen"), "qwen2"),
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), "llama3"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"), "digits"),
    **dict.fromkeys(("default", "gpt-2", "gpt2", "mpt", "olmo", "jais"), "gpt2"),
}
_CONTROL, _USER_DEFINED = 3, 4
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_GGUF_SPECIAL_ID_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id",
                         "unk_token": "unknown_token_id", "pad_token": "padding_token_id"}


@dataclass
class Tokenizer:
    backend: _Backend
    source: Path
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token/eos_token/... text, for templates

    @classmethod
    def load(cls, source: str | Path) -> Tokenizer:
        """From a folder with tokenizer.json (+ tokenizer_config.json) or from a .gguf file."""
        p = Path(source).expanduser()
        if p.is_dir():
            return _load_folder(p)
        if p.is_file():
            state = read_tokenizer_state(p)
            return cls.from_state(state, p) if state is not None else _load_gguf(open_gguf(p))
        raise FileNotFoundError(f"{p}: no such folder or GGUF file; pass the model folder holding tokenizer.json "
                                f"or the model's .gguf file")

    def to_state(self) -> dict[str, Any]:
        """Everything but the source path, as JSON-able data (see `outrider.runtime.warm`)."""
        return {"backend": self.backend.to_str(), "eos_token_ids": list(self.eos_token_ids),
                "bos_token_id": self.bos_token_id, "chat_template": self.chat_template,
                "special_tokens": self.special_tokens}

    @classmethod
    def from_state(cls, state: dict[str, Any], source: Path) -> Tokenizer:
        return cls(_Backend.from_str(state["backend"]), source, tuple(state["eos_token_ids"]),
                   state["bos_token_id"], state["chat_template"], dict(state["special_tokens"]))

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Special tokens written in the text (e.g. <|im_start|> from a chat template) always map to their ids;
        # add_special_tokens only controls the BOS/EOS the tokenizer would add around the text.
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                            **template_vars: Any) -> str:
        """Render messages with the model's chat template, the way transformers does."""
        if self.chat_template is None:
            raise ValueError(f"{self.source}: the tokenizer has no chat template; use a chat/instruct model, or "
                             f"prompt with plain text instead of chat messages")
        variables = {**self.special_tokens, **template_vars}
        try:
            return _compile(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise ValueError(f"{self.source}: the chat template rejected the messages: {exc}") from exc

    def render(self, prompt: str, chat: bool) -> str:
        """The text the model sees: `prompt` as a user message in the chat template, or as it is."""
        return self.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenization: text appears as soon as it is complete, never half a UTF-8 character.

    Decodes a small window of recent ids, not everything, and takes the difference between the window with and
    without the newest ids. Decoding with context keeps decoders that treat the first token specially (leading
    spaces) consistent, so the pieces concatenate to exactly `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: first id not yet fully accounted for in emitted text
        self._read = 0  # ids before this have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_ids: list[int]) -> str:
        """Add ids; return the newly completed text ("" while a multi-byte character is still incomplete)."""
        self._ids.extend(token_ids)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        # A trailing U+FFFD is the decoder's stand-in for bytes of a character that later tokens will finish.
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def flush(self) -> str:
        """Emit whatever is held back (at end of generation, even an incomplete character)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):]


def _compile(template: str) -> jinja2.Template:
    # Same environment as transformers' chat templates, so prompts match what the model was trained on.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


# --- Hugging Face folders -------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); {REFETCH_HINT}") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _load_folder(folder: Path) -> Tokenizer:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; Outrider needs the fast-tokenizer file. Save one with "
                                f"`AutoTokenizer.from_pretrained(...).save_pretrained(folder)`, or {REFETCH_HINT}")
    try:
        backend = _Backend.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{path}: not a readable tokenizer.json ({exc}); {REFETCH_HINT}") from exc
    cfg = _read_json(folder / "tokenizer_config.json")
    specials = {k: t for k in _SPECIAL_KEYS if (t := _token_text(cfg.get(k))) is not None}
    model_cfg = _read_json(folder / "config.json")
    bos = backend.token_to_id(specials["bos_token"]) if "bos_token" in specials else model_cfg.get("bos_token_id")
    eos: list[Any] = [backend.token_to_id(specials["eos_token"])] if "eos_token" in specials else []
    # generation_config.json / config.json may add stop ids (Qwen2.5: <|im_end|> and <|endoftext|>).
    for extra in (_read_json(folder / "generation_config.json"), model_cfg):
        value = extra.get("eos_token_id")
        eos += value if isinstance(value, list) else [value]
    eos_ids = tuple(dict.fromkeys(int(e) for e in eos if e is not None))
    return Tokenizer(backend, folder, eos_ids, None if bos is None else int(bos),
                     _folder_chat_template(folder, cfg), specials)


def _folder_chat_template(folder: Path, cfg: dict[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template") or cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


# --- GGUF -----------------------------------------------------------------------------------------------------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _load_gguf(gf: GGUFFile) -> Tokenizer:
    model = gf.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{gf.path}: GGUF tokenizer model {model!r} is not supported; Outrider reads byte-level "
                         f"BPE (gpt2) vocabularies as in Qwen2 and SmolLM files; use the model's Hugging Face folder")
    tokens: list[str] = gf.require("tokenizer.ggml.tokens")
    types: list[int] = gf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{gf.path}: {len(tokens)} tokens but {len(types)} token types; the vocabulary metadata "
                         f"is damaged: {REFETCH_HINT}")
    backend = _gguf_backend(gf, tokens)
    _add_gguf_special_tokens(backend, tokens, types)
    specials = _gguf_special_texts(gf, tokens)
    bos = gf.get("tokenizer.ggml.bos_token_id")
    _set_post_processor(backend, gf, tokens)
    return Tokenizer(backend, gf.path, end_of_generation_ids(gf), None if bos is None else int(bos),
                     gf.get("tokenizer.chat_template"), specials)


def _gguf_backend(gf: GGUFFile, tokens: list[str]) -> _Backend:
    pre = str(gf.get("tokenizer.ggml.pre", "default"))
    family = _PRE_FAMILIES.get(pre)
    if family is None:
        raise ValueError(f"{gf.path}: GGUF pre-tokenizer {pre!r} is not supported (known: "
                         f"{', '.join(sorted(_PRE_FAMILIES))}); use the model's Hugging Face folder instead")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    # Every real byte-level token is spelled in the byte alphabet; re-spell the odd one that is not, as
    # transformers does, so lookups by text still work.
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in gf.get("tokenizer.ggml.merges") or []]
    # Llama 3's tokenizer.json (and llama.cpp for it) use a whole-word vocab hit before merging.
    backend = _Backend(models.BPE(vocab, merges, fuse_unk=False, ignore_merges=family == "llama3"))
    backend.pre_tokenizer = _pre_tokenizer(family)
    if family == "qwen2":
        backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json normalizes to NFC first
    backend.decoder = decoders.ByteLevel()
    return backend


def _pre_tokenizer(family: str) -> pre_tokenizers.PreTokenizer:
    if family in ("qwen2", "llama3"):
        split = _QWEN2_SPLIT if family == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's own regex
    if family == "digits":  # llama.cpp splits every digit off first for SmolLM/StarCoder vocabularies
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _add_gguf_special_tokens(backend: _Backend, tokens: list[str], types: list[int]) -> None:
    # Control tokens (<|im_start|>) must match whole and be skippable; user-defined ones (<tool_call>) match whole.
    alphabet = set(_bytes_to_unicode().values())
    control = [AddedToken(t, special=True, normalized=False)
               for t, k in zip(tokens, types, strict=True) if k == _CONTROL and set(t) <= alphabet]
    user = [AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True) if k == _USER_DEFINED and set(t) <= alphabet]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _gguf_special_texts(gf: GGUFFile, tokens: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, key in _GGUF_SPECIAL_ID_KEYS.items():
        tid = gf.get(f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= int(tid) < len(tokens):
            out[name] = tokens[int(tid)]
    return out


def _set_post_processor(backend: _Backend, gf: GGUFFile, tokens: list[str]) -> None:
    # encode(add_special_tokens=True) adds BOS/EOS only where the file asks for it, as llama.cpp does.
    pieces: list[str] = ["$A"]
    special: dict[str, int] = {}
    for flag, key in (("add_bos_token", "bos_token_id"), ("add_eos_token", "eos_token_id")):
        tid = gf.get(f"tokenizer.ggml.{key}")
        if gf.get(f"tokenizer.ggml.{flag}") and tid is not None and 0 <= int(tid) < len(tokens):
            text = tokens[int(tid)]
            special[text] = int(tid)
            pieces = [text, *pieces] if flag == "add_bos_token" else [*pieces, text]
    if special:
        backend.post_processor = processors.TemplateProcessing(single=" ".join(pieces),
                                                               special_tokens=list(special.items()))
