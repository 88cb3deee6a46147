"""GGUF weight blocks kept exact: Q4_K, Q6_K, Q5_0 and Q8_0 run in our int8-activation kernel (`csrc/gguf_mm.cpp`)
with the file's own codes, scales and mins, and a plain-torch reference beside it.

Layouts (llama.cpp `ggml-common.h`; KERNELS.md 4.1), per block of the file:
- Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-scales and mins, 128 bytes of nibbles;
  w = d * sc_j * q - dmin * m_j for sub-block j of 32.
- Q6_K, 256 in 210: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 sub-scales, fp16 d; w = d * sc_j * (q - 32)
  for sub-block j of 16.
- Q5_0, 32 in 22: fp16 d, 32 fifth bits, 16 bytes of nibbles; w = d * (q - 16). Q8_0, 32 in 34: fp16 d, 32 int8; w = d * q.

`repack` reorders a row's bytes for the kernel, the same number of bytes and the same values: K-quant codes go in
lane order (one 32-bit VPDPBUSD lane always sums 4 weights of one 16-weight group, so a block's scales are applied
once per block, not per instruction), and 32-weight blocks go in pairs (one 64-byte load holds two blocks).
`dequantize_packed(repack(raw))` equals gguf-py's `dequantize(raw)` bit for bit (tested).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

TYPE_IDS = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
TYPE_NAMES = {v: k for k, v in TYPE_IDS.items()}
BLOCK = {"Q4_K": (256, 144), "Q6_K": (256, 210), "Q4_0": (32, 18), "Q5_0": (32, 22),
         "Q8_0": (32, 34)}  # weights, bytes in the file
UNIT = {"Q4_K": 256, "Q6_K": 256, "Q4_0": 64, "Q5_0": 64,
        "Q8_0": 64}  # weights per kernel unit (two blocks for 32-weight types)
K_QUANTS = ("Q4_K", "Q6_K")

# Lane order inside a 256 block: packed position 64 c + 4 l + t holds weight 16 l + 4 c + t.
_p = torch.arange(256)
LANE_ORDER = 16 * ((_p % 64) // 4) + 4 * (_p // 64) + _p % 4
NATURAL_ORDER = torch.argsort(LANE_ORDER)


@dataclass
class Blocks:
    """A [N, K] weight matrix as integer codes and per-block parameters (natural weight order)."""

    qtype: str
    codes: torch.Tensor  # [N, blocks, weights per block] int16, the stored code (Q6_K 0..63, Q8_0 -128..127, ...)
    d: torch.Tensor  # [N, blocks] fp32 (from fp16)
    sub: torch.Tensor | None = None  # Q4_K: [N, blocks, 8] sub-scales; Q6_K: [N, blocks, 16] int8 scales
    dmin: torch.Tensor | None = None  # Q4_K: [N, blocks] fp32
    mins: torch.Tensor | None = None  # Q4_K: [N, blocks, 8]
    raw_header: torch.Tensor | None = None  # Q4_K: the 16 header bytes (d, dmin, packed scales) kept verbatim


def _f16(b: torch.Tensor) -> torch.Tensor:  # [..., 2] uint8 -> [...] fp32
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _check(raw: torch.Tensor, qtype: str) -> tuple[int, int]:
    if qtype not in BLOCK:
        raise ValueError(f"GGUF type {qtype} has no kernel; kernels exist for {', '.join(BLOCK)}")
    per, nbytes = BLOCK[qtype]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] % nbytes:
        raise ValueError(f"{qtype} rows must be uint8 [N, blocks * {nbytes}], got {raw.dtype} {list(raw.shape)}")
    return raw.shape[0], raw.shape[1] // nbytes


def q4k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 packed bytes -> 8 six-bit sub-scales and 8 six-bit mins (gguf-py Q4_K.get_scale_min)."""
    s = s.to(torch.int32)
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo_sc & 63, (hi & 0x0F) | ((lo_sc >> 6) << 4)], -1)
    m = torch.cat([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], -1)
    return sc, m


