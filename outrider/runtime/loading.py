"""Turn a checkpoint (HF folder or GGUF) into a `Transformer` in a chosen dtype and weight format.

Converting the default target from GGUF costs seconds (dequantize + requantize), so the converted tensors are
cached as safetensors beside the GGUF; a warm start maps them instead.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from outrider.kernels.linear import WEIGHT_CHOICES, LinearKernel, linear_from_state, make_linear
from outrider.runtime.config import ModelConfig
from outrider.runtime.memory import in_huge_pages
from outrider.runtime.model import LayerWeights, ModelWeights, Transformer
from outrider.runtime.tokenizer import Tokenizer
from outrider.runtime.warm import read_config, write_meta

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # part of the cache file name: bump it when any format's stored layout changes
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
LINEARS = ("qkv", "o", "gate_up", "down")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of float32, bfloat16, float16")
    return DTYPES[name]


RawGetter = Callable[[str], "tuple[str, torch.Tensor]"]


def build_weights(config: ModelConfig, get: Callable[[str], torch.Tensor], dtype: torch.dtype,
                  fmt: str, device: torch.device, raw: RawGetter | None = None) -> ModelWeights:
    """Fuse q/k/v and gate/up, then quantize every linear into `fmt`. `get` returns fp32 HF-named tensors; `raw`
    (GGUF files) returns a tensor's blocks as stored, which `gguf` keeps instead of requantizing."""
    def norm(name: str) -> torch.Tensor:
        return get(name).to(dtype).to(device)

    def linear(names: list[str], bias: torch.Tensor | None = None) -> LinearKernel:
        if fmt == "gguf":
            return _gguf_linear(names, bias, get, raw, dtype)
        w = torch.cat([get(n) for n in names]) if len(names) > 1 else get(names[0])
        return make_linear(fmt, w, bias, dtype, device)

    if fmt == "gguf" and device.type != "cpu":  # the other formats go through make_linear, which checks this
        raise ValueError(f"weight format 'gguf' runs on the CPU only; use dense weights on {device}")
    layers = []
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        bias = torch.cat([get(f"{p}self_attn.{n}_proj.bias") for n in "qkv"]) if config.qkv_bias else None
        layers.append(LayerWeights(
            input_norm=norm(f"{p}input_layernorm.weight"),
            qkv=linear([f"{p}self_attn.{n}_proj.weight" for n in "qkv"], bias),
            o=linear([f"{p}self_attn.o_proj.weight"]),
            post_norm=norm(f"{p}post_attention_layernorm.weight"),
            gate_up=linear([f"{p}mlp.gate_proj.weight", f"{p}mlp.up_proj.weight"]),
            down=linear([f"{p}mlp.down_proj.weight"]),
        ))
    embed = get("model.embed_tokens.weight")
    head = "model.embed_tokens.weight" if config.tie_embeddings else "lm_head.weight"
    return ModelWeights(embed.to(dtype).to(device), layers, norm("model.norm.weight"), linear([head]))


def _gguf_linear(names: list[str], bias: torch.Tensor | None, get: Callable[[str], torch.Tensor],
                 raw: RawGetter | None, dtype: torch.dtype) -> LinearKernel:
    """The file's blocks where a kernel runs their type; any other tensor (F16, Q4_1, an HF checkpoint) as Q8_0."""
    from outrider.kernels.gguf import BLOCK, GGUFLinear, quantize_blocks

    parts = []
    for name in names:
        stored = raw(name) if raw is not None else None
        parts.append(stored if stored is not None and stored[0] in BLOCK else ("Q8_0", quantize_blocks(get(name))))
    return GGUFLinear.from_raw(parts, bias, dtype)


def weights_state(w: ModelWeights) -> dict[str, torch.Tensor]:
    state = {"embed": w.embed, "norm": w.norm}
    state |= {f"head.{k}": t for k, t in w.head.state().items()}
    for i, lw in enumerate(w.layers):
        state |= {f"layers.{i}.input_norm": lw.input_norm, f"layers.{i}.post_norm": lw.post_norm}
        for name in LINEARS:
            state |= {f"layers.{i}.{name}.{k}": t for k, t in getattr(lw, name).state().items()}
    seen: set[int] = set()
    out = {}
    for k, v in state.items():  # safetensors refuses shared storage (a tied fp32 head is the embedding itself)
        v = v.contiguous()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


