"""Weight formats for linear layers, each a batch-invariant kernel with a plain-torch reference beside it.

Batch invariance is the property that makes speculative greedy decoding lossless on real models: row i of
`kernel(x)` must be bitwise the same whatever other rows x holds and however many there are, so a position
scored inside a (k+1)-row verify pass gets exactly the logits plain decoding gives it.

- `DenseLinear` (fp32 / bf16 weights, `F.linear`): oneDNN/BLAS pick a different blocking per row count, so
  a row alone and the same row among 5 differ (measured: bf16 up to 0.25). At one fixed shape they do not:
  we always call `F.linear` on blocks of exactly `ROW_BLOCK` rows (padding the last block).
- `Int8Linear` (`aten._weight_int8pack_mm`, per-output-channel scales): each output is accumulated in its
  own register in fixed k order: invariant for any row count by construction (tested bitwise).
- `Int4Linear` (`aten._weight_int4pack_mm_for_cpu`, group-wise asymmetric "tinygemm" codes): same argument.
- `GGUFLinear` (`kernels/gguf.py`, our C++ op): the GGUF file's own Q4_K / Q6_K / Q5_0 / Q8_0 blocks (and Q4_0
  for `q4_0`) with int8 activations; one output is one vector lane running a fixed instruction sequence over its
  weight row and activation row: invariant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

ROW_BLOCK = 8  # rows per F.linear call; also the widest verify (k + 1 <= 8) that costs one block
INT4_GROUP = 32
WEIGHT_FORMATS = ("dense", "int8", "int4", "gguf", "q4_0")
# `auto` (the default) is resolved per model where it is loaded (runtime/loading.py `resolve_format`)
WEIGHT_CHOICES = ("auto",) + WEIGHT_FORMATS


class LinearKernel(Protocol):
    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # [M, in] -> [M, out]
        ...

    def reference(self, x: torch.Tensor) -> torch.Tensor:  # plain-torch fp32 math, same weights
        ...

    def state(self) -> dict[str, torch.Tensor]:  # tensors to cache; `from_state` rebuilds the kernel
        ...

    @property
    def nbytes(self) -> int:  # bytes streamed per call (weights + scales + bias)
        ...


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


def _nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@dataclass
class DenseLinear:
    weight: torch.Tensor  # [out, in] in the compute dtype
    bias: torch.Tensor | None  # [out]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        pad = (-m) % ROW_BLOCK
        if pad:
            x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
        # One F.linear per 8-row block: the shape never changes, so neither does a row's reduction order.
        blocks = [F.linear(block, self.weight) for block in x.split(ROW_BLOCK)]
        return _add_bias(torch.cat(blocks)[:m], self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(x.float() @ self.weight.float().T, None if self.bias is None else self.bias.float())

    def state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight} | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> "DenseLinear":
        return cls(s["weight"], s.get("bias"))

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "DenseLinear":
        return cls(w.to(dtype).contiguous(), None if bias is None else bias.to(dtype))


@dataclass
class Int8Linear:
    qweight: torch.Tensor  # [out, in] int8, symmetric per output channel
    scales: torch.Tensor  # [out] compute dtype: w ≈ qweight * scales[:, None]
    bias: torch.Tensor | None  # [out]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.qweight, self.scales, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales), self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.float() * self.scales.float()[:, None]
        return _add_bias(x.float() @ w.T, None if self.bias is None else self.bias.float())

    def state(self) -> dict[str, torch.Tensor]:
        s = {"qweight": self.qweight, "scales": self.scales}
        return s | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> "Int8Linear":
        return cls(s["qweight"], s["scales"], s.get("bias"))

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int8Linear":
        w = w.float()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
        return cls(q.contiguous(), scales.to(dtype), None if bias is None else bias.to(dtype))


@dataclass
class Int4Linear:
    packed: torch.Tensor  # opaque uint8 layout from aten._convert_weight_to_int4pack_for_cpu
    scales_and_zeros: torch.Tensor  # [in / group, out, 2] compute dtype: w = (code - 8) * scale + zero
    bias: torch.Tensor | None  # [out]
    in_features: int
    group: int = INT4_GROUP

    @property
    def out_features(self) -> int:
        return self.scales_and_zeros.shape[1]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.packed, self.scales_and_zeros, self.bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group, self.scales_and_zeros)
        return _add_bias(y, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(x.float() @ self.dequantize().T, None if self.bias is None else self.bias.float())

    def dequantize(self) -> torch.Tensor:
        """[out, in] fp32, by running the kernel on the identity (the packed layout is opaque by design)."""
        eye = torch.eye(self.in_features, dtype=self.scales_and_zeros.dtype)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group,
                                                          self.scales_and_zeros).float().T.contiguous()

    def state(self) -> dict[str, torch.Tensor]:
        s = {"packed": self.packed, "scales_and_zeros": self.scales_and_zeros,
             "shape": torch.tensor([self.in_features, self.group])}
        return s | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> "Int4Linear":
        in_features, group = s["shape"].tolist()
        return cls(s["packed"], s["scales_and_zeros"], s.get("bias"), in_features, group)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Int4Linear":
        out, k = w.shape
        if out % 16 or k % INT4_GROUP:
            raise ValueError(f"int4 weights need out % 16 == 0 and in % {INT4_GROUP} == 0, got [{out}, {k}]; "
                             "use --weights int8 or dense for this model")
        g = w.float().reshape(out, k // INT4_GROUP, INT4_GROUP)
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        codes = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).reshape(out, k)
        zero = lo + 8.0 * scale  # tinygemm convention: w = (code - 8) * scale + zero
        sz = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        return cls(packed, sz, None if bias is None else bias.to(dtype), k)


def _kernels() -> dict[str, type]:
    from outrider.kernels.gguf import GGUFLinear, Q4_0Linear

    return {"dense": DenseLinear, "int8": Int8Linear, "int4": Int4Linear, "gguf": GGUFLinear, "q4_0": Q4_0Linear}


def make_linear(fmt: str, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                device: torch.device) -> LinearKernel:
    """Quantize an fp32 [out, in] weight into the named format."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(WEIGHT_FORMATS)}")
    if fmt != "dense" and device.type != "cpu":
        raise ValueError(f"weight format {fmt!r} runs on the CPU only; use --target-weights dense "
                         f"--draft-weights dense on {device}")
    if fmt == "int8" and dtype == torch.float16:
        raise ValueError("int8 weights need bf16 or fp32 activations")
    kernel = _kernels()[fmt].quantize(w, bias, dtype)
    if device.type != "cpu":
        kernel = DenseLinear(kernel.weight.to(device), None if kernel.bias is None else kernel.bias.to(device))
    return kernel


def linear_from_state(fmt: str, state: dict[str, torch.Tensor]) -> LinearKernel:
    return _kernels()[fmt].from_state(state)
