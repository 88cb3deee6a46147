"""Every kernel against its plain-torch reference, and bitwise row invariance (T1) for M = 1..8."""
from __future__ import annotations

import pytest
import torch

from outrider.kernels.attention import KEY_BUCKET, QUERY_TILE, reference_attention, tiled_attention
from outrider.kernels.linear import Int4Linear, make_linear

SHAPES = [(96, 64), (256, 128)]
CASES = [("dense", torch.float32), ("dense", torch.bfloat16), ("int8", torch.float32), ("int8", torch.bfloat16),
         ("int4", torch.float32), ("int4", torch.bfloat16)]


def weights(out: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, k, generator=g), torch.randn(out, generator=g)


@pytest.mark.parametrize("fmt,dtype", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference(fmt, dtype, shape):
    w, b = weights(*shape)
    kernel = make_linear(fmt, w, b, dtype, torch.device("cpu"))
    x = torch.randn(5, shape[1]).to(dtype)
    got, ref = kernel(x).float(), kernel.reference(x)
    tol = 1e-4 if dtype == torch.float32 else 0.05 * ref.abs().max().item()
    assert (got - ref).abs().max().item() <= tol


@pytest.mark.parametrize("fmt,tol", [("int8", 0.02), ("int4", 0.2)])
def test_quantization_error_is_bounded(fmt, tol):
    w, _ = weights(256, 128)
    kernel = make_linear(fmt, w, None, torch.float32, torch.device("cpu"))
    x = torch.randn(3, 128)
    exact = x @ w.T
    assert ((kernel(x) - exact).norm() / exact.norm()).item() < tol


def test_int4_dequantize_roundtrips_the_codes():
    w, _ = weights(64, 64)
    k = Int4Linear.quantize(w, None, torch.float32)
    assert (k.dequantize() - w).abs().max().item() <= (w.max() - w.min()).item() / 15


@pytest.mark.parametrize("fmt,dtype", CASES)
def test_rows_are_bitwise_invariant_to_count_and_neighbours(fmt, dtype):
    w, b = weights(256, 128, seed=1)
    kernel = make_linear(fmt, w, b, dtype, torch.device("cpu"))
    x = torch.randn(8, 128).to(dtype)
    full = kernel(x)
    for m in range(1, 9):
        part = kernel(x[:m])
        for i in range(m):
            assert torch.equal(part[i], full[i]), f"M={m} row {i}"
            assert torch.equal(kernel(x[i:i + 1])[0], full[i])
    other = torch.cat([x[2:3], torch.randn(6, 128).to(dtype)])  # unrelated neighbours
    assert torch.equal(kernel(other)[0], full[2])
    perm = torch.randperm(8)
    assert torch.equal(kernel(x[perm]), full[perm])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [16, 128])
def test_tiled_attention_matches_reference_and_is_row_invariant(dtype, hd):
    g = torch.Generator().manual_seed(0)
    tiles, heads, kv_heads, keys = 2, 4, 2, KEY_BUCKET
    q = torch.randn(tiles, QUERY_TILE, heads, hd, generator=g).to(dtype)
    k = torch.randn(tiles, kv_heads, keys, hd, generator=g).to(dtype)
    v = torch.randn(tiles, kv_heads, keys, hd, generator=g).to(dtype)
    mask = torch.rand(tiles, QUERY_TILE, keys, generator=g) < 0.5
    mask[..., 0] = True
    out = tiled_attention(q, k, v, mask, hd ** -0.5)
    ref = reference_attention(q, k, v, mask, hd ** -0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    # Change every other row of tile 0 and drop tile 1: the kept row of tile 0 keeps its bits.
    kept = QUERY_TILE // 2
    others = [i for i in range(QUERY_TILE) if i != kept]
    q2 = q[:1].clone()
    q2[0, others] = torch.randn(len(others), heads, hd, generator=g).to(dtype)
    assert torch.equal(tiled_attention(q2, k[:1], v[:1], mask[:1], hd ** -0.5)[0, kept], out[0, kept])
    # Extra masked keys (longer buckets) add exact zeros.
    for extra in (KEY_BUCKET, 3 * KEY_BUCKET):
        pad = torch.randn(tiles, kv_heads, extra, hd, generator=g).to(dtype)
        long = tiled_attention(q, torch.cat([k, pad], 2), torch.cat([v, pad], 2),
                               torch.cat([mask, torch.zeros(tiles, QUERY_TILE, extra, dtype=torch.bool)], 2),
                               hd ** -0.5)
        assert torch.equal(long, out), f"{extra} extra masked keys changed the result"
