"""llama.cpp GGUF files: model config, lazily dequantized tensors under Hugging Face names, raw metadata.

Reading goes through `gguf.GGUFReader`, which memory-maps the file: opening parses only the metadata and
the tensor table, and each tensor is dequantized to float32 when it is asked for.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from outrider.runtime.config import ModelConfig, RopeScaling

SUPPORTED_GGUF_ARCHS = ("llama", "qwen2")
REFETCH_HINT = "re-fetch it (`outrider models pull NAME` for the built-in models)"

# Control tokens llama.cpp treats as end-of-generation by their text even when the file's eos id names
# another one (Qwen GGUFs set eos to <|im_end|>, yet a model can still end with <|endoftext|>).
_EOG_TOKEN_TEXTS = frozenset({
    "<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>", "<end_of_turn>",
})
_CONTROL_TOKEN_TYPE = 3

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class _PlainViewReader(GGUFReader):
    """GGUFReader that slices a plain ndarray view of its memory map instead of the np.memmap itself.

    The reader slices once per metadata string (~300k times for a Qwen vocabulary and merges), and numpy's
    memmap subclass makes every slice several times dearer; the view shares the same mapping, copying nothing.
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self.__dict__.get("_plain")
        if plain is None:
            plain = self._plain = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))


class GGUFFile:
    """An opened GGUF file: its metadata and tensor table, checked against the file's size."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._reader = _PlainViewReader(path)
        except (PermissionError, IsADirectoryError):
            raise  # access problems already name the file and are not damage
        except Exception as exc:  # the reader signals damage with ValueError, IndexError, struct errors...
            raise ValueError(f"{path}: not a readable GGUF file ({exc}); the file is damaged, truncated or not "
                             f"GGUF at all: {REFETCH_HINT}") from exc
        self.tensors: dict[str, ReaderTensor] = {t.name: t for t in self._reader.tensors}
        self._check_extent()

    def _check_extent(self) -> None:
        # A file cut at a tensor boundary parses cleanly; only the offsets reveal the missing data.
        size = self.path.stat().st_size
        for t in self.tensors.values():
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"{self.path}: tensor {t.name} runs past the end of the file ({size} bytes); "
                                 f"the file is truncated: {REFETCH_HINT}")

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: GGUF metadata key {key!r} is missing; the file was not written by a "
                             f"llama.cpp converter Outrider understands: {REFETCH_HINT}")
        return value

    @property
    def architecture(self) -> str:
        return str(self.require("general.architecture"))


def open_gguf(path: str | Path) -> GGUFFile:
    """Open (or reuse) a GGUF file; the checkpoint and tokenizer loaders share one parse of the metadata."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such GGUF file; check the path, or `outrider models pull NAME` "
                                f"for a built-in model")
    st = p.stat()
    return _open_cached(p.resolve(), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _open_cached(path: Path, mtime_ns: int, size: int) -> GGUFFile:
    # mtime and size are part of the key so a re-fetched file is parsed again.
    del mtime_ns, size
    return GGUFFile(path)


def end_of_generation_ids(gf: GGUFFile) -> tuple[int, ...]:
    """eos, eot and eom ids from the metadata, then the control tokens llama.cpp also stops on."""
    ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = gf.get(key)
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    tokens = gf.get("tokenizer.ggml.tokens") or []
    types = gf.get("tokenizer.ggml.token_type") or []
    for i, (text, kind) in enumerate(zip(tokens, types, strict=False)):
        if kind == _CONTROL_TOKEN_TYPE and text in _EOG_TOKEN_TEXTS and i not in ids:
            ids.append(i)
    return tuple(ids)


def _hf_name(gf: GGUFFile, gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise ValueError(f"{gf.path}: tensor {gguf_name!r} is not part of a {'/'.join(SUPPORTED_GGUF_ARCHS)} "
                         f"model Outrider runs; use a plain Llama/Qwen2 GGUF or the model's Hugging Face folder")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def _torch_shape(t: ReaderTensor) -> tuple[int, ...]:
    # GGUF lists dimensions innermost first (ne[0] = in-features); torch wants [out, in].
    return tuple(int(n) for n in reversed(t.shape.tolist()))


def _undo_rope_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of `LlamaModel.permute` in llama.cpp's convert_hf_to_gguf.py.

    The converter reorders each head's rows from HF's rotate-half layout to GGML's interleaved pairs:
    it views rows as [head, 2, half] and swaps the last two. Viewing as [head, half, 2] and swapping back undoes it.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


class GGUFTensorSource:
    """The tensors of a GGUF file under Hugging Face names, dequantized to float32 one at a time."""

    def __init__(self, gf: GGUFFile, config: ModelConfig) -> None:
        self._gf = gf
        self._config = config
        self._permuted = gf.architecture == "llama"  # llama.cpp permutes q/k for llama, not for qwen2
        self._by_name = {_hf_name(gf, name): t for name, t in gf.tensors.items()}

    def names(self) -> list[str]:
        return list(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def storage_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def _tensor(self, name: str) -> ReaderTensor:
        t = self._by_name.get(name)
        if t is None:
            raise KeyError(f"{self._gf.path}: no tensor {name!r}")
        return t

    def raw(self, name: str) -> tuple[str, torch.Tensor]:
        """The tensor's blocks as the file stores them: (type name, uint8 [out_features, row bytes]), rows in the
        order `get` returns them (llama's q/k row permutation undone)."""
        t = self._tensor(name)
        data = torch.from_numpy(np.array(t.data, dtype=np.uint8, copy=True)).reshape(_torch_shape(t)[0], -1)
        return t.tensor_type.name, self._hf_row_order(name, data)

    def _hf_row_order(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Undo llama.cpp's q/k row permutation (llama only) on a tensor's rows, values or raw blocks alike."""
        if self._permuted and name.split(".")[-2] in ("q_proj", "k_proj"):
            heads = self._config.num_heads if ".q_proj." in name else self._config.num_kv_heads
            return _undo_rope_permute(rows, heads)
        return rows

    def get(self, name: str) -> torch.Tensor:
        t = self._tensor(name)
        try:
            data = dequantize(t.data, t.tensor_type)
        except NotImplementedError as exc:
            raise ValueError(f"{self._gf.path}: tensor {t.name} is stored as {t.tensor_type.name}, which the gguf "
                             f"package cannot dequantize; use a file quantized as F16, BF16, Q8_0, Q4_K or Q6_K"
                             ) from exc
        # F32 comes back as a read-only view of the memory map; copy so torch owns writable memory.
        arr = data.astype(np.float32) if (data.dtype != np.float32 or not data.flags.writeable) else data
        return self._hf_row_order(name, torch.from_numpy(arr).reshape(_torch_shape(t)))


def gguf_model_config(gf: GGUFFile) -> ModelConfig:
    """Translate a GGUF's llama.cpp metadata into the ModelConfig its Hugging Face config.json would give."""
    arch = gf.architecture
    if arch not in SUPPORTED_GGUF_ARCHS:
        raise ValueError(f"{gf.path}: GGUF architecture {arch!r} is not supported; Outrider runs "
                         f"{', '.join(SUPPORTED_GGUF_ARCHS)} GGUF files (Mistral converts as llama)")
    for needed in ("token_embd.weight", "blk.0.attn_q.weight"):
        if needed not in gf.tensors:
            raise ValueError(f"{gf.path}: tensor {needed} is missing; the file is incomplete: {REFETCH_HINT}")
    heads = int(gf.require(f"{arch}.attention.head_count"))
    context = int(gf.get(f"{arch}.context_length", 4096))
    bos = gf.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        arch=arch,
        # The embedding's row count is what the weights need; metadata vocab sizes sometimes disagree.
        vocab_size=_torch_shape(gf.tensors["token_embd.weight"])[0],
        hidden_size=int(gf.require(f"{arch}.embedding_length")),
        intermediate_size=int(gf.require(f"{arch}.feed_forward_length")),
        num_layers=int(gf.require(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=_kv_heads(gf, arch, heads),
        # q's out-features give the head size even for models whose head_dim != hidden/heads.
        head_dim=_torch_shape(gf.tensors["blk.0.attn_q.weight"])[0] // heads,
        rms_norm_eps=_f32(gf.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=_f32(gf.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(gf, arch, context),
        max_position=context,
        tie_embeddings="output.weight" not in gf.tensors,
        qkv_bias=arch == "qwen2" or "blk.0.attn_q.bias" in gf.tensors,
        sliding_window=None,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=end_of_generation_ids(gf),
    )


def _f32(value: Any) -> float:
    """GGUF stores these as float32; recover the decimal the converter was given (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _kv_heads(gf: GGUFFile, arch: str, heads: int) -> int:
    value = gf.get(f"{arch}.attention.head_count_kv", heads)
    if isinstance(value, list):  # per-layer counts; a Llama-family model has one value throughout
        if len(set(value)) != 1:
            raise ValueError(f"{gf.path}: per-layer KV head counts {sorted(set(value))} are not supported; "
                             f"Outrider runs models with one KV head count for every layer")
        value = value[0]
    return int(value)


def _rope_scaling(gf: GGUFFile, arch: str, context: int) -> RopeScaling:
    if "rope_freqs.weight" in gf.tensors:
        raise ValueError(f"{gf.path}: per-dimension RoPE frequencies (rope_freqs.weight, Llama 3.1-style "
                         f"scaling) are not supported from GGUF; load the model's Hugging Face folder instead")
    kind = str(gf.get(f"{arch}.rope.scaling.type", "none"))
    factor = _f32(gf.get(f"{arch}.rope.scaling.factor", 1.0))
    if kind == "none" and gf.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", _f32(gf.get(f"{arch}.rope.scale_linear"))  # the key older converters wrote
    if kind == "none" or (kind == "linear" and factor == 1.0):
        return RopeScaling()
    if kind == "linear":
        return RopeScaling(kind="linear", factor=factor)
    if kind == "yarn":
        return RopeScaling(
            kind="yarn",
            factor=factor,
            original_max_position=int(gf.get(f"{arch}.rope.scaling.original_context_length", context)),
            beta_fast=_f32(gf.get(f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            beta_slow=_f32(gf.get(f"{arch}.rope.scaling.yarn_beta_slow", 1.0)),
        )
    raise ValueError(f"{gf.path}: RoPE scaling type {kind!r} is not supported; Outrider handles none, linear "
                     f"and yarn in GGUF files")
