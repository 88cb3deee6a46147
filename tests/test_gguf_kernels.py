"""Our GGUF kernels (`outrider/kernels/gguf.py`, `csrc/gguf_mm.cpp`): the file's blocks are kept exact, the C++
kernel computes what its plain-torch reference computes, and a row's output is bitwise the same whatever else is
in the call — the property that makes verification at `--weights gguf` lossless."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_py_dequantize

from outrider import hub
from outrider.kernels import gguf as G
from outrider.runtime.gguf_file import GGUFTensorSource, open_gguf
from outrider.runtime.loading import load_model

TYPES = ["Q4_K", "Q6_K", "Q5_0", "Q8_0"]  # the types the default pair's files store
KERNEL_TYPES = TYPES + ["Q4_0"]  # Q4_0: --weights q4_0 requantizes to it


def random_linear(qtype: str, n: int, k: int, seed: int = 0) -> G.GGUFLinear:
    g = torch.Generator().manual_seed(seed)
    return G.GGUFLinear.from_blocks([G.random_blocks(qtype, n, k, g)], None, torch.float32)


def real_tensors() -> dict[str, tuple[str, torch.Tensor]]:
    """One tensor of each kernel type from the default pair's files (the draft holds Q5_0 and Q8_0)."""
    found: dict[str, tuple[str, torch.Tensor]] = {}
    for name in (hub.DEFAULT_DRAFT, hub.DEFAULT_TARGET):
        path = hub.model_path(name)
        assert path.exists(), f"run `outrider models pull {name}` (make test does)"
        gf = open_gguf(path)
        for t in gf.tensors.values():
            qtype = t.tensor_type.name
            if qtype in G.BLOCK and qtype not in found:
                found[qtype] = (t.name, torch.from_numpy(np.array(t.data[:48], dtype=np.uint8)))
    assert set(found) == set(TYPES), found.keys()
    return found


@pytest.fixture(scope="module")
def tensors():
    return real_tensors()


