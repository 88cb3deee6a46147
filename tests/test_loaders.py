"""Checkpoint loading: HF folders (single and sharded safetensors) and GGUF files agree with the model's
state dict and with transformers' own GGUF loader (including llama.cpp's q/k permutation), errors name the file."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from gguf_writer import TinyVocab, smollm2_path, tiny_hf_config, train_tiny_vocab, write_gguf

from outrider.runtime.checkpoint import expected_tensor_names, load_checkpoint
from outrider.runtime.config import ModelConfig, RopeScaling
from outrider.runtime.gguf_file import open_gguf

ARCHS = ("llama", "qwen2", "mistral")


@pytest.fixture(scope="module")
def vocab() -> TinyVocab:
    return train_tiny_vocab()


def random_hf_model(cfg: dict, seed: int = 0):
    """A transformers model for `cfg` with every parameter random (norms near 1, biases non-zero)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def expected_config(cfg: dict) -> ModelConfig:
    """Every ModelConfig field spelled out from the tiny config, independently of the loaders."""
    rope = cfg.get("rope_scaling")
    return ModelConfig(
        arch=cfg["model_type"], vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=cfg["rms_norm_eps"], rope_theta=cfg["rope_theta"],
        rope_scaling=RopeScaling(kind="yarn", factor=rope["factor"], original_max_position=128) if rope
        else RopeScaling(),
        max_position=512, tie_embeddings=cfg["tie_word_embeddings"], qkv_bias=cfg["model_type"] == "qwen2",
        sliding_window=cfg.get("sliding_window"), bos_token_id=cfg["bos_token_id"],
        eos_token_ids=tuple(cfg["eos_token_id"]),
    )


@pytest.fixture(scope="module", params=ARCHS)
def model_case(request, vocab, tmp_path_factory):
    cfg = tiny_hf_config(request.param, vocab)
    model = random_hf_model(cfg, seed=ARCHS.index(request.param))
    folder = tmp_path_factory.mktemp(f"hf_{request.param}")
    model.save_pretrained(folder)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        del state["lm_head.weight"]
    return cfg, state, folder


