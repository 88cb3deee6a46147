"""VocabTrim: the draft model's LM head limited to the tokens the target actually writes.

The 0.5B draft's 151,936-row head is 28% of its weights, read on every draft step; most rows belong to tokens a
code model never emits. Keeping only the most frequent `keep` tokens of the target's own generations makes each
draft step cheaper. It stays lossless: a token outside the kept set is simply never drafted (q(x) = 0 there),
and verification treats q exactly as the distribution the draft sampled from.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from outrider.kernels.gguf import GGUFLinear
from outrider.kernels.linear import DenseLinear, Int4Linear, Int8Linear, LinearKernel, make_linear
from outrider.runtime.model import Transformer

ROW_MULTIPLE = 16  # the int4 packed layout needs out_features in multiples of 16


@dataclass(frozen=True)
class TrimmedVocab:
    ids: torch.Tensor  # [n] kept token ids, ascending
    vocab_size: int  # of the full vocabulary

    @classmethod
    def from_counts(cls, counts: Counter, vocab_size: int, keep: int) -> "TrimmedVocab":
        """The `keep` most frequent tokens; ties and the remainder (when fewer were seen) by lowest id, which in a
        BPE vocabulary are the earliest, most common merges."""
        keep = min(vocab_size, -(-keep // ROW_MULTIPLE) * ROW_MULTIPLE)
        seen = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if 0 <= t < vocab_size]
        chosen = set(seen[:keep])
        for t in range(vocab_size):
            if len(chosen) >= keep:
                break
            chosen.add(t)
        return cls(torch.tensor(sorted(chosen), dtype=torch.long), vocab_size)

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"vocab_size": self.vocab_size, "ids": self.ids.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> "TrimmedVocab":
        p = Path(path)
        try:
            doc = json.loads(p.read_text())
            ids = torch.tensor(doc["ids"], dtype=torch.long)
            vocab_size = int(doc["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{p}: not a draft vocabulary file ({e}); build one with `outrider vocab-trim`") from e
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab_size or ids.numel() % ROW_MULTIPLE:
            raise ValueError(f"{p}: token ids must be in 0..{vocab_size - 1}, a multiple of {ROW_MULTIPLE} of them")
        return cls(ids.sort().values, vocab_size)


def trim_head(model: Transformer, vocab: TrimmedVocab) -> None:
    """Replace the draft model's LM head by its kept rows (logits then come in the order of `vocab.ids`)."""
    if vocab.vocab_size != model.config.vocab_size:
        raise ValueError(f"the draft vocabulary file is for {vocab.vocab_size} tokens but the draft model has "
                         f"{model.config.vocab_size}; rebuild it for this model")
    model.weights.head = _rows(model.weights.head, vocab.ids, model.dtype)


def _rows(kernel: LinearKernel, rows: torch.Tensor, dtype: torch.dtype) -> LinearKernel:
    if isinstance(kernel, DenseLinear):
        return DenseLinear(kernel.weight[rows].contiguous(), None)
    if isinstance(kernel, Int8Linear):
        return Int8Linear(kernel.qweight[rows].contiguous(), kernel.scales[rows].contiguous(), None)
    if isinstance(kernel, Int4Linear):  # the packed layout is opaque: requantize the kept rows
        return make_linear("int4", kernel.dequantize()[rows], None, dtype, torch.device("cpu"))
    if isinstance(kernel, GGUFLinear):  # the kept rows' blocks as stored
        return kernel.select_rows(rows)
    raise TypeError(f"cannot trim a {type(kernel).__name__} head")