@pytest.mark.parametrize("qtype", TYPES)
def test_blocks_from_the_file_dequantize_bit_for_bit_like_gguf_py(tensors, qtype):
    name, raw = tensors[qtype]
    expected = torch.from_numpy(gguf_py_dequantize(raw.numpy(), GGMLQuantizationType[qtype])).float()
    ours = G.dequantize(raw, qtype)
    assert torch.equal(ours, expected.reshape(ours.shape)), name
    # the kernel's layout holds the same values in as many bytes (48 rows: three full groups of 16)
    packed = G.repack(raw, qtype)
    assert packed.numel() - raw.numel() < 64 * packed.shape[0]  # plus at most a line per group
    assert torch.equal(G.dequantize_packed(packed, qtype, ours.shape[1], raw.shape[0]), ours)
    # a partial last group is padded with zero rows and gives back only the real ones
    assert torch.equal(G.dequantize_packed(G.repack(raw[:21], qtype), qtype, ours.shape[1], 21), ours[:21])


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_kernel_matches_its_reference(qtype, m):
    k = 512
    lin = random_linear(qtype, 40, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    y, ref = lin(x), lin.reference(x)
    assert y.dtype == torch.float32 and y.shape == (m, 40)
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5


@pytest.mark.parametrize("qtype", TYPES)
def test_real_blocks_through_the_kernel_match_the_reference(tensors, qtype):
    _, raw = tensors[qtype]
    lin = G.GGUFLinear.from_raw([(qtype, raw)], None, torch.bfloat16)
    x = torch.randn(4, lin.in_features, generator=torch.Generator().manual_seed(1))
    ref = lin.reference(x)
    assert ((lin(x) - ref).abs().max() / ref.abs().max()).item() < 1e-5
    # and the int8 activations stay close to the exact fp32 product
    exact = x.double() @ lin.dequantize().double().T
    assert ((ref.double() - exact).norm() / exact.norm()).item() < 0.02


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_are_bitwise_invariant_to_count_neighbours_and_threads(qtype, dtype):
    lin = random_linear(qtype, 72, 256 if qtype in G.K_QUANTS else 192, seed=3)
    x = torch.randn(11, lin.in_features, generator=torch.Generator().manual_seed(4)).to(dtype)
    alone = torch.cat([lin(x[i:i + 1]) for i in range(11)])
    threads = torch.get_num_threads()
    try:
        for m in range(1, 12):
            assert torch.equal(lin(x[:m]), alone[:m]), m
        torch.set_num_threads(1)
        assert torch.equal(lin(x), alone)
    finally:
        torch.set_num_threads(threads)
    others = torch.randn(5, lin.in_features, generator=torch.Generator().manual_seed(5)).to(dtype)
    assert torch.equal(lin(torch.cat([others, x[2:3]]))[-1], alone[2])


CODE_RANGE = {"Q4_K": (0, 15), "Q6_K": (0, 63), "Q4_0": (0, 15), "Q5_0": (0, 31), "Q8_0": (-128, 127)}


def extreme_linear(qtype: str, code: int, n: int = 24, k: int = 512) -> G.GGUFLinear:
    """Every code `code`, every sub-scale and min at the end of its range: the largest integer sums a kernel lane
    or a 16-bit partial sum ever holds (AVX2's VPMADDUBSW saturates at 2^15; Q8_0's codes span both signs)."""
    b = G.random_blocks(qtype, n, k, torch.Generator().manual_seed(7))
    b.codes.fill_(code)
    if qtype == "Q4_K":
        b.sub.fill_(63)
        b.mins.fill_(63)
    elif qtype == "Q6_K":
        b.sub[..., 0::2] = -128  # both signs of the int8 sub-scales
        b.sub[..., 1::2] = 127
    return G.GGUFLinear.from_blocks([b], None, torch.float32)


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_extreme_codes_and_activations_keep_the_integer_sums_exact(qtype):
    """Saturation or wrap-around in any partial sum would move the output far from the reference; exact sums keep
    it at float rounding. Activations of one magnitude quantize to +-127 everywhere, the largest products."""
    k = 512
    signs = torch.tensor([1.0, -1.0]).repeat_interleave(4).repeat(k // 8)  # a sign per 4 inputs (one code step)
    x = torch.stack([torch.ones(k), -torch.ones(k), signs, -signs, torch.ones(k)])  # 5 rows: several per pass
    for code in CODE_RANGE[qtype]:
        lin = extreme_linear(qtype, code)
        y, ref = lin(x), lin.reference(x)
        scale = ref.abs().max()
        if scale == 0:  # all-zero codes of an offset-free type
            assert torch.equal(y, ref)
            continue
        assert ((y - ref).abs().max() / scale).item() < 1e-5, (code, (y - ref).abs().max().item())
        assert torch.equal(lin(x[:1]), y[:1]) and torch.equal(lin(x[2:3]), y[2:3])


def test_fused_parts_of_different_types_concatenate():
    """Q4_K_M stores some v projections as Q6_K beside Q4_K q and k: one call runs both, in order."""
    g = torch.Generator().manual_seed(0)
    q, v = G.random_blocks("Q4_K", 32, 512, g), G.random_blocks("Q6_K", 16, 512, g)
    fused = G.GGUFLinear.from_blocks([q, v], torch.randn(48), torch.float32)
    x = torch.randn(3, 512)
    y = fused(x)
    assert torch.equal(y[:, :32], G.GGUFLinear.from_blocks([q], None, torch.float32)(x) + fused.bias[:32])
    assert torch.allclose(y, fused.reference(x), rtol=0, atol=1e-4 * fused.reference(x).abs().max().item())


def test_state_round_trip_and_q8_0_for_other_tensors():
    w = torch.randn(64, 128)
    lin = G.GGUFLinear.quantize(w, torch.randn(64), torch.bfloat16)
    assert lin.qtypes == ["Q8_0"] and lin.nbytes == 64 * 4 * 34 + 64 * 4  # fp32 bias
    again = G.GGUFLinear.from_state(lin.state())
    x = torch.randn(2, 128)
    assert torch.equal(again(x), lin(x))
    assert ((lin.dequantize() - w).abs().max() / w.abs().max()).item() < 0.01
    with pytest.raises(ValueError, match="in_features % 32"):
        G.GGUFLinear.quantize(torch.randn(8, 80), None, torch.float32)


def test_q4_0_requantizes_with_gguf_py_and_dequantizes_like_it():
    """`--weights q4_0` (for drafts): gguf-py's Q4_0 blocks, read back bit for bit as gguf-py reads them, through
    our layout and the kernel."""
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(4))
    raw = G.quantize_blocks(w, "Q4_0")
    expected = torch.from_numpy(gguf_py_dequantize(raw.numpy(), GGMLQuantizationType.Q4_0)).reshape(32, 256)
    assert torch.equal(G.dequantize(raw, "Q4_0"), expected)
    lin = G.Q4_0Linear.quantize(w, None, torch.float32)
    assert lin.qtypes == ["Q4_0"] and lin.nbytes == 32 * 256 // 32 * 18
    assert torch.equal(lin.dequantize(), expected)
    assert ((expected - w).abs().max() / w.abs().max()).item() < 0.1
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), lin.reference(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(G.GGUFLinear.from_state(lin.state())(x), lin(x))


def test_loading_a_gguf_keeps_its_blocks():
    """The target at `--weights gguf` runs the file's own Q4_K/Q6_K bytes: every linear's rows equal the file's."""
    path = hub.model_path(hub.DEFAULT_TARGET)
    model, ckpt = load_model(hub.DEFAULT_TARGET, "bfloat16", "gguf")
    source = GGUFTensorSource(open_gguf(path), ckpt.config)
    layer = model.weights.layers[0]
    for kernel, names in ((layer.down, ["model.layers.0.mlp.down_proj.weight"]),
                          (layer.qkv, [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"])):
        raws = [source.raw(n) for n in names]
        assert kernel.qtypes == [q for i, (q, _) in enumerate(raws) if i == 0 or raws[i - 1][0] != q]
        assert torch.equal(kernel.dequantize(), torch.cat([G.dequantize(r, q) for q, r in raws]))


# ---- kernel paths: AMX-INT8 tiles beside the VNNI dots ------------------------------------------------------------

def test_the_paths_this_process_has_follow_its_cpu_and_build():
    """The avx512_amx build serves with tiles where the CPU lists amx_tile and amx_int8 and the OS grants the
    state; every other build has one path. What the process has is printed at the end of the run."""
    from outrider.kernels import native

    level, flags = native.isa(), native.cpu_flags()
    assert G.paths()[0] == ("avx2" if level == "avx2" else "vnni")
    if level == "avx512_amx":
        assert {"amx_tile", "amx_int8"} <= flags
        assert G.paths() == ["vnni", "amx"], "Linux 5.16+ grants AMX state; this kernel refused it"
    else:
        assert G.paths() == G.paths()[:1]
        with pytest.raises(ValueError, match="not in this process"):
            with G.forced_path("amx"):
                pass
    least, most = G.amx_rows()
    assert 0 < least <= most  # served calls take tiles somewhere, where the path exists


AMX_ROWS = [1, 2, 5, 8, 9, 12, 16, 17, 31, 33, 64, 65, 70]  # chunk tails, the 64-row pass and a second one


def on_every_path(lin: G.GGUFLinear, x: torch.Tensor) -> dict[str, torch.Tensor]:
    outs = {}
    for path in G.paths():
        with G.forced_path(path):
            outs[path] = lin(x)
    outs["served"] = lin(x)  # the row-count window
    return outs


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_path_gives_every_row_bitwise_the_same_output(qtype, dtype):
    """Integer sums are exact on tiles as on VPDPBUSD, and the AMX path runs the VNNI path's own float epilogue per
    row: so the outputs are equal bit for bit at every row count, however the rows fall into tiles, chunks and
    passes, and a batch may switch paths with its size without a row's output moving."""
    k = 512 if qtype in G.K_QUANTS else 192
    lin = random_linear(qtype, 72, k, seed=9)  # 4.5 groups: a partial last group
    x = torch.randn(max(AMX_ROWS), k, generator=torch.Generator().manual_seed(10)).to(dtype)
    alone = lin(x[3:4])
    for m in AMX_ROWS:
        outs = on_every_path(lin, x[:m])
        first = outs[G.paths()[0]]
        for path, y in outs.items():
            assert torch.equal(y, first), (path, m)
        if m > 3:
            assert torch.equal(first[3:4], alone), m
    ref = lin.reference(x)
    assert ((first - ref).abs().max() / ref.abs().max()).item() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("qtype", KERNEL_TYPES)
def test_every_path_keeps_extreme_sums_exact_and_thread_invariant(qtype):
    """The largest codes and activations on every path (tile sums are int32 as the VNNI lanes are), and one thread
    against two on every path."""
    k = 512
    x = torch.cat([torch.ones(9, k), -torch.ones(8, k)])  # 17 rows: a full chunk, a tail, two tile shapes
    threads = torch.get_num_threads()
    for code in CODE_RANGE[qtype]:
        lin = extreme_linear(qtype, code)
        ref = lin.reference(x)
        for path in G.paths():
            with G.forced_path(path):
                y = lin(x)
                torch.set_num_threads(1)
                try:
                    one = lin(x)
                finally:
                    torch.set_num_threads(threads)
            assert torch.equal(one, y), (path, code)
            scale = ref.abs().max()
            assert ((y - ref).abs().max() / max(scale, 1e-30)).item() < 1e-5, (path, code)
