"""Test helper: tiny random models written as Hugging Face folders (config.json, safetensors, tokenizer), so
actors, the service and the HTTP server load them exactly as they load real checkpoints — by path."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import random_state
from gguf_writer import save_tokenizer_folder, tiny_hf_config, train_tiny_vocab
from safetensors.torch import save_file


def write_tiny_folder(folder: Path, seed: int, layers: int = 2, arch: str = "llama") -> Path:
    """A tiny random model over the tests' byte-level BPE vocabulary (300 tokens, ChatML specials)."""
    vocab = train_tiny_vocab()
    cfg = tiny_hf_config(arch, vocab) | {"num_hidden_layers": layers, "max_position_embeddings": 1024}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in random_state(cfg, seed).items()}
    save_file(state, str(folder / "model.safetensors"))
    save_tokenizer_folder(vocab, folder)
    return folder


def write_tiny_pair(root: Path) -> tuple[Path, Path]:
    """(target, draft): a 4-layer target and an unrelated 2-layer draft, sharing the vocabulary."""
    return write_tiny_folder(root / "target", seed=1, layers=4), write_tiny_folder(root / "draft", seed=2)