def assert_tensors(ckpt, state: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert sorted(ckpt.tensors.names()) == sorted(state)
    for name, want in state.items():
        got = ckpt.tensors.get(name)
        assert got.dtype == torch.float32 and got.shape == want.shape, name
        torch.testing.assert_close(got, want, atol=atol, rtol=0.0, msg=name)


def test_hf_folder_loads_state_dict_and_config(model_case):
    cfg, state, folder = model_case
    ckpt = load_checkpoint(folder)
    assert ckpt.config == expected_config(cfg)
    assert sorted(expected_tensor_names(ckpt.config)) == sorted(state)
    assert_tensors(ckpt, state)
    assert set(ckpt.tensor_types().values()) == {"F32"}
    assert ckpt.tokenizer_source == folder and ckpt.path == folder


def test_sharded_hf_folder(model_case, tmp_path):
    cfg, state, _ = model_case
    model = random_hf_model(cfg, seed=ARCHS.index(cfg["model_type"]))
    model.save_pretrained(tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    assert_tensors(load_checkpoint(tmp_path), state)


def test_gguf_f32_equals_state_dict_and_transformers(model_case, vocab, tmp_path):
    import transformers

    cfg, state, _ = model_case
    path = write_gguf(tmp_path / "tiny-f32.gguf", state, cfg, vocab)
    ckpt = load_checkpoint(path)
    want = expected_config(cfg)
    if cfg["model_type"] == "mistral":  # llama.cpp converts Mistral as llama and keeps no sliding window
        want = replace(want, arch="llama", sliding_window=None)
    assert ckpt.config == want
    assert ckpt.tokenizer_source == path
    assert_tensors(ckpt, state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    hf_state = hf.state_dict()
    for name in state:  # agreeing with transformers covers llama.cpp's q/k permutation
        torch.testing.assert_close(ckpt.tensors.get(name), hf_state[name], atol=0.0, rtol=0.0, msg=name)


@pytest.mark.parametrize("arch,qtype,atol", [("llama", "Q8_0", 4e-3), ("qwen2", "Q8_0", 4e-3),
                                             ("mistral", "F16", 1e-3)])
def test_gguf_quantized_close_to_state_dict(arch, qtype, atol, vocab, tmp_path):
    import transformers

    cfg = tiny_hf_config(arch, vocab)
    model = random_hf_model(cfg, seed=7)
    state = {k: v.detach() for k, v in model.state_dict().items()
             if not (cfg["tie_word_embeddings"] and k == "lm_head.weight")}
    path = write_gguf(tmp_path / f"tiny-{qtype}.gguf", state, cfg, vocab, tensor_type=qtype)
    ckpt = load_checkpoint(path)
    types = ckpt.tensor_types()
    assert {types[n] for n in state if state[n].ndim == 2} == {qtype}
    assert {types[n] for n in state if state[n].ndim == 1} == {"F32"}
    assert_tensors(ckpt, state, atol=atol)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    hf_state = hf.state_dict()
    for name in state:
        torch.testing.assert_close(ckpt.tensors.get(name), hf_state[name], atol=1e-6, rtol=0.0, msg=name)


def test_real_smollm2_gguf_q4_1():
    import numpy as np
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = smollm2_path()
    ckpt = load_checkpoint(path)
    c = ckpt.config
    assert (c.arch, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == ("llama", 49152, 576, 1536, 30)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.tie_embeddings, c.qkv_bias) == (9, 3, 64, True, False)
    assert (c.rope_theta, c.rms_norm_eps, c.max_position, c.bos_token_id) == (100000.0, 1e-5, 8192, 1)
    assert c.eos_token_ids[0] == 2 and 0 in c.eos_token_ids  # <|im_end|>, then <|endoftext|>
    types = ckpt.tensor_types()
    assert types["model.layers.0.mlp.up_proj.weight"] == "Q4_1" and types["model.embed_tokens.weight"] == "Q8_0"
    shapes = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "mlp.down_proj": (576, 1536),
              "mlp.gate_proj": (1536, 576), "input_layernorm": (576,)}
    for part, shape in shapes.items():
        w = ckpt.tensors.get(f"model.layers.0.{part}.weight")
        assert tuple(w.shape) == shape and torch.isfinite(w).all() and w.abs().sum() > 0, part
    # q/k must be un-permuted exactly as transformers does it for this architecture
    raw = open_gguf(path).tensors
    proc = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    for part in ("q", "k"):
        gguf_name, hf_name = f"blk.0.attn_{part}.weight", f"self_attn.{part}_proj"
        t = raw[gguf_name]
        want = proc.process(dequantize(t.data, t.tensor_type), gguf_name).weights
        np.testing.assert_array_equal(ckpt.tensors.get(f"model.layers.0.{hf_name}.weight").numpy(), want)


# --- errors name the file -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_gguf(vocab, tmp_path_factory) -> Path:
    cfg = tiny_hf_config("llama", vocab)
    state = {k: v.detach() for k, v in random_hf_model(cfg).state_dict().items()}
    return write_gguf(tmp_path_factory.mktemp("gguf") / "good.gguf", state, cfg, vocab)


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_gguf(good_gguf, tmp_path, cut):
    bad = tmp_path / "cut.gguf"
    data = good_gguf.read_bytes()
    bad.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="re-fetch") as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "outrider models pull" in str(err.value)


def test_garbage_gguf(tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(bytes(range(256)) * 40)
    with pytest.raises(ValueError) as err:
        load_checkpoint(bad)
    assert str(bad) in str(err.value) and "re-fetch" in str(err.value)


def test_folder_without_config(model_case, tmp_path):
    _, _, folder = model_case
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_folder_without_safetensors(model_case, tmp_path):
    _, _, folder = model_case
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(err.value) and "safetensors" in str(err.value)


def test_missing_shard(model_case, tmp_path):
    cfg, _, _ = model_case
    random_hf_model(cfg).save_pretrained(tmp_path, max_shard_size="60KB")
    shard = sorted(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"].values())[0]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_checkpoint(tmp_path)
    assert str(tmp_path / shard) in str(err.value)


def test_corrupt_safetensors_and_missing_path(model_case, tmp_path):
    _, _, folder = model_case
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path)
    assert str(tmp_path / "model.safetensors") in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_auto_weights_serve_a_gguf_files_own_blocks_on_this_cpu():
    """`auto`, the default: GGUF blocks through our kernel where the CPU runs it (Q4_0 for a draft, whose numerics
    never reach the output), int4 for other checkpoints on a CPU, dense on a GPU; a named format is taken as given."""
    from conftest import tiny_config

    from outrider.kernels.native import missing_cpu_features
    from outrider.runtime.loading import resolve_format

    config = ModelConfig.from_hf(tiny_config("llama"))  # hidden 64, intermediate 128: Q4_0-able
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not missing_cpu_features(), "this project's machines run the native kernels"
    assert resolve_format("auto", Path("m.gguf"), config, cpu) == "gguf"
    assert resolve_format("auto", Path("folder"), config, cpu) == "int4"
    assert resolve_format("auto", Path("m.gguf"), config, cpu, draft=True) == "q4_0"
    odd = replace(config, intermediate_size=config.intermediate_size + 16)  # Q4_0 needs inputs in 32s
    assert resolve_format("auto", Path("m.gguf"), odd, cpu, draft=True) == "gguf"
    assert resolve_format("auto", Path("m.gguf"), config, gpu) == "dense"
    assert resolve_format("int8", Path("m.gguf"), config, cpu, draft=True) == "int8"