def weights_from_state(config: ModelConfig, fmt: str, state: dict[str, torch.Tensor]) -> ModelWeights:
    def sub(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

    layers = [LayerWeights(state[f"layers.{i}.input_norm"],
                           linear_from_state(fmt, sub(f"layers.{i}.qkv.")),
                           linear_from_state(fmt, sub(f"layers.{i}.o.")),
                           state[f"layers.{i}.post_norm"],
                           linear_from_state(fmt, sub(f"layers.{i}.gate_up.")),
                           linear_from_state(fmt, sub(f"layers.{i}.down.")))
              for i in range(config.num_layers)]
    return ModelWeights(state["embed"], layers, state["norm"], linear_from_state(fmt, sub("head.")))


def converted_cache_path(source: Path, dtype: torch.dtype, fmt: str) -> Path:
    tag = f"{fmt}-{str(dtype).removeprefix('torch.')}-v{CACHE_VERSION}"
    return source.with_name(f"{source.name}.outrider-{tag}.safetensors")


def resolve_format(fmt: str, source: Path, config: ModelConfig, device: torch.device, draft: bool = False) -> str:
    """`auto`: on a CPU that runs our kernels at any of their levels (AVX2 + FMA + F16C or AVX512-VNNI), a GGUF
    file's own blocks (exact, the fastest format measured here), and for a draft (its numerics never reach the
    output) every linear requantized to Q4_0, cheaper per step still; on a CPU with neither int4, on a GPU dense.
    Any other name is taken as given."""
    if fmt != "auto":
        return fmt
    if device.type != "cpu":
        return "dense"
    from outrider.kernels.native import supported_levels

    if not supported_levels():
        return "int4"
    inputs = (config.hidden_size, config.num_heads * config.head_dim, config.intermediate_size)
    if draft and all(k % 32 == 0 for k in inputs):  # Q4_0 blocks of 32
        return "q4_0"
    return "gguf" if source.suffix == ".gguf" else "int4"


def load_model(path: str | Path, dtype: str | torch.dtype = "bfloat16", weights: str = "dense",
               device: str = "cpu", max_positions: int | None = None, use_cache: bool = True,
               batch_invariant: bool = True):
    """Load a model from a built-in name, an HF folder or a GGUF file. Returns (Transformer, Checkpoint).
    batch_invariant=False loads a draft (cheaper attention, and `auto` weights resolve to a draft's format)."""
    from outrider.hub import resolve
    from outrider.runtime.checkpoint import load_checkpoint

    if weights not in WEIGHT_CHOICES:
        raise ValueError(f"unknown weight format {weights!r}; choose one of {', '.join(WEIGHT_CHOICES)}")
    dtype, dev = parse_dtype(dtype), torch.device(device)
    ckpt = load_checkpoint(resolve(str(path)))
    weights = resolve_format(weights, ckpt.path, ckpt.config, dev, draft=not batch_invariant)
    cached = converted_cache_path(ckpt.path, dtype, weights) if ckpt.path.is_file() else None
    t0 = time.perf_counter()
    if use_cache and cached is not None and cached.exists() and dev.type == "cpu":
        w = weights_from_state(ckpt.config, weights, _load_aligned(cached))
        log.info("mapped converted weights %s in %.1fs", cached, time.perf_counter() - t0)
    else:
        w = build_weights(ckpt.config, ckpt.tensors.get, dtype, weights, dev, getattr(ckpt.tensors, "raw", None))
        log.info("converted %s to %s/%s in %.1fs", ckpt.path, weights, dtype, time.perf_counter() - t0)
        if dev.type == "cpu":
            state = weights_state(w)
            if use_cache and cached is not None:
                _save_atomic(state, cached, ckpt)
            w = weights_from_state(ckpt.config, weights, in_huge_pages(state))
    if use_cache and cached is not None and read_config(ckpt.path) is None:
        # the next start skips the metadata parse
        write_meta(ckpt.path, ckpt.config, Tokenizer.load(ckpt.path).to_state())
    return Transformer(ckpt.config, w, dtype, dev, max_positions, batch_invariant), ckpt


def _load_aligned(path: Path) -> dict[str, torch.Tensor]:
    """safetensors hands out tensors at arbitrary file offsets; the packed aten kernels use aligned vector loads
    and crash on them (seen: a segfault in _weight_int8pack_mm), so each tensor is copied into fresh, page-aligned
    memory, in huge pages (`memory.py`)."""
    with safe_open(str(path), "pt") as f:
        return in_huge_pages({name: f.get_tensor(name) for name in f.keys()})


def _save_atomic(state: dict[str, torch.Tensor], path: Path, ckpt) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(state, str(tmp), metadata={"source": str(ckpt.path),
                                              "types": json.dumps(ckpt.tensor_types())[:60000]})
        tmp.replace(path)
    except OSError as e:  # a read-only model folder only costs the warm start
        log.warning("could not cache converted weights at %s: %s", path, e)
        tmp.unlink(missing_ok=True)