def _q4k_blocks(header: torch.Tensor, codes: torch.Tensor) -> Blocks:
    """Q4_K's 16 header bytes (d, dmin, packed sub-scales and mins; the same in the file and our layout)."""
    sc, m = q4k_scale_min(header[..., 4:16])
    return Blocks("Q4_K", codes, _f16(header[..., 0:2]), sc, _f16(header[..., 2:4]), m, header.clone())


def unpack_raw(raw: torch.Tensor, qtype: str) -> Blocks:
    """The file's bytes [N, blocks * block bytes] -> codes and parameters."""
    n, nb = _check(raw, qtype)
    b = raw.reshape(n, nb, BLOCK[qtype][1])
    if qtype == "Q4_K":
        qs = b[..., 16:144].reshape(n, nb, 4, 32).to(torch.int16)
        codes = torch.cat([qs & 0x0F, qs >> 4], -1).reshape(n, nb, 256)  # chunk of 64: low nibbles, then high
        return _q4k_blocks(b[..., 0:16], codes)
    if qtype == "Q6_K":
        ql = b[..., 0:128].reshape(n, nb, 2, 2, 32).to(torch.int16)  # half, which 32 of the 64, byte
        qh = b[..., 128:192].reshape(n, nb, 2, 1, 32).to(torch.int16)
        low = torch.stack([ql[..., 0, :] & 0x0F, ql[..., 1, :] & 0x0F, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], 3)
        high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], 3)  # [n, nb, half, quarter of 32, 32]
        codes = low | (high << 4)
        return Blocks(qtype, codes.reshape(n, nb, 256), _f16(b[..., 208:210]), b[..., 192:208].view(torch.int8))
    if qtype == "Q4_0":
        qs = b[..., 2:18].to(torch.int16)
        return Blocks(qtype, torch.cat([qs & 0x0F, qs >> 4], -1), _f16(b[..., 0:2]))
    if qtype == "Q5_0":
        qs = b[..., 6:22].to(torch.int16)
        fifth = b[..., 2:6].to(torch.int64)
        bits = fifth[..., 0] | (fifth[..., 1] << 8) | (fifth[..., 2] << 16) | (fifth[..., 3] << 24)
        high = ((bits[..., None] >> torch.arange(32)) & 1).to(torch.int16)
        codes = torch.cat([qs & 0x0F, qs >> 4], -1) | (high << 4)
        return Blocks(qtype, codes, _f16(b[..., 0:2]))
    return Blocks(qtype, b[..., 2:34].view(torch.int8).to(torch.int16), _f16(b[..., 0:2]))  # Q8_0


def values(blocks: Blocks) -> torch.Tensor:
    """fp32 [N, K] weights, computed in the order gguf-py computes them (so bit for bit its result)."""
    n, nb, _ = blocks.codes.shape
    q = blocks.codes.float()
    if blocks.qtype == "Q4_K":
        d = (blocks.d[..., None] * blocks.sub.float()).reshape(n, nb, 8, 1)
        dm = (blocks.dmin[..., None] * blocks.mins.float()).reshape(n, nb, 8, 1)
        w = d * q.reshape(n, nb, 8, 32) - dm
    elif blocks.qtype == "Q6_K":
        d = (blocks.d[..., None] * blocks.sub.float()).reshape(n, nb, 16, 1)
        w = d * (q - 32).reshape(n, nb, 16, 16)
    elif blocks.qtype == "Q5_0":
        w = blocks.d[..., None] * (q - 16)
    elif blocks.qtype == "Q4_0":
        w = blocks.d[..., None] * (q - 8)
    else:
        w = blocks.d[..., None] * q
    return w.reshape(n, -1)


