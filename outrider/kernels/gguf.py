"""GGUF weight blocks kept exact: Q4_K, Q6_K, Q4_0, Q5_0 and Q8_0 run in our int8-activation kernel
(`csrc/gguf_mm.cpp`) with the file's own codes, scales and mins, and a plain-torch reference beside it.

Layouts (llama.cpp `ggml/src/ggml-common.h`, the block structs), per block of the file:
- Q4_K, 256 weights in 144 bytes: fp16 d, fp16 dmin, 12 bytes of 6-bit sub-scales and mins, 128 bytes of nibbles;
  w = d * sc_j * q - dmin * m_j for sub-block j of 32.
- Q6_K, 256 in 210: 128 bytes of low nibbles, 64 of 2-bit highs, 16 int8 sub-scales, fp16 d; w = d * sc_j * (q - 32)
  for sub-block j of 16.
- Q4_0, 32 in 18: fp16 d, 16 bytes of nibbles; w = d * (q - 8). Q5_0, 32 in 22: fp16 d, 32 fifth bits, 16 bytes of
  nibbles; w = d * (q - 16). Q8_0, 32 in 34: fp16 d, 32 int8; w = d * q.

`pack` lays the blocks out for the kernel (see "our layout" below): output rows in groups of 16, one 32-bit integer
lane per row, the same bytes and values (padded to whole groups and cache lines); both instruction-set builds of the
kernel (AVX512-VNNI, AVX2) read this one layout.
`dequantize_packed(repack(raw))` equals gguf-py's `dequantize(raw)` bit for bit (tested).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch

TYPE_IDS = {"Q4_0": 2, "Q5_0": 6, "Q8_0": 8, "Q4_K": 12, "Q6_K": 14}
TYPE_NAMES = {v: k for k, v in TYPE_IDS.items()}
BLOCK = {"Q4_K": (256, 144), "Q6_K": (256, 210), "Q4_0": (32, 18), "Q5_0": (32, 22),
         "Q8_0": (32, 34)}  # weights, bytes in the file
K_QUANTS = ("Q4_K", "Q6_K")


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
#
# Output rows go in groups of 16 (a part's last group padded with zero rows): one 32-bit lane belongs to one output
# row (a zmm's 16 on AVX512, two ymm halves of 8 on AVX2), so a block's scales are decoded once for 16 rows and
# shared by every activation row, and a lane's sum needs no horizontal reduction. A group's row is one ascending
# stream of records of RECORD blocks (one for Q4_K, two for the rest): the blocks' parameters, then their codes,
# so that a full record is whole 64-byte lines and no code vector in it straddles one (the last record may hold one
# block; zeros pad the row to a line), and the kernel reads each record front to back, parameters first, as it
# uses them. Per block, the bytes of 16 of the
# file's blocks:
# - a "step" is 64 bytes: lane i's 4 bytes are row i's codes for 4 consecutive inputs (what one VPDPBUSD lane, or
#   one VPMADDUBSW + VPMADDWD lane, sums);
# - codes: Q4_0 4 x 64 nibble bytes, vector v holding step v low and step v + 4 high; Q5_0 the same, then
#   8 x u64 (bit 4 i + j of u64 t is the fifth bit of step t's byte 4 i + j); Q8_0 8 steps of code + 128;
#   Q4_K per sub-block of 32 four nibble vectors as Q4_0; Q6_K per sub-block of 16 steps 0, 1, 2 as bytes with
#   the six bits of step 3 in their top two bits, two bits each;
# - parameters: [16 fp16 d]; Q4_K then [16 dmin][128 bytes: sub-scale s of row i in the low nibble of byte
#   16 s + i, its min's in the high nibble][64 bytes: the top two bits, byte 16 q + i = sc(2q), min(2q),
#   sc(2q+1), min(2q+1) two bits each]; Q6_K then [256 int8 sub-scales: byte 16 s + i].

LANES = 16
CODE_BYTES = {"Q4_K": 2048, "Q6_K": 3072, "Q4_0": 256, "Q5_0": 320, "Q8_0": 512}  # per group and block
PARAM_BYTES = {q: LANES * b - CODE_BYTES[q] for q, (_, b) in BLOCK.items()}
RECORD = {q: 1 if q == "Q4_K" else 2 for q in BLOCK}  # blocks per record


def group_bytes(qtype: str, in_features: int) -> int:
    """One group's row: 16 rows of blocks, rounded up to whole 64-byte lines."""
    nbytes = in_features // BLOCK[qtype][0] * LANES * BLOCK[qtype][1]
    return (nbytes + 63) // 64 * 64


