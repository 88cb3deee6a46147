"""Warm starts: what a start needs from a GGUF besides its weights — the model config and the tokenizer — kept in
a small JSON file beside it, so a warm start never parses the GGUF metadata.

Parsing costs seconds: the tokenizer lives in the metadata as ~300k strings (151,936 tokens and the merges of a
Qwen vocabulary), and gguf-py reads them one by one. The converted weights are cached beside the GGUF already
(`loading.converted_cache_path`); with this file next to them a warm start only maps tensors and reads JSON.

The file records the GGUF's size and mtime; a re-fetched or edited GGUF makes it stale, and it is rebuilt.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from outrider.runtime.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)
VERSION = 1
SUFFIX = f".outrider-meta-v{VERSION}.json"


def meta_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + SUFFIX)


def _stamp(gguf: Path) -> dict[str, int]:
    st = gguf.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def write_meta(gguf: Path, config: ModelConfig, tokenizer_state: dict) -> None:
    """Record the config and tokenizer (`Tokenizer.to_state()`) of `gguf` beside it (best effort: a read-only
    folder costs only speed)."""
    doc = {"version": VERSION, "gguf": _stamp(gguf), "config": dataclasses.asdict(config),
           "tokenizer": tokenizer_state}
    path = meta_path(gguf)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc), encoding="utf-8")
        tmp.replace(path)
    except OSError as e:
        log.warning("could not cache the metadata of %s at %s: %s", gguf, path, e)
        tmp.unlink(missing_ok=True)


def read_config(gguf: Path) -> ModelConfig | None:
    """The recorded config, or None when absent, stale (the GGUF changed) or unreadable."""
    doc = _read(gguf)
    if doc is None:
        return None
    cfg = dict(doc["config"])
    cfg["rope_scaling"] = RopeScaling(**cfg["rope_scaling"])
    cfg["eos_token_ids"] = tuple(cfg["eos_token_ids"])
    return ModelConfig(**cfg)


def read_tokenizer_state(gguf: Path) -> dict | None:
    """The recorded tokenizer (`Tokenizer.from_state` takes it), or None when absent, stale or unreadable."""
    doc = _read(gguf)
    return None if doc is None else doc["tokenizer"]


def _read(gguf: Path) -> dict | None:
    path, stamp = meta_path(gguf), _stamp(gguf)
    if not path.is_file():
        return None
    return _read_stamped(path, path.stat().st_mtime_ns, stamp["size"], stamp["mtime_ns"])


@lru_cache(maxsize=4)
def _read_stamped(path: Path, written_ns: int, size: int, mtime_ns: int) -> dict | None:
    # Both files' times are in the key: a rewritten record or a re-fetched GGUF is read again.
    del written_ns
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("version") != VERSION or doc.get("gguf") != {"size": size, "mtime_ns": mtime_ns}:
            return None
        doc["config"]["rope_scaling"], doc["tokenizer"]["backend"]  # noqa: B018 — the keys must be there
        return doc
    except (OSError, ValueError, KeyError, TypeError) as e:  # damaged: parse the GGUF instead, and rewrite it
        log.warning("ignoring unreadable metadata cache %s: %s", path, e)
        return None
