"""Every kernel against its plain-torch reference, and bitwise row invariance (T1) for M = 1..8."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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


def test_control_plain_linear_rows_depend_on_the_row_count():
    """Control for the row invariance above: at its shapes one plain F.linear per call gives a row other bits at
    some row counts than at 8, so the invariance is the kernels' doing and its test can fail. fp32 only: on an
    AVX2 CPU (torch 2.13) bf16 F.linear gave every row the same bits at every count of these shapes."""
    w, _ = weights(256, 128, seed=1)
    x = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    full = F.linear(x, w)
    assert any(not torch.equal(F.linear(x[:m], w), full[:m]) for m in range(1, 8))


def attention_case(dtype: torch.dtype, hd: int):
    """Two query tiles over one key bucket, a random mask that always lets a row see key 0; and the generator."""
    g = torch.Generator().manual_seed(0)
    tiles, heads, kv_heads, keys = 2, 4, 2, KEY_BUCKET
    q = torch.randn(tiles, QUERY_TILE, heads, hd, generator=g).to(dtype)
    k = torch.randn(tiles, kv_heads, keys, hd, generator=g).to(dtype)
    v = torch.randn(tiles, kv_heads, keys, hd, generator=g).to(dtype)
    mask = torch.rand(tiles, QUERY_TILE, keys, generator=g) < 0.5
    mask[..., 0] = True
    return q, k, v, mask, g


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [16, 128])
def test_tiled_attention_matches_reference_and_is_row_invariant(dtype, hd):
    q, k, v, mask, g = attention_case(dtype, hd)
    tiles, heads, kv_heads = q.shape[0], q.shape[2], k.shape[1]
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


@pytest.mark.parametrize("hd", [16, 128])
def test_control_sdpa_rows_depend_on_the_query_count(hd):
    """Control for the fixed query tile: at the test's shapes, SDPA over fewer rows than a tile gives those rows
    other bits than the full tile does, so keeping a row's bits needs the tile. fp32 only: on an AVX2 CPU
    (torch 2.13) bf16 SDPA gave the same bits at every query count of these shapes."""
    q, k, v, mask, _ = attention_case(torch.float32, hd)
    out = tiled_attention(q, k, v, mask, hd ** -0.5)
    assert any(not torch.equal(tiled_attention(q[:1, :n], k[:1], v[:1], mask[:1, :n], hd ** -0.5), out[:1, :n])
               for n in range(1, QUERY_TILE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [16, 128])
def test_control_sdpa_depends_on_the_key_count(dtype, hd):
    """Control for the key bucket: attending over only the live keys (a count that is not a bucket) gives other
    bits than the same keys padded with masked ones to KEY_BUCKET, so the padding is what keeps them."""
    q, k, v, mask, _ = attention_case(dtype, hd)
    differs = []
    for live in (100, 300, 400):
        seen = mask.clone()
        seen[..., live:] = False
        bucketed = tiled_attention(q, k, v, seen, hd ** -0.5)
        differs.append(not torch.equal(tiled_attention(q, k[:, :, :live], v[:, :, :live], seen[..., :live],
                                                       hd ** -0.5), bucketed))
    assert any(differs)