def groups(rows: int) -> int:
    return -(-rows // LANES)


def _f16_bytes(t: torch.Tensor) -> torch.Tensor:  # [...] fp32 -> [..., 2] uint8
    return t.to(torch.float16).contiguous().view(torch.uint8).reshape(*t.shape, 2)


def _by_group(t: torch.Tensor) -> torch.Tensor:
    """[N, blocks, ...] -> [G, blocks, 16, ...] with zero rows padding the last group."""
    n = t.shape[0]
    pad = groups(n) * LANES - n
    if pad:
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
    return t.reshape(-1, LANES, *t.shape[1:]).transpose(1, 2)


def _from_group(t: torch.Tensor, rows: int) -> torch.Tensor:  # inverse of _by_group
    return t.transpose(1, 2).reshape(-1, *t.shape[1:2], *t.shape[3:])[:rows]


def _steps(codes: torch.Tensor) -> torch.Tensor:  # [G, nb, 16, per] -> [G, nb, per / 4 steps, 16, 4]
    g, nb, _, per = codes.shape
    return codes.reshape(g, nb, LANES, per // 4, 4).transpose(2, 3)


def _unsteps(steps: torch.Tensor) -> torch.Tensor:  # inverse of _steps
    g, nb, s = steps.shape[:3]
    return steps.transpose(2, 3).reshape(g, nb, LANES, 4 * s)


def _nibbles(steps: torch.Tensor) -> torch.Tensor:  # [G, nb, S, 16, 4] -> [G, nb, S / 8 * 256] bytes
    g, nb, s = steps.shape[:3]
    pairs = steps.reshape(g, nb, s // 8, 2, 4 * 64)  # per 8 steps: vector v holds step v low, v + 4 high
    return ((pairs[:, :, :, 0] & 0x0F) | ((pairs[:, :, :, 1] & 0x0F) << 4)).to(torch.uint8).reshape(g, nb, -1)


def _unnibbles(b: torch.Tensor, steps: int) -> torch.Tensor:  # inverse of _nibbles, int16 steps
    g, nb = b.shape[:2]
    v = b.reshape(g, nb, steps // 8, 1, 256).to(torch.int16)
    return torch.cat([v & 0x0F, v >> 4], 3).reshape(g, nb, steps, LANES, 4)


def pack(blocks: Blocks) -> torch.Tensor:
    """Codes and parameters -> the kernel's bytes [groups, group_bytes] (the file's bytes, padded)."""
    q = blocks.qtype
    steps = _steps(_by_group(blocks.codes))
    d = _f16_bytes(_by_group(blocks.d)).flatten(2)  # [G, nb, 32]
    g, nb = d.shape[:2]
    params = [d]
    if q == "Q4_K":
        sc, mn = _by_group(blocks.sub).transpose(2, 3), _by_group(blocks.mins).transpose(2, 3)  # [G, nb, 8, 16]
        low = ((sc & 0x0F) | ((mn & 0x0F) << 4)).reshape(g, nb, 128)
        top = ((sc[:, :, 0::2] >> 4) | ((mn[:, :, 0::2] >> 4) << 2) | ((sc[:, :, 1::2] >> 4) << 4)
               | ((mn[:, :, 1::2] >> 4) << 6)).reshape(g, nb, 64)
        params += [_f16_bytes(_by_group(blocks.dmin)).flatten(2), low.to(torch.uint8), top.to(torch.uint8)]
        codes = _nibbles(steps)
    elif q == "Q6_K":
        params.append(_by_group(blocks.sub).transpose(2, 3).contiguous().view(torch.uint8).reshape(g, nb, 256))
        s = steps.reshape(g, nb, 16, 4, LANES * 4)  # sub-block of 16: 4 steps
        three = torch.stack([s[:, :, :, c] | (((s[:, :, :, 3] >> (2 * c)) & 3) << 6) for c in range(3)], 3)
        codes = three.to(torch.uint8).reshape(g, nb, 3072)
    elif q == "Q8_0":
        codes = (steps + 128).to(torch.uint8).reshape(g, nb, 512)
    elif q == "Q4_0":
        codes = _nibbles(steps)
    else:  # Q5_0
        bit = ((steps >> 4) & 1).reshape(g, nb, 8, 64).to(torch.int64) << torch.arange(64)
        fifth = bit.sum(-1).contiguous().view(torch.uint8).reshape(g, nb, 64)  # little-endian u64 (x86)
        codes = torch.cat([_nibbles(steps), fifth], -1)
    params = torch.cat(params, -1)
    records = []
    for start in range(0, nb, RECORD[q]):  # [the record's blocks' parameters][their codes]
        end = min(start + RECORD[q], nb)
        records += [params[:, start:end].reshape(g, -1), codes[:, start:end].reshape(g, -1)]
    body = torch.cat(records, 1)
    pad = group_bytes(q, nb * BLOCK[q][0]) - body.shape[1]
    return torch.cat([body, body.new_zeros(g, pad)], 1).contiguous()


def unpack_packed(packed: torch.Tensor, qtype: str, in_features: int, rows: int) -> Blocks:
    """The kernel's bytes -> codes and parameters of the `rows` real rows (inverse of `pack`)."""
    g, nb = packed.shape[0], in_features // BLOCK[qtype][0]
    cb, pb, codes, params, at = CODE_BYTES[qtype], PARAM_BYTES[qtype], [], [], 0
    for start in range(0, nb, RECORD[qtype]):
        n = min(RECORD[qtype], nb - start)
        params.append(packed[:, at:at + n * pb].reshape(g, n, pb))
        codes.append(packed[:, at + n * pb:at + n * (cb + pb)].reshape(g, n, cb))
        at += n * (cb + pb)
    c, p = torch.cat(codes, 1), torch.cat(params, 1)
    d = _from_group(_f16(p[..., 0:32].reshape(g, nb, LANES, 2)), rows)
    if qtype == "Q4_K":
        low = p[..., 64:192].reshape(g, nb, 8, LANES).to(torch.int32)
        top = p[..., 192:256].reshape(g, nb, 4, LANES).to(torch.int32)
        top2 = torch.stack([top, top >> 4], 3).reshape(g, nb, 8, LANES)  # sub-block s: bits 0-3 of its byte
        sc = (low & 0x0F) | ((top2 & 3) << 4)
        mn = (low >> 4) | (((top2 >> 2) & 3) << 4)
        codes = _unsteps(_unnibbles(c, 64))
        header = torch.zeros(g, nb, LANES, 16, dtype=torch.uint8)  # the file's 16 header bytes, rebuilt
        header[..., 0:4] = p[..., 0:64].reshape(g, nb, 2, LANES, 2).transpose(2, 3).reshape(g, nb, LANES, 4)
        sc, mn = sc.transpose(2, 3), mn.transpose(2, 3)  # [G, nb, 16, 8]
        header[..., 4:16] = torch.cat([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
                                       (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6),
                                       (sc[..., 4:] & 0x0F) | ((mn[..., 4:] & 0x0F) << 4)], -1).to(torch.uint8)
        return _q4k_blocks(_from_group(header, rows), _from_group(codes, rows))
    if qtype == "Q6_K":
        sc = p[..., 32:288].contiguous().view(torch.int8).reshape(g, nb, 16, LANES).transpose(2, 3)
        three = c.reshape(g, nb, 16, 3, LANES * 4).to(torch.int16)
        last = sum(((three[:, :, :, c] >> 6) & 3) << (2 * c) for c in range(3))
        steps = torch.cat([three & 63, last[:, :, :, None]], 3).reshape(g, nb, 64, LANES, 4)
        return Blocks(qtype, _from_group(_unsteps(steps), rows), d, _from_group(sc, rows))
    if qtype == "Q8_0":
        steps = c.reshape(g, nb, 8, LANES, 4).to(torch.int16) - 128
    else:
        steps = _unnibbles(c[..., 0:256], 8)
        if qtype == "Q5_0":
            fifth = c[..., 256:320].contiguous().view(torch.int64).reshape(g, nb, 8, 1)
            steps = steps | (((fifth >> torch.arange(64)) & 1).to(torch.int16) << 4).reshape(g, nb, 8, LANES, 4)
    return Blocks(qtype, _from_group(_unsteps(steps), rows), d)


def repack(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    return pack(unpack_raw(raw, qtype))


def dequantize_packed(packed: torch.Tensor, qtype: str, in_features: int, rows: int) -> torch.Tensor:
    return values(unpack_packed(packed, qtype, in_features, rows))


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


def reference_mm(x: torch.Tensor, weights: list[torch.Tensor], qtypes: list[str]) -> torch.Tensor:
    """What the kernel computes, in float64: quantized activations times the exact weights [N_i, K] of each part."""
    k = x.shape[1]
    outs = []
    for w, qtype in zip(weights, qtypes):
        block = activation_block(qtype)
        codes, d = quantize_activations(x, block)
        xq = (codes.double().reshape(x.shape[0], -1, block) * d.double()[..., None]).reshape(x.shape[0], k)
        outs.append(xq @ w.double().T)
    return torch.cat(outs, -1).float()


def gguf_mm(x: torch.Tensor, parts: list[torch.Tensor], type_ids: list[int], rows: list[int],
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (fp32/bf16) times the packed parts' `rows` real rows (GGML `type_ids`), outputs concatenated, plus
    the bias (added in fp32 before the one rounding to x's dtype); [M, sum rows] in x's dtype."""
    return torch.ops.outrider.gguf_mm(x, parts, type_ids, rows, bias)


# ---- which arithmetic serves a call ----------------------------------------------------------------------------

def paths() -> list[str]:
    """The kernel paths this process has: "avx2", or "vnni" (AVX512-VNNI), plus "amx" in the avx512_amx build
    where the OS grants the tile state. Every path gives a row bitwise the same output."""
    from outrider.kernels.native import isa, load

    load()
    level = isa()
    base = ["avx2"] if level == "avx2" else ["vnni"]
    return base + (["amx"] if level == "avx512_amx" and torch.ops.outrider.gguf_amx_available() else [])


def amx_rows(window: tuple[int, int] | None = None) -> tuple[int, int]:
    """The row counts (least, most) the AMX path serves; least 0: never. With `window`, sets it and returns the one
    before. OUTRIDER_AMX_ROWS=LEAST:MOST (or 0, never) sets it for a process at load."""
    from outrider.kernels.native import load

    load()
    least, most = window if window is not None else (-1, -1)
    before = torch.ops.outrider.gguf_amx_rows(least, most)
    return int(before[0]), int(before[1])


@contextmanager
def forced_path(path: str) -> Iterator[None]:
    """Every call inside takes `path` ("amx" at any row count; "vnni" or "avx2" never AMX), for comparing them."""
    if path not in paths():
        raise ValueError(f"kernel path {path!r} is not in this process; it has {', '.join(paths())}")
    before = amx_rows((1, 1 << 30) if path == "amx" else (0, 0))
    try:
        yield
    finally:
        amx_rows(before)


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

    if w.shape[1] % BLOCK[qtype][0]:
        raise ValueError(f"{qtype} weights need in_features % 32 == 0, got {w.shape[1]}; use int8 or dense")
    return torch.from_numpy(quantize(w.float().numpy(), GGMLQuantizationType[qtype]))


# ---- the linear kernel --------------------------------------------------------------------------------------

@dataclass
class GGUFLinear:
    """A linear layer whose weight rows stay in GGUF blocks; fused layers (q/k/v, gate/up) are several parts, one
    per run of rows of one type (Q4_K_M stores some v projections as Q6_K next to Q4_K q and k)."""

    parts: list[torch.Tensor]  # packed uint8 [groups of 16 rows, blocks * group bytes]
    qtypes: list[str]
    rows: list[int]  # each part's real rows (its last group may be padded)
    in_features: int
    bias: torch.Tensor | None = None

    def __post_init__(self) -> None:
        from outrider.kernels.native import load

        load()  # once per layer here, not once per call
        self.type_ids = [TYPE_IDS[q] for q in self.qtypes]  # what the op takes, built once

    @classmethod
    def from_blocks(cls, blocks: list[Blocks], bias: torch.Tensor | None, dtype: torch.dtype) -> "GGUFLinear":
        """Parts in order; consecutive parts of one type merge into one."""
        merged: list[Blocks] = []
        for b in blocks:
            if merged and merged[-1].qtype == b.qtype:
                merged[-1] = _concat(merged[-1], b)
            else:
                merged.append(b)
        k = merged[0].codes.shape[1] * BLOCK[merged[0].qtype][0]
        # the bias rounded to the model's dtype, as the other formats add it, and kept in fp32 for the kernel
        return cls([pack(b) for b in merged], [b.qtype for b in merged], [b.codes.shape[0] for b in merged], k,
                   None if bias is None else bias.to(dtype).float())

    @classmethod
    def from_raw(cls, raws: list[tuple[str, torch.Tensor]], bias: torch.Tensor | None,
                 dtype: torch.dtype) -> "GGUFLinear":
        """Rows in the file's bytes, each (type, uint8 [rows, bytes])."""
        return cls.from_blocks([unpack_raw(raw, qtype) for qtype, raw in raws], bias, dtype)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "GGUFLinear":
        """A weight that is not stored in a kernel's block type (an HF checkpoint, an F16 or Q4_1 tensor) is
        quantized to Q8_0, as llama.cpp's converter does for its 8-bit files."""
        return cls.from_raw([("Q8_0", quantize_blocks(w))], bias, dtype)

    @property
    def out_features(self) -> int:
        return sum(self.rows)

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return sum(p.numel() for p in self.parts) + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gguf_mm(x, self.parts, self.type_ids, self.rows, self.bias)

    def blocks(self) -> list[Blocks]:
        return [unpack_packed(p, q, self.in_features, n) for p, q, n in zip(self.parts, self.qtypes, self.rows)]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = reference_mm(x, [values(b) for b in self.blocks()], self.qtypes)
        return y if self.bias is None else y + self.bias.float()

    def dequantize(self) -> torch.Tensor:
        return torch.cat([values(b) for b in self.blocks()])

    def select_rows(self, rows: torch.Tensor) -> "GGUFLinear":
        """The given output rows, in that order, with their blocks as stored (VocabTrim's draft head)."""
        kept, start = [], 0
        for b in self.blocks():
            n = b.codes.shape[0]
            inside = rows[(rows >= start) & (rows < start + n)] - start
            if inside.numel():
                kept.append(_take(b, inside))
            start += n
        return GGUFLinear.from_blocks(kept, None, torch.float32)

    def state(self) -> dict[str, torch.Tensor]:
        s = {f"part{i}": p for i, p in enumerate(self.parts)}
        s["meta"] = torch.tensor([self.in_features] + self.type_ids + self.rows)
        return s | ({} if self.bias is None else {"bias": self.bias})

    @classmethod
    def from_state(cls, s: dict[str, torch.Tensor]) -> "GGUFLinear":
        k, *rest = s["meta"].tolist()
        n = len(rest) // 2
        return cls([s[f"part{i}"] for i in range(n)], [TYPE_NAMES[i] for i in rest[:n]], rest[n:], k, s.get("bias"))


def _fields(b: Blocks) -> dict[str, torch.Tensor | None]:  # every tensor field (all but qtype)
    return {f.name: getattr(b, f.name) for f in fields(b) if f.name != "qtype"}


def _concat(a: Blocks, b: Blocks) -> Blocks:
    fa, fb = _fields(a), _fields(b)
    return Blocks(a.qtype, **{f: None if fa[f] is None else torch.cat([fa[f], fb[f]]) for f in fa})


def _take(b: Blocks, rows: torch.Tensor) -> Blocks:
    return Blocks(b.qtype, **{f: None if t is None else t[rows] for f, t in _fields(b).items()})


class Q4_0Linear(GGUFLinear):
    """`--weights q4_0`: every weight requantized to Q4_0 (4.5 bits per weight in 32-weight blocks) and run by the
    GGUF kernel. Meant for drafts, whose precision never changes the output: the 0.5B draft's hidden size (896)
    rules out the 256-weight K-quants, and its file stores Q5_0 layers and a Q8_0 head."""

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> "Q4_0Linear":
        return cls.from_raw([("Q4_0", quantize_blocks(w, "Q4_0"))], bias, dtype)
