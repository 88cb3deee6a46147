"""Test helper: tiny byte-level BPE vocabularies and tiny GGUF files written the way llama.cpp's converter does.

`write_gguf` mirrors convert_hf_to_gguf.py for Llama/Mistral (architecture "llama", q/k rows permuted for GGML's
RoPE) and Qwen2 (architecture "qwen2", no permutation), so loaders can be checked against transformers' GGUF
loader on files small enough to build in milliseconds.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs.",
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Hello world! Hello there, how are you today? I'm fine, thanks.",
    "café naïve résumé — über straße 日本語 中文 😀 🎉",
]
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


@dataclass
class TinyVocab:
    """A byte-level BPE vocabulary as GGUF metadata stores it."""

    tokens: list[str]
    merges: list[str]
    token_types: list[int]  # 1 normal, 3 control
    tokenizer: Tokenizer  # the same vocabulary as a `tokenizers` object (what tokenizer.json would hold)

    def token_id(self, text: str) -> int:
        return self.tokens.index(text)


def train_tiny_vocab(vocab_size: int = 300) -> TinyVocab:
    """Train a GPT-2-style byte-level BPE with the ChatML special tokens first (ids 0, 1, 2)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == vocab_size and [vocab[t] for t in tokens] == list(range(vocab_size))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in SPECIAL_TOKENS else 1 for t in tokens]
    return TinyVocab(tokens, merges, types, tok)


def save_tokenizer_folder(vocab: TinyVocab, folder: Path, chat_template: str = CHATML_TEMPLATE) -> Path:
    """Write tokenizer.json + tokenizer_config.json as a Hugging Face model folder has them."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab.tokenizer.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "unk_token": None, "chat_template": chat_template,
              "add_bos_token": False, "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def gguf_arch(hf_config: dict[str, Any]) -> str:
    # llama.cpp converts Mistral checkpoints to the llama architecture.
    return "qwen2" if hf_config["model_type"] == "qwen2" else "llama"


def gguf_tensor_name(hf_name: str) -> str:
    stem, suffix = hf_name.rsplit(".", 1)
    if stem in _GLOBAL:
        return f"{_GLOBAL[stem]}.{suffix}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}.{suffix}"


def llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """`LlamaModel.permute` from convert_hf_to_gguf.py: rotate-half rows -> GGML's interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, state_dict: dict[str, torch.Tensor], hf_config: dict[str, Any], vocab: TinyVocab, *,
               tensor_type: str = "F32", pre: str = "gpt-2", chat_template: str | None = CHATML_TEMPLATE,
               name: str = "tiny test model") -> Path:
    """Write `state_dict` (Hugging Face names) as a GGUF file; 2-D weights in `tensor_type`, 1-D ones in F32."""
    arch = gguf_arch(hf_config)
    writer = gguf.GGUFWriter(str(path), arch)
    _add_model_metadata(writer, hf_config, name)
    _add_tokenizer_metadata(writer, vocab, hf_config, pre, chat_template)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    for hf_name, tensor in state_dict.items():
        if hf_name == "lm_head.weight" and hf_config.get("tie_word_embeddings"):
            continue  # llama.cpp drops the tied copy; readers infer tying from its absence
        data = _llama_cpp_layout(hf_name, tensor.detach().float().numpy(), hf_config, arch)
        _add_tensor(writer, gguf_tensor_name(hf_name), data, qtype if data.ndim == 2 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _llama_cpp_layout(hf_name: str, data: np.ndarray, cfg: dict[str, Any], arch: str) -> np.ndarray:
    if arch != "llama":
        return data
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if ".q_proj." in hf_name:
        return llama_permute(data, heads)
    if ".k_proj." in hf_name:
        return llama_permute(data, kv_heads)
    return data


def _add_tensor(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType | None
                ) -> None:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
        writer.add_tensor(name, data)
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _add_model_metadata(writer: gguf.GGUFWriter, cfg: dict[str, Any], name: str) -> None:
    heads = cfg["num_attention_heads"]
    writer.add_name(name)
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    writer.add_rope_freq_base(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind in ("linear", "yarn"):
        writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
        writer.add_rope_scaling_factor(rope["factor"])
    if kind == "yarn":
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)


def _add_tokenizer_metadata(writer: gguf.GGUFWriter, vocab: TinyVocab, cfg: dict[str, Any], pre: str,
                            chat_template: str | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    eos = cfg.get("eos_token_id")
    if cfg.get("bos_token_id") is not None:
        writer.add_bos_token_id(cfg["bos_token_id"])
    if eos is not None:
        writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


def tiny_hf_config(model_type: str, vocab: TinyVocab) -> dict[str, Any]:
    """config.json of a tiny Llama/Qwen2/Mistral model whose vocabulary is `vocab` (hidden 64, 2 layers)."""
    cfg: dict[str, Any] = {
        "model_type": model_type, "vocab_size": len(vocab.tokens), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 512, "tie_word_embeddings": False,
        "bos_token_id": vocab.token_id("<|endoftext|>"),
        # <|endoftext|> is listed too: GGUF readers stop on it by its text, as llama.cpp does
        "eos_token_id": [vocab.token_id("<|im_end|>"), vocab.token_id("<|endoftext|>")],
    }
    if model_type == "qwen2":
        cfg |= {"tie_word_embeddings": True, "rope_theta": 1000000.0, "use_sliding_window": False,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}
    if model_type == "mistral":
        cfg |= {"sliding_window": 16, "rms_norm_eps": 1e-5}
    return cfg


def smollm2_path() -> Path:
    """The real SmolLM2 GGUF that `make test` pulls into the model cache; fail loudly without it."""
    from outrider import hub

    path = hub.model_path("smollm2-135m-instruct")
    if not path.is_file():
        pytest.fail(f"{path} is missing; run `outrider models pull smollm2-135m-instruct` (make test does)")
    return path
