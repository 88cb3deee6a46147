"""Shared test kit: tiny random models built from the configs in fixtures/, in our runtime and in HF's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from outrider.build import Env
from outrider.build.hosts import LocalDraft
from outrider.runtime.config import ModelConfig
from outrider.runtime.loading import build_weights
from outrider.runtime.model import Transformer
from outrider.scheduler.engine import Engine, Request
from outrider.scheduler.policy import FixedK
from outrider.scheduler.sampling import SamplingParams
from outrider.scheduler.target import LocalTarget

FIXTURES = Path(__file__).parent / "fixtures"
torch.set_num_threads(2)


def tiny_config(name: str) -> dict:
    return json.loads((FIXTURES / f"tiny_{name}.json").read_text())


def random_state(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random fp32 weights for a config, scaled so logits are spread (ties are rare but present)."""
    c = ModelConfig.from_hf(cfg)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.08) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    s = {"model.embed_tokens.weight": rnd(c.vocab_size, c.hidden_size, scale=1.0),
         "model.norm.weight": 1 + rnd(c.hidden_size)}
    if not c.tie_embeddings:
        s["lm_head.weight"] = rnd(c.vocab_size, c.hidden_size, scale=0.3)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        s |= {p + "input_layernorm.weight": 1 + rnd(c.hidden_size),
              p + "post_attention_layernorm.weight": 1 + rnd(c.hidden_size),
              p + "self_attn.q_proj.weight": rnd(q, c.hidden_size),
              p + "self_attn.k_proj.weight": rnd(kv, c.hidden_size),
              p + "self_attn.v_proj.weight": rnd(kv, c.hidden_size),
              p + "self_attn.o_proj.weight": rnd(c.hidden_size, q),
              p + "mlp.gate_proj.weight": rnd(c.intermediate_size, c.hidden_size),
              p + "mlp.up_proj.weight": rnd(c.intermediate_size, c.hidden_size),
              p + "mlp.down_proj.weight": rnd(c.hidden_size, c.intermediate_size)}
        if c.qkv_bias:
            s |= {p + f"self_attn.{n}_proj.bias": rnd(d) for n, d in (("q", q), ("k", kv), ("v", kv))}
    return s


def tiny_model(name: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32,
               weights: str = "dense", batch_invariant: bool = True, native: bool | None = None) -> Transformer:
    cfg = tiny_config(name)
    state = random_state(cfg, seed)
    config = ModelConfig.from_hf(cfg)
    w = build_weights(config, state.__getitem__, dtype, weights, torch.device("cpu"))
    return Transformer(config, w, dtype, batch_invariant=batch_invariant, native=native)


def hf_model(name: str, seed: int = 0):
    """The same tiny model in HF transformers (fp32, eager attention)."""
    import transformers

    cfg = tiny_config(name)
    config = transformers.AutoConfig.for_model(**cfg)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    state = random_state(cfg, seed)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model


@pytest.fixture
def tiny():
    return tiny_model


PROMPT = [5, 9, 17, 5, 9, 33, 80, 5, 9, 17]  # repeats, so prompt lookup finds n-grams


def plain(model, prompt=PROMPT, max_tokens=40, stop=frozenset(), params=SamplingParams()) -> list[int]:
    """The target's own tokens: what every lossless strategy must reproduce."""
    engine = Engine(LocalTarget(model, capacity=256))
    return engine.generate(Request(prompt, max_tokens, params, stop)).generated


def speculative(model, drafter, k, prompt=PROMPT, max_tokens=40, stop=frozenset(), params=SamplingParams()):
    engine = Engine(LocalTarget(model, capacity=256), drafter, lambda: FixedK(k))
    return engine.generate(Request(prompt, max_tokens, params, stop))


def in_process(model: Transformer, draft: Transformer | None = None, slots: int = 1, capacity: int = 256) -> Env:
    """What the builder hands a method with both models in this process (the draft defaults to the target)."""
    return Env(LocalTarget(model, slots, capacity), model, LocalDraft(draft or model, slots, capacity), slots,
               capacity)


@pytest.fixture(scope="module")
def target():
    """The loop tests' target (a module may override it with its own)."""
    return tiny_model("llama", seed=0)


@pytest.fixture(scope="module")
def reference(target):
    """`plain` decoding of the module's target."""
    return plain(target)


def pytest_terminal_summary(terminalreporter):
    """Which arithmetic the kernel tests ran on: a run on a CPU without AMX says so instead of passing silently."""
    from outrider.kernels import native

    if not native.available():
        terminalreporter.write_line("native kernels: not available on this machine (torch paths only)")
        return
    from outrider.kernels.gguf import paths

    lacking = [f for f in ("amx_tile", "amx_int8") if f not in native.cpu_flags()]
    note = f"; AMX path absent: this CPU lacks {', '.join(lacking)}" if lacking else ""
    terminalreporter.write_line(f"gguf kernel paths tested: {', '.join(paths())} (build {native.isa()}){note}")
