"""Our C++ decode ops (`outrider/kernels/csrc/attention.cpp`, `ops.cpp`) against plain-torch references, and the
batch invariance they promise: a row's bits never depend on the rows beside it, the cache's size, the thread
count, or — for attention — where in the cache its keys sit, only on which keys it sees and in what order."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from outrider.kernels.native import load
from outrider.runtime.rope import Rotary


@pytest.fixture(scope="module", autouse=True)
def kernels():
    load()


def attention(q, kc, vc, slot, lo, prefix_end, mask, scale):
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return torch.ops.outrider.attention(q, kc, vc, as_long(slot), as_long(lo), as_long(prefix_end),
                                        torch.tensor(mask, dtype=torch.bool), scale)


def reference_attention(q, kc, vc, slot, lo, prefix_end, mask, scale):
    """softmax(q.k) v in float64 over each row's visible keys, listed explicitly."""
    n, heads, _ = q.shape
    group = heads // kc.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(n):
        keys = list(range(lo[i], prefix_end[i])) + [prefix_end[i] + j for j, m in enumerate(mask[i]) if m]
        for h in range(heads):
            k, v = kc[slot[i], h // group, keys].double(), vc[slot[i], h // group, keys].double()
            out[i, h] = (k @ q[i, h].double() * scale).softmax(0) @ v
    return out


def random_case(dtype, head_dim, heads=6, kv_heads=2, capacity=80, slots=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(slots, kv_heads, capacity, head_dim, generator=g).to(dtype)
    vc = torch.randn(slots, kv_heads, capacity, head_dim, generator=g).to(dtype)
    q = torch.randn(5, heads, head_dim, generator=g).to(dtype)
    # rows: a decode on slot 0; a 3-row chain verify on slot 1 with a window on its last row; a row with no prefix
    rows = dict(slot=[0, 1, 1, 1, 2], lo=[0, 0, 0, 4, 0], prefix_end=[37, 20, 20, 20, 0],
                mask=[[1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    return q, kc, vc, rows


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_dim", [8, 20, 24, 64, 128])  # 20: a partial vector on every level
def test_attention_matches_the_float64_reference(dtype, tol, head_dim):
    q, kc, vc, rows = random_case(dtype, head_dim)
    out = attention(q, kc, vc, scale=head_dim ** -0.5, **rows)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), reference_attention(q, kc, vc, scale=head_dim ** -0.5, **rows),
                               atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_attention_row_alone_equals_the_row_among_others(dtype):
    q, kc, vc, rows = random_case(dtype, 64)
    together = attention(q, kc, vc, scale=0.125, **rows)
    for i in range(q.shape[0]):
        alone = attention(q[i:i + 1].contiguous(), kc, vc, [rows["slot"][i]], [rows["lo"][i]],
                          [rows["prefix_end"][i]], [rows["mask"][i]], 0.125)
        assert torch.equal(alone[0], together[i]), f"row {i}"


def test_attention_does_not_depend_on_capacity_or_threads():
    q, kc, vc, rows = random_case(torch.bfloat16, 128)
    base = attention(q, kc, vc, scale=0.09, **rows)
    bigger = [torch.cat([c, torch.randn(c.shape[0], c.shape[1], 300, c.shape[3]).to(c.dtype)], 2).contiguous()
              for c in (kc, vc)]
    assert torch.equal(attention(q, *bigger, scale=0.09, **rows), base)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(attention(q, kc, vc, scale=0.09, **rows), base)
    finally:
        torch.set_num_threads(threads)


def test_a_tree_row_equals_the_chain_row_that_sees_the_same_keys():
    """Tree node 3 (root 0 -> child 2 -> 3) reads keys at prefix, +0, +2, +3; the chain after compaction holds
    the same K/V at prefix, +0, +1, +2. Same keys in the same order: the same bits."""
    g = torch.Generator().manual_seed(3)
    kc, vc = torch.randn(1, 2, 64, 32, generator=g), torch.randn(1, 2, 64, 32, generator=g)
    q = torch.randn(1, 4, 32, generator=g)
    tree = attention(q, kc, vc, [0], [0], [10], [[1, 0, 1, 1]], 0.2)
    chain_k, chain_v = kc.clone(), vc.clone()
    for c, src in ((chain_k, kc), (chain_v, vc)):
        c[:, :, 10:13] = src[:, :, [10, 12, 13]]
    chain = attention(q, chain_k, chain_v, [0], [0], [10], [[1, 1, 1]], 0.2)
    assert torch.equal(tree, chain)


def test_attention_refuses_rows_outside_the_cache():
    q, kc, vc, rows = random_case(torch.float32, 16)
    with pytest.raises(RuntimeError, match="outside the cache"):
        attention(q, kc, vc, scale=0.25, **(rows | {"slot": [0, 1, 1, 1, 3]}))
    with pytest.raises(RuntimeError, match="outside the cache"):
        attention(q, kc, vc, scale=0.25, **(rows | {"prefix_end": [37, 20, 20, 20, 80]}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [200, 203])  # 203: a partial vector on every level
def test_rms_norm_matches_torch_and_is_row_invariant(dtype, width):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, width, generator=g).to(dtype), torch.randn(width, generator=g).to(dtype)
    out = torch.ops.outrider.rms_norm(x, w, 1e-6)
    expected = F.rms_norm(x.float(), (width,), w.float(), 1e-6)
    torch.testing.assert_close(out.float(), expected, atol=1e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)
    for i in range(7):
        assert torch.equal(torch.ops.outrider.rms_norm(x[i:i + 1], w, 1e-6)[0], out[i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hd", [32, 20])  # 20: half a head is a partial vector on every level
def test_rope_store_rotates_q_and_k_and_writes_k_v_into_the_cache(dtype, hd):
    heads, kv_heads, n = 4, 2, 3
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * hd, generator=g).to(dtype)
    positions = torch.tensor([5, 6, 9])
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.outer(positions.double(), inv).repeat(1, 2)
    cos, sin = angles.cos().float().contiguous(), angles.sin().float().contiguous()
    kc, vc = torch.zeros(2, kv_heads, 16, hd, dtype=dtype), torch.zeros(2, kv_heads, 16, hd, dtype=dtype)
    slot, pos = torch.tensor([1, 1, 0]), torch.tensor([4, 5, 0])
    q = torch.ops.outrider.rope_store(qkv, cos, sin, kc, vc, slot, pos, heads)
    x = qkv.float().view(n, heads + 2 * kv_heads, hd)
    want = Rotary.apply(x[:, :heads + kv_heads], cos[:, None], sin[:, None])
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(q.float(), want[:, :heads], **tol)
    for i in range(n):
        torch.testing.assert_close(kc[slot[i], :, pos[i]].float(), want[i, heads:], **tol)
        assert torch.equal(vc[slot[i], :, pos[i]], qkv[i].view(-1, hd)[heads + kv_heads:])
    assert kc[1, :, 6:].abs().sum() == 0 and kc[0, :, 1:].abs().sum() == 0  # nothing else was written
    with pytest.raises(RuntimeError, match="outside the cache"):
        torch.ops.outrider.rope_store(qkv, cos, sin, kc, vc, slot, torch.tensor([4, 5, 16]), heads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_torch(dtype):
    gu = (torch.randn(3, 2 * 1100, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    gate, up = gu.float().chunk(2, -1)
    out = torch.ops.outrider.silu_mul(gu)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, atol=1e-5 if dtype == torch.float32 else 3e-2,
                               rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert torch.equal(torch.ops.outrider.silu_mul(gu[1:2])[0], out[1])


@pytest.mark.parametrize("width", [1, 15, 16, 37, 151936])
def test_argmax_picks_the_token_torch_picks(width):
    """Greedy decoding takes `sampling.argmax` on both sides of every comparison; it must be torch's argmax to the
    index: the first of equal maxima, the first NaN above everything, all -inf rows, any width."""
    from outrider.scheduler.sampling import argmax

    g = torch.Generator().manual_seed(width)
    rows = torch.randn(6, width, generator=g)
    rows[1] = rows[1].round()  # many ties
    rows[2, width // 2] = rows[2].max() + 1
    rows[2, -1] = rows[2, width // 2]  # a tie with the last element: the first wins
    rows[3, width - 1] = float("nan")
    rows[3, width // 3] = float("nan")
    rows[4] = float("-inf")
    rows[5] = 0.0
    rows[5, -1] = -0.0
    assert torch.equal(torch.ops.outrider.argmax_rows(rows), rows.argmax(-1))
    assert torch.equal(argmax(rows), rows.argmax(-1))
    for row in rows:
        assert torch.equal(argmax(row), row.argmax(-1))


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bytes_reads_every_byte_of_every_tensor_once(threads):
    """The bench's memory bound must read exactly the weights: its byte sum equals torch's, for row sizes with
    and without a whole number of 128-byte steps, split over any thread count."""
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randint(0, 256, (37, 1000), generator=g, dtype=torch.uint8),
               torch.randint(0, 256, (3, 128), generator=g, dtype=torch.uint8),
               torch.randn(11, 3, generator=g).bfloat16(), torch.tensor([7, 9]), torch.empty(0, 4)]
    expected = sum(int(t.contiguous().view(torch.uint8).long().sum()) for t in tensors if t.numel())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.ops.outrider.read_bytes(tensors) == expected
    finally:
        torch.set_num_threads(before)


def test_a_stale_build_lock_does_not_block_loading():
    """torch's extension builder guards its directory with a lock file; a process killed while loading (a worker
    stopped by a fault test) leaves it behind. A new process must still load the built kernels, not wait forever."""
    import subprocess
    import sys

    from outrider.hub import home
    from outrider.kernels.native import _build_name

    stale = home() / "kernels" / _build_name() / "lock"
    stale.touch()
    try:
        done = subprocess.run([sys.executable, "-c", "from outrider.kernels import native; native.load(); "
                               "import torch; print(torch.ops.outrider.gguf_mm)"],
                              capture_output=True, text=True, timeout=120)
    finally:
        stale.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr
    assert "outrider.gguf_mm" in done.stdout


def test_the_level_that_runs_is_the_best_this_cpu_supports(monkeypatch):
    """Each level runs where /proc/cpuinfo lists all its flags; a process loads the best of them (or the one
    OUTRIDER_ISA names, never one the CPU lacks), and its build directory says which."""
    from outrider.hub import home
    from outrider.kernels import native

    flags = native.cpu_flags()
    supported = native.supported_levels()
    assert supported == [lv.name for lv in native.LEVELS if set(lv.cpu_flags) <= flags]
    assert supported, "this project's machines run the native kernels"
    assert native.isa() == (os.environ.get("OUTRIDER_ISA") or supported[0])
    assert native.missing_cpu_features() == [] and supported[-1] == "avx2"  # AVX2 + FMA + F16C: the lowest
    assert (home() / "kernels" / native._build_name()).is_dir() and native.isa() in native._build_name()
    with pytest.raises(ValueError, match="unknown kernel level"):
        native._build_name("sse2")
    for level in native.LEVELS:
        monkeypatch.setenv("OUTRIDER_ISA", level.name)
        if level.name in supported:
            assert native.isa() == level.name
        else:
            with pytest.raises(RuntimeError, match="which this CPU lacks"):
                native.isa()


def test_every_level_this_cpu_runs_passes_the_kernel_tests():
    """The kernel tests above and in test_gguf_kernels.py run at the level this process loaded; here they run again
    at every other level the CPU supports (AVX2 on an AVX512-VNNI machine), each against the same references."""
    import subprocess
    import sys

    from outrider.kernels import native

    tests = Path(__file__).parent
    for level in native.supported_levels():
        if level == native.isa():
            continue
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                               "not every_level", str(tests / "test_native_ops.py"),
                               str(tests / "test_gguf_kernels.py")],
                              env=os.environ | {"OUTRIDER_ISA": level}, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{level}:\n{done.stdout[-4000:]}"