def dequantize(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    return values(unpack_raw(raw, qtype))


# ---- our layout ---------------------------------------------------------------------------------------------

def _nibble_pairs(c: torch.Tensor) -> torch.Tensor:  # [..., 64] codes -> [..., 32] bytes: low c[i], high c[32+i]
    return ((c[..., :32] & 0x0F) | ((c[..., 32:] & 0x0F) << 4)).to(torch.uint8)


def _pairs(x: torch.Tensor) -> torch.Tensor:  # [N, blocks, ...] -> [N, blocks / 2, 2, ...]
    n, nb = x.shape[:2]
    return x.reshape(n, nb // 2, 2, *x.shape[2:])


def pack(blocks: Blocks) -> torch.Tensor:
    """Codes and parameters -> the kernel's bytes [N, row bytes] (as many bytes as the file's)."""
    n, nb, _ = blocks.codes.shape
    f16 = lambda t: t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)  # noqa: E731
    if blocks.qtype in K_QUANTS:
        lane = blocks.codes[..., LANE_ORDER].reshape(n, nb, 4, 64)  # chunk c of 64 codes
        # vector h: chunk 2h in the low nibbles, chunk 2h + 1 in the high ones
        low = ((lane[:, :, 0::2] & 0x0F) | ((lane[:, :, 1::2] & 0x0F) << 4)).to(torch.uint8).reshape(n, nb, 128)
        if blocks.qtype == "Q4_K":
            parts = [blocks.raw_header, low]
        else:  # byte p, bits 2c and 2c + 1: the top two bits of chunk c's code p
            hi = sum(((lane[:, :, c] >> 4) & 3) << (2 * c) for c in range(4)).to(torch.uint8)
            parts = [f16(blocks.d), blocks.sub.view(torch.uint8), low, hi]
        return torch.cat(parts, -1).reshape(n, -1).contiguous()
    if nb % 2:
        raise ValueError(f"{blocks.qtype} rows need an even number of 32-weight blocks (in_features % 64 == 0), "
                         f"got {nb * 32}")
    d = f16(_pairs(blocks.d)).reshape(n, nb // 2, 4)
    codes = _pairs(blocks.codes).reshape(n, nb // 2, 64)
    if blocks.qtype == "Q8_0":
        return torch.cat([d, codes.to(torch.int8).view(torch.uint8)], -1).reshape(n, -1).contiguous()
    if blocks.qtype == "Q4_0":  # [d0][d1][32 bytes: low nibble code p, high code 32 + p]
        return torch.cat([d, _nibble_pairs(codes)], -1).reshape(n, -1).contiguous()
    fifth = ((codes >> 4) & 1).to(torch.int64) << torch.arange(64)
    fifth = fifth.sum(-1).contiguous().view(torch.uint8).reshape(n, nb // 2, 8)  # little-endian u64 (x86)
    return torch.cat([d, fifth, _nibble_pairs(codes)], -1).reshape(n, -1).contiguous()


def unpack_packed(packed: torch.Tensor, qtype: str, in_features: int) -> Blocks:
    """The kernel's bytes -> codes and parameters (inverse of `pack`)."""
    per = BLOCK[qtype][0]
    n, nb = packed.shape[0], in_features // per
    b = packed.reshape(n, nb // (UNIT[qtype] // per), -1)
    if qtype in K_QUANTS:
        header = 16 if qtype == "Q4_K" else 18
        low = b[..., header:header + 128].reshape(n, nb, 2, 1, 64).to(torch.int16)
        lane = torch.cat([low & 0x0F, low >> 4], 3).reshape(n, nb, 4, 64)
        if qtype == "Q6_K":
            hi = b[..., 146:210].reshape(n, nb, 1, 64).to(torch.int16)
            lane = lane | (torch.cat([(hi >> (2 * c)) & 3 for c in range(4)], 2) << 4)
        codes = lane.reshape(n, nb, 256)[..., NATURAL_ORDER]
        if qtype == "Q4_K":
            return _q4k_blocks(b[..., 0:16], codes)
        return Blocks(qtype, codes, _f16(b[..., 0:2]), b[..., 2:18].contiguous().view(torch.int8))
    d = _f16(b[..., 0:4].reshape(n, nb // 2, 2, 2)).reshape(n, nb)
    if qtype == "Q8_0":
        return Blocks(qtype, b[..., 4:68].contiguous().view(torch.int8).to(torch.int16).reshape(n, nb, 32), d)
    if qtype == "Q4_0":
        nib = b[..., 4:36].to(torch.int16)
        return Blocks(qtype, torch.cat([nib & 0x0F, nib >> 4], -1).reshape(n, nb, 32), d)
    fifth = b[..., 4:12].contiguous().view(torch.int64)  # [n, pairs, 1]
    high = ((fifth >> torch.arange(64)) & 1).to(torch.int16)
    nib = b[..., 12:44].to(torch.int16)
    codes = torch.cat([nib & 0x0F, nib >> 4], -1) | (high << 4)
    return Blocks(qtype, codes.reshape(n, nb, 32), d)


def repack(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    return pack(unpack_raw(raw, qtype))


def dequantize_packed(packed: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    return values(unpack_packed(packed, qtype, in_features))


# ---- activations and the reference matmul -------------------------------------------------------------------

def quantize_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row and block: d = amax / 127, codes = round-half-even(x / d) (the kernel's rule). -> codes, d."""
    m, k = x.shape
    g = x.float().reshape(m, k // block, block)
    d = g.abs().amax(-1) / 127.0
    safe = torch.where(d == 0, torch.ones_like(d), d)
    codes = torch.where(d[..., None] == 0, 0.0, torch.round(g / safe[..., None])).clamp(-127, 127)
    return codes.reshape(m, k), d


def activation_block(qtype: str) -> int:
    return 256 if qtype in K_QUANTS else 32  # llama.cpp's Q8_K for K-quants, Q8_0 for the 32-weight types


def reference_mm(x: torch.Tensor, parts: list[torch.Tensor], qtypes: list[str]) -> torch.Tensor:
    """What the kernel computes, in float64: quantized activations times exactly dequantized weights."""
    k = x.shape[1]
    outs = []
    for packed, qtype in zip(parts, qtypes):
        block = activation_block(qtype)
        codes, d = quantize_activations(x, block)
        xq = (codes.double().reshape(x.shape[0], -1, block) * d.double()[..., None]).reshape(x.shape[0], k)
        outs.append(xq @ dequantize_packed(packed, qtype, k).double().T)
    return torch.cat(outs, -1).float()


def gguf_mm(x: torch.Tensor, parts: list[torch.Tensor], qtypes: list[str],
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (fp32/bf16) times the packed parts' rows, outputs concatenated, plus the bias (added in fp32 before
    the one rounding to x's dtype); [M, sum N] in x's dtype."""
    from outrider.kernels.native import load

    load()
    return torch.ops.outrider.gguf_mm(x, parts, [TYPE_IDS[t] for t in qtypes], bias)


def random_blocks(qtype: str, n: int, k: int, generator: torch.Generator | None = None) -> Blocks:
    """Random codes and parameters of a realistic size (for tests and `outrider bench kernels`)."""
    per = BLOCK[qtype][0]
    nb = k // per
    g = generator

    def ints(lo: int, hi: int, *shape: int) -> torch.Tensor:
        return torch.randint(lo, hi, shape, generator=g, dtype=torch.int16)

    d = (torch.rand(n, nb, generator=g) * 1e-3 + 1e-4).half().float()
    if qtype == "Q4_K":
        sc, m = ints(0, 64, n, nb, 8), ints(0, 64, n, nb, 8)
        header = torch.zeros(n, nb, 16, dtype=torch.uint8)
        header[..., 0:2] = d.half().contiguous().view(torch.uint8).reshape(n, nb, 2)
        dmin = (d / 2).half().float()
        header[..., 2:4] = dmin.half().contiguous().view(torch.uint8).reshape(n, nb, 2)
        s = header[..., 4:16].to(torch.int32)
        s[..., 0:4] = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
        s[..., 4:8] = (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6)
        s[..., 8:12] = (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)
        header[..., 4:16] = s.to(torch.uint8)
        return Blocks(qtype, ints(0, 16, n, nb, 256), d, sc, dmin, m, header)
    if qtype == "Q6_K":
        return Blocks(qtype, ints(0, 64, n, nb, 256), d, ints(-64, 64, n, nb, 16).to(torch.int8))
    if qtype == "Q5_0":
        return Blocks(qtype, ints(0, 32, n, nb, 32), d)
    if qtype == "Q4_0":
        return Blocks(qtype, ints(0, 16, n, nb, 32), d)
    return Blocks(qtype, ints(-128, 128, n, nb, 32), d)


def quantize_blocks(w: torch.Tensor, qtype: str = "Q8_0") -> torch.Tensor:
    """fp32 [N, K] -> Q8_0 / Q5_0 / Q4_0 blocks in the file's layout (gguf-py's quantizer, llama.cpp's rounding)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    if w.shape[1] % UNIT[qtype]:
        raise ValueError(f"{qtype} weights need in_features % 64 == 0, got {w.shape[1]}; use int8 or dense")
    return torch.from_numpy(quantize(w.float().numpy(), GGMLQuantizationType[qtype]))


# ---- the linear kernel --------------------------------------------------------------------------------------

@dataclass
class GGUFLinear:
    """A linear layer whose weight rows stay in GGUF blocks; fused layers (q/k/v, gate/up) are several parts, one
    per run of rows of one type (Q4_K_M stores some v projections as Q6_K next to Q4_K q and k)."""

    parts: list[torch.Tensor]  # packed uint8 [rows_i, row bytes]
    qtypes: list[str]
    in_features: int
    bias: torch.Tensor | None = None

    @classmethod
    def from_raw(cls, raws: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> "GGUFLinear":
        """Rows in the file's bytes, each (type, uint8 [rows, bytes]); consecutive parts of one type merge."""
        merged: list[tuple[str, list[torch.Tensor]]] = []
        for qtype, raw in raws:
            if merged and merged[-1][0] == qtype:
                merged[-1][1].append(raw)
            else:
                merged.append((qtype, [raw]))
        parts = [repack(torch.cat(rows) if len(rows) > 1 else rows[0], qtype) for qtype, rows in merged]
        qtypes = [qtype for qtype, _ in merged]
        k = parts[0].shape[1] // BLOCK[qtypes[0]][1] * BLOCK[qtypes[0]][0]
        return cls(parts, qtypes, k, None if bias is None else bias.to(dtype))

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "GGUFLinear":
        """A weight that is not stored in a kernel's block type (an HF checkpoint, an F16 or Q4_1 tensor) is
        quantized to Q8_0, as llama.cpp's converter does for its 8-bit files."""
        return cls.from_raw([("Q8_0", quantize_blocks(w))], bias, dtype)

    @property
    def out_features(self) -> int:
        return sum(p.shape[0] for p in self.parts)

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return sum(p.numel() for p in self.parts) + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gguf_mm(x, self.parts, self.qtypes, self.bias)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = reference_mm(x, self.parts, self.qtypes)
        return y if self.bias is None else y + self.bias.float()

    def dequantize(self) -> torch.Tensor:
        return torch.cat([dequantize_packed(p, q, self.in_features) for p, q in zip(self.parts, self.qtypes)])

    def state(self) -> dict[str, torch.Tensor]:
        s = {f"part{i}": p for i, p in enumerate(self.parts)}
        s["meta"] = torch.tensor([self.in_features] + [TYPE_IDS[q] for q in self.qtypes])
        return s | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> "GGUFLinear":
        k, *ids = s["meta"].tolist()
        return cls([s[f"part{i}"] for i in range(len(ids))], [TYPE_NAMES[i] for i in ids], k, s.get("bias"))


class Q4_0Linear(GGUFLinear):
    """`--weights q4_0`: every weight requantized to Q4_0 (4.5 bits per weight in 32-weight blocks) and run by the
    GGUF kernel. Meant for drafts, whose precision never changes the output: the 0.5B draft's hidden size (896)
    rules out the 256-weight K-quants, and its file stores Q5_0 layers and a Q8_0 head."""

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Q4_0Linear":
        return cls.from_raw([("Q4_0", quantize_blocks(w, "Q4_0"))], bias, dtype)
