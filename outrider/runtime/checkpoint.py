"""Loading model checkpoints: Hugging Face folders (config.json + safetensors) and llama.cpp GGUF files.

Either way the result is a ModelConfig plus a lazy TensorSource that hands out float32 tensors under Hugging
Face names, one at a time, so a quantized model is never held whole in float32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

from outrider.runtime.config import ModelConfig
from outrider.runtime.gguf_file import REFETCH_HINT, GGUFTensorSource, gguf_model_config, open_gguf
from outrider.runtime.warm import read_config

_GGUF_MAGIC = b"GGUF"
_INDEX_FILE = "model.safetensors.index.json"


@runtime_checkable
class TensorSource(Protocol):
    """Lazy access to a checkpoint's tensors, named in Hugging Face convention, in nn.Linear [out, in] layout."""

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor as float32 (dequantized if the file stores it quantized)."""
        ...

    def storage_type(self, name: str) -> str:
        """How the file stores the tensor: "F32", "BF16", "Q4_K", ..."""
        ...

    def __contains__(self, name: object) -> bool: ...


@dataclass
class Checkpoint:
    path: Path  # the folder or .gguf file it came from
    config: ModelConfig
    tensors: TensorSource
    tokenizer_source: Path  # folder with tokenizer.json, or the .gguf file

    def tensor_types(self) -> dict[str, str]:
        """Tensor name -> storage type, for logging what precision a model really runs from."""
        return {name: self.tensors.storage_type(name) for name in self.tensors.names()}


def expected_tensor_names(config: ModelConfig) -> list[str]:
    """Every tensor a model of this config needs, in Hugging Face names."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{x}_proj.weight" for x in "qkvo"]
        names += [f"{p}mlp.{x}_proj.weight" for x in ("gate", "up", "down")]
        if config.qkv_bias:
            names += [f"{p}self_attn.{x}_proj.bias" for x in "qkv"]
    return names


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Open a Hugging Face model folder or a .gguf file; tensors are read lazily."""
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or folder; pass a Hugging Face model folder "
                                f"(config.json + *.safetensors) or a .gguf file")
    if p.is_dir():
        ckpt = _load_hf_folder(p)
    elif p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        config = read_config(p)  # recorded by an earlier load: no metadata parse, the file was checked then
        if config is not None:
            return Checkpoint(path=p, config=config, tensors=_DeferredGGUFTensors(p, config), tokenizer_source=p)
        ckpt = _load_gguf(p)
    else:
        raise ValueError(f"{p}: neither a folder nor a GGUF file; pass the Hugging Face model folder that holds "
                         f"config.json and *.safetensors, or a .gguf file")
    _check_complete(ckpt)
    return ckpt


def _has_gguf_magic(p: Path) -> bool:
    with p.open("rb") as f:
        return f.read(4) == _GGUF_MAGIC


def _check_complete(ckpt: Checkpoint) -> None:
    missing = [n for n in expected_tensor_names(ckpt.config) if n not in ckpt.tensors]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"{ckpt.path}: checkpoint lacks tensors the config requires ({shown}); the download is "
                         f"incomplete or the model is not a Llama/Qwen2/Mistral checkpoint: {REFETCH_HINT}")


def _load_gguf(p: Path) -> Checkpoint:
    gf = open_gguf(p)
    config = gguf_model_config(gf)
    return Checkpoint(path=p, config=config, tensors=GGUFTensorSource(gf, config), tokenizer_source=p)


class _DeferredGGUFTensors:
    """A GGUF's tensors, its metadata parsed only when a tensor is first asked for (warm starts never do)."""

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path, self.config = path, config
        self._source: GGUFTensorSource | None = None

    def _opened(self) -> GGUFTensorSource:
        if self._source is None:
            self._source = GGUFTensorSource(open_gguf(self.path), self.config)
        return self._source

    def names(self) -> list[str]:
        return self._opened().names()

    def get(self, name: str) -> torch.Tensor:
        return self._opened().get(name)

    def storage_type(self, name: str) -> str:
        return self._opened().storage_type(name)

    def raw(self, name: str) -> tuple[str, torch.Tensor]:
        return self._opened().raw(name)


def _load_hf_folder(folder: Path) -> Checkpoint:
    config = _hf_config(folder)
    files = _weight_files(folder)
    return Checkpoint(path=folder, config=config, tensors=SafetensorsSource(files, config),
                      tokenizer_source=folder)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); {REFETCH_HINT}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level; {REFETCH_HINT}")
    return data


def _hf_config(folder: Path) -> ModelConfig:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing; a Hugging Face model folder needs config.json next to its "
                                f"*.safetensors (save the model with `save_pretrained`, or {REFETCH_HINT})")
    try:
        config = ModelConfig.from_hf(_read_json(cfg_path))
    except KeyError as exc:
        raise ValueError(f"{cfg_path}: required field {exc} is missing; {REFETCH_HINT}") from exc
    except ValueError as exc:
        raise ValueError(f"{cfg_path}: {exc}") from exc
    return _with_generation_eos(folder, config)


def _with_generation_eos(folder: Path, config: ModelConfig) -> ModelConfig:
    # generation_config.json often lists more stop ids than config.json (Qwen2.5: <|im_end|> and <|endoftext|>).
    gen_path = folder / "generation_config.json"
    if not gen_path.is_file():
        return config
    eos = _read_json(gen_path).get("eos_token_id")
    extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *(int(e) for e in extra)]))
    return replace(config, eos_token_ids=merged)


def _weight_files(folder: Path) -> list[Path]:
    index = folder / _INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: has no weight_map object; {REFETCH_HINT}")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        hint = (" (it has PyTorch .bin weights: re-save with `save_pretrained(..., safe_serialization=True)`)"
                if any(folder.glob("*.bin")) else "")
        raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}; Outrider reads safetensors "
                                f"checkpoints: {REFETCH_HINT}")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing weight shard listed in {index}; the download is incomplete: "
                                    f"{REFETCH_HINT}")
    return files


class SafetensorsSource:
    """Tensors of one or more safetensors files, memory-mapped and converted to float32 on demand."""

    def __init__(self, files: list[Path], config: ModelConfig) -> None:
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for f in files:
            for name in self._open(f).keys():
                if _keep(name, config):
                    self._where[name] = f

    def _open(self, f: Path) -> Any:
        if f not in self._handles:
            try:
                self._handles[f] = safe_open(str(f), framework="pt")
            except (SafetensorError, OSError) as exc:
                raise ValueError(f"{f}: not a readable safetensors file ({exc}); the file is damaged, truncated or "
                                 f"not safetensors at all: {REFETCH_HINT}") from exc
        return self._handles[f]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def _file(self, name: str) -> Path:
        if name not in self._where:
            raise KeyError(f"no tensor {name!r} in {sorted({str(f) for f in self._handles})}")
        return self._where[name]

    def storage_type(self, name: str) -> str:
        return str(self._open(self._file(name)).get_slice(name).get_dtype())

    def get(self, name: str) -> torch.Tensor:
        f = self._file(name)
        try:
            tensor = self._open(f).get_tensor(name)
        except SafetensorError as exc:
            raise ValueError(f"{f}: tensor {name} cannot be read ({exc}); {REFETCH_HINT}") from exc
        return tensor.to(torch.float32)


def _keep(name: str, config: ModelConfig) -> bool:
    # Old checkpoints carry RoPE buffers; tied checkpoints sometimes still store a copy of the embedding.
    if name.endswith("rotary_emb.inv_freq"):
        return False
    return not (config.tie_embeddings and name == "lm_head.weight")
