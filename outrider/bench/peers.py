"""Peer systems run on the same GGUF files and prompts as outrider: HF transformers and llama.cpp.

Both peers get prompts that are already chat-templated text, decode greedily, and report one `PeerRun` per prompt.
What each figure covers differs by peer and is written in `PeerRun.note`:
- HF: tokens/s = new tokens / wall time of `generate` (prefill included, model load excluded: the load time,
  ~70 s for both Qwen files because transformers dequantizes GGUF, is in the note). Token ids are recorded.
- llama.cpp: tokens/s is the decode rate the binary prints (prefill excluded); token ids are not printed, so None.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outrider import hub

_PEERS_FIX = "pip install 'outrider[peers]'   (or: pip install transformers accelerate gguf)"
_BUILD_FIX = "make peers   (or: bash deploy/build-llama-cpp.sh)"
_LLAMA_SPEC_BIN = "llama-speculative-simple"


@dataclass
class PeerRun:
    system: str  # e.g. "hf-bf16", "hf-bf16-assisted", "llama.cpp", "llama.cpp-spec"
    prompt_index: int
    new_tokens: int
    seconds: float
    tokens_per_s: float
    text: str
    token_ids: list[int] | None  # generated ids only (no prompt); None where the peer does not expose them
    note: str


# --- HF transformers -------------------------------------------------------------------------------------------

def _import_transformers() -> tuple[Any, Any]:
    try:
        import gguf  # noqa: F401  (transformers needs it for gguf_file= and fails later with a vaguer message)
        import torch
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"the HF peer needs {exc.name or 'transformers'}; run: {_PEERS_FIX}") from exc
    return torch, transformers


def _load_hf(transformers: Any, torch: Any, gguf: Path, dtype: str) -> Any:
    kwargs = {}
    if hasattr(transformers, "GgufConfig"):
        # transformers >= 5.2x keeps GGUF weights packed and, without a hub-downloaded matmul kernel (none offline),
        # unpacks every weight on every forward: ~0.5 tok/s instead of ~8. Dequantize once at load, as older
        # releases always did, so the peer is the dense-model baseline it is meant to be.
        kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype), **kwargs
    )
    return model.eval()


def _hf_generate(torch: Any, model: Any, ids: Any, max_tokens: int, eos: int | None,
                 draft: Any | None) -> tuple[Any, float]:
    kwargs = {"assistant_model": draft} if draft is not None else {}
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False, temperature=None,
            top_p=None, top_k=None, eos_token_id=eos, pad_token_id=eos, **kwargs,
        )
    return out[0, ids.shape[1]:], time.perf_counter() - start


def run_hf(target_gguf: Path, draft_gguf: Path | None, prompts: list[str], max_tokens: int,
           dtype: str = "bfloat16", threads: int = 2) -> list[PeerRun]:
    """Plain greedy `generate` (system "hf-<dtype>") and, with a draft, `generate(assistant_model=draft)`
    ("hf-<dtype>-assisted") for every prompt. The tokenizer comes from the target GGUF (same vocab as the draft)."""
    torch, transformers = _import_transformers()
    if not hasattr(torch, dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype; use bfloat16, float16 or float32")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        start = time.perf_counter()
        tok = transformers.AutoTokenizer.from_pretrained(str(target_gguf.parent), gguf_file=target_gguf.name)
        target = _load_hf(transformers, torch, target_gguf, dtype)
        draft = _load_hf(transformers, torch, draft_gguf, dtype) if draft_gguf is not None else None
        load_s = time.perf_counter() - start
        # <|im_end|> ends a chat turn; the GGUF's eos may be <|endoftext|>, which a chat reply never emits.
        eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else tok.eos_token_id
        variants = [(f"hf-{dtype}", None)] + ([(f"hf-{dtype}-assisted", draft)] if draft is not None else [])
        runs = []
        for system, assistant in variants:
            note = f"transformers {transformers.__version__}, {threads} threads; load {load_s:.1f} s (excluded)"
            runs += _hf_runs(torch, tok, target, assistant, prompts, max_tokens, eos, system, note)
        return runs
    finally:
        torch.set_num_threads(previous_threads)


def _hf_runs(torch: Any, tok: Any, target: Any, draft: Any | None, prompts: list[str], max_tokens: int,
             eos: int | None, system: str, note: str) -> list[PeerRun]:
    warm = tok("Hello", return_tensors="pt", add_special_tokens=False).input_ids
    _hf_generate(torch, target, warm, 2, eos, draft)  # first call pays one-time allocations; keep them out of tok/s
    runs = []
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        new, seconds = _hf_generate(torch, target, ids, max_tokens, eos, draft)
        token_ids = new.tolist()
        runs.append(PeerRun(system, i, len(token_ids), seconds, len(token_ids) / seconds,
                            tok.decode(token_ids, skip_special_tokens=True), token_ids, note + "; prefill included"))
    return runs


# --- llama.cpp -------------------------------------------------------------------------------------------------

def find_llama_cpp(explicit: Path | None = None) -> Path | None:
    """The directory holding llama.cpp's binaries: `explicit`, else $OUTRIDER_HOME/llama.cpp/bin, else PATH."""
    if explicit is not None:
        if not (explicit / _LLAMA_SPEC_BIN).is_file():
            raise ValueError(
                f"{explicit} has no {_LLAMA_SPEC_BIN}; point at llama.cpp's bin folder or run: {_BUILD_FIX}"
            )
        return explicit
    built = hub.home() / "llama.cpp" / "bin"
    if (built / _LLAMA_SPEC_BIN).is_file():
        return built
    on_path = shutil.which(_LLAMA_SPEC_BIN)
    return Path(on_path).parent if on_path else None


def _binary(bin_dir: Path, *names: str) -> Path:
    for name in names:
        if os.access(bin_dir / name, os.X_OK):
            return bin_dir / name
    raise RuntimeError(f"{bin_dir} has none of {', '.join(names)}; build llama.cpp with: {_BUILD_FIX}")


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    # stdin closed: a llama.cpp tool that falls into interactive mode must end, not wait for a keyboard.
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
                            timeout=timeout)
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"{Path(cmd[0]).name} failed (exit {result.returncode}):\n{tail}\ncommand: {' '.join(cmd)}")
    return result


def _common_args(target: Path, prompt: str, max_tokens: int, threads: int) -> list[str]:
    # A 4096-token context instead of the model's 32768 keeps start-up and KV memory small for benchmark prompts.
    return ["-m", str(target), "-p", prompt, "-n", str(max_tokens), "-t", str(threads), "--temp", "0",
            "-c", "4096", "--no-escape"]


def run_llama_cpp(bin_dir: Path, target_gguf: Path, draft_gguf: Path | None, prompts: list[str], max_tokens: int,
                  threads: int = 2, draft_k: int = 3, timeout: float = 600.0) -> list[PeerRun]:
    """Plain greedy decoding ("llama.cpp", via llama-completion) and, with a draft, draft-model speculation
    ("llama.cpp-spec", via llama-speculative-simple --spec-type draft-simple --draft-max K)."""
    plain = _binary(bin_dir, "llama-completion", "llama-cli")
    # Older builds: llama-cli *is* the completion tool and needs -no-cnv; newer llama-cli is chat-only.
    runs = []
    for i, prompt in enumerate(prompts):
        cmd = [str(plain), *_common_args(target_gguf, prompt, max_tokens, threads), "-no-cnv", "--no-display-prompt"]
        runs.append(parse_completion_output(_run(cmd, timeout), i))
    if draft_gguf is not None:
        spec = _binary(bin_dir, _LLAMA_SPEC_BIN)
        for i, prompt in enumerate(prompts):
            # Flag names of the pinned build (11434); older builds spelled these --draft-max / --draft-min.
            cmd = [str(spec), *_common_args(target_gguf, prompt, max_tokens, threads), "-md", str(draft_gguf),
                   "--spec-type", "draft-simple", "--spec-draft-n-max", str(draft_k), "--spec-draft-n-min", "0",
                   "-td", str(threads)]
            runs.append(parse_speculative_output(_run(cmd, timeout), i, prompt))
    return runs


# Log lines carry a timestamp and level prefix ("0.20.397.290 I common_perf_print:        eval time = ..."), so the
# patterns match inside lines; the lookbehind keeps "prompt eval time" out.
_EVAL = re.compile(r"(?<!prompt )eval time =\s*([\d.]+) ms /\s*(\d+) runs.*?([\d.]+|inf) tokens per second")
_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+|inf) t/s")
_STAT = re.compile(r"\b(n_drafted|n_accept)\s*=\s*(\d+)")


def parse_completion_output(result: subprocess.CompletedProcess[str], prompt_index: int) -> PeerRun:
    """llama-completion: generated text on stdout (prompt not echoed); timings from the `eval time` line on stderr,
    which counts decode steps only. The first new token comes from the prompt pass, hence runs + 1 tokens."""
    match = _EVAL.search(result.stderr)
    if match is None:
        raise RuntimeError(f"no 'eval time' line in llama.cpp output:\n{result.stderr[-2000:]}")
    ms, runs, tps = float(match.group(1)), int(match.group(2)), float(match.group(3))
    text = result.stdout.rstrip("\n").removesuffix(" [end of text]")
    return PeerRun("llama.cpp", prompt_index, runs + 1, ms / 1000, tps, text, None,
                   f"llama-completion; decode rate over {runs} steps, prefill excluded")


def parse_speculative_output(result: subprocess.CompletedProcess[str], prompt_index: int, prompt: str) -> PeerRun:
    """llama-speculative-simple: stdout is "\\n\\n" + the prompt's tokens + the generated text + "\\n\\n" …;
    stderr has `decoded N tokens in S seconds, speed: R t/s` and the n_drafted / n_accept counts."""
    match = _DECODED.search(result.stderr)
    if match is None:
        raise RuntimeError(f"no 'decoded … tokens' line in llama-speculative-simple output:\n{result.stderr[-2000:]}")
    n, seconds, tps = int(match.group(1)), float(match.group(2)), float(match.group(3))
    stats = {k: int(v) for k, v in _STAT.findall(result.stderr)}
    drafted, accepted = stats.get("n_drafted", 0), stats.get("n_accept", 0)
    body = result.stdout.removeprefix("\n\n")
    # The echo is the prompt's tokens turned back into text, which equals the prompt for these BPE vocabularies.
    text = body[len(prompt):] if body.startswith(prompt) else body
    text = text.rstrip("\n")
    rate = f"{100 * accepted / drafted:.1f}%" if drafted else "n/a"
    note = f"llama-speculative-simple; drafted {drafted}, accepted {accepted} ({rate}); prefill excluded"
    return PeerRun("llama.cpp-spec", prompt_index, n, seconds, tps, text, None, note)
