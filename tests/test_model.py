"""Our decoder against HF transformers, and the batch invariance that makes speculative greedy lossless."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import hf_model, tiny_model

from outrider.kernels.attention import KEY_BUCKET
from outrider.kernels.linear import DenseLinear
from outrider.runtime import attention
from outrider.runtime.batch import ForwardBatch

ARCHS = ["llama", "qwen2", "mistral", "llama3_rope"]
FORMATS = [(torch.float32, "dense"), (torch.bfloat16, "dense"), (torch.float32, "int8"),
           (torch.bfloat16, "int8"), (torch.float32, "int4"), (torch.bfloat16, "int4"),
           (torch.bfloat16, "gguf")]  # gguf on the native path runs through decoder_layers
# native: our C++ attention and small ops (what a CPU serves with); torch: the fallback a GPU or another CPU uses
PATHS = pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])


def prompt(n: int, seed: int = 1) -> list[int]:
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(model, cache, slot: int, tokens: list[int]) -> torch.Tensor:
    batch = ForwardBatch.chain([slot], [tokens], [cache.lengths[slot]])
    return model.forward(batch, cache).logits


@pytest.mark.parametrize("native,batch_invariant", [(True, True), (False, True), (False, False)],
                         ids=["native", "tiled", "exact"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_equal_hf_transformers(arch, native, batch_invariant):
    ours, theirs = tiny_model(arch, batch_invariant=batch_invariant, native=native), hf_model(arch)
    ids = prompt(40)  # > mistral's sliding window of 16
    logits = run(ours, ours.new_cache(1, 128), 0, ids)
    expected = theirs(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_any_layer_range_and_hidden_states_match_hf(arch):
    ours, theirs = tiny_model(arch), hf_model(arch)
    ids = prompt(12)
    expected = theirs(torch.tensor([ids]), output_hidden_states=True).hidden_states
    out = ours.forward(ForwardBatch.chain([0], [ids], [0]), ours.new_cache(1, 64),
                       hidden_layers=tuple(range(ours.num_layers)))
    for layer in range(ours.num_layers):  # HF's last entry is after the final norm, so compare the others
        torch.testing.assert_close(out.hidden[layer], expected[layer][0], atol=1e-5, rtol=1e-5)
    # Running the layers in two ranges gives the same result as one pass.
    cache = ours.new_cache(1, 64)
    batch = ForwardBatch.chain([0], [ids], [0])
    ctx = ours.context(batch, cache)
    h = ours.run_layers(ours.embed(batch.token_ids), ctx, 0, 1)
    h = ours.run_layers(h, ctx, 1, ours.num_layers)
    torch.testing.assert_close(ours.logits(h), expected_logits(theirs, ids), atol=1e-4, rtol=1e-4)


def expected_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0]


def verify_and_plain(model, ids: list[int], tail: list[int], capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Decode `tail` after `ids` one token per forward, and score tail[:width] in one verify pass for every
    width: (the verify rows, plain decoding's rows for the same prefixes) per width 1..len(tail)."""
    plain_cache, verify_cache = model.new_cache(1, capacity), model.new_cache(1, capacity)
    run(model, plain_cache, 0, ids)
    run(model, verify_cache, 0, ids)
    plain = torch.cat([run(model, plain_cache, 0, [t]) for t in tail])
    pairs = []
    for width in range(1, len(tail) + 1):
        verify_cache.truncate(0, len(ids))
        pairs.append((run(model, verify_cache, 0, tail[:width]), plain[:width]))
    return pairs


def alone_and_together(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three requests' draft rows (1, 4 and 8 of them) scored each alone and all three in one call."""
    prompts = [prompt(n, seed=n) for n in (5, 17, 33)]
    drafts = [prompt(k, seed=10 + k) for k in (1, 4, 8)]
    alone = []
    for p, d in zip(prompts, drafts):
        cache = model.new_cache(1, 128)
        run(model, cache, 0, p)
        alone.append(run(model, cache, 0, d))
    cache = model.new_cache(3, 128)
    for slot, p in enumerate(prompts):
        run(model, cache, slot, p)
    batch = ForwardBatch.chain([0, 1, 2], drafts, [len(p) for p in prompts])
    return list(zip(alone, model.forward(batch, cache).logits.split(batch.num_rows)))


@PATHS
@pytest.mark.parametrize("dtype,weights", FORMATS)
def test_verify_rows_bitwise_equal_plain_decoding(dtype, weights, native):
    """T2: decode k+1 tokens one by one, then score the same k+1 tokens in one verify pass: every row of the
    verify logits must equal, bit for bit, the logits plain decoding produced for that prefix."""
    model = tiny_model("qwen2", dtype=dtype, weights=weights, native=native)
    for width, (together, plain) in enumerate(verify_and_plain(model, prompt(30), prompt(9, seed=2), 128), 1):
        assert torch.equal(together, plain), f"width {width}: verify rows differ from plain decoding"


@PATHS
@pytest.mark.parametrize("dtype,weights", FORMATS)
def test_rows_do_not_depend_on_other_requests_in_the_call(dtype, weights, native):
    """Several requests verified in one call get the same bits as each verified alone."""
    model = tiny_model("llama", dtype=dtype, weights=weights, native=native)
    for a, t in alone_and_together(model):
        assert torch.equal(a, t)


@PATHS
def test_prefill_chunking_is_exact(native):
    """The prompt's K/V is the same whether it is prefilled at once, in chunks, or token by token."""
    model = tiny_model("llama", dtype=torch.bfloat16, weights="int8", native=native)
    ids = prompt(21)
    one, chunked, single = (model.new_cache(1, 64) for _ in range(3))
    run(model, one, 0, ids)
    run(model, chunked, 0, ids[:13])
    run(model, chunked, 0, ids[13:])
    for t in ids:
        run(model, single, 0, [t])
    for a, b, c in zip(one.keys + one.values, chunked.keys + chunked.values, single.keys + single.values):
        assert torch.equal(a[:, :, :21], b[:, :, :21]) and torch.equal(a[:, :, :21], c[:, :, :21])


@PATHS
def test_tree_mask_matches_separate_chains(native):
    """A tree scored in one pass gives each node the logits of its root-to-node chain (bit for bit on the native
    path: a node reads its ancestors' keys in the order the chain holds them, though at other cache positions)."""
    model = tiny_model("llama", native=native)
    exact = dict(atol=0, rtol=0) if native else dict(atol=1e-5, rtol=1e-5)
    ids = prompt(10)
    # nodes: 0 (root child), 1 (child of 0), 2 (root child), 3 (child of 2)
    tokens, parents = [50, 60, 70, 80], [-1, 0, -1, 2]
    mask = torch.eye(4, dtype=torch.bool)
    for i, p in enumerate(parents):
        while p >= 0:
            mask[i, p] = True
            p = parents[p]
    cache = model.new_cache(1, 64)
    run(model, cache, 0, ids)
    batch = ForwardBatch(torch.tensor(tokens), torch.tensor([10, 11, 10, 11]), [0], [4], [mask])
    tree = model.forward(batch, cache).logits
    for node, chain in ((1, [50, 60]), (3, [70, 80])):
        c = model.new_cache(1, 64)
        run(model, c, 0, ids)
        torch.testing.assert_close(tree[node], run(model, c, 0, chain)[-1], **exact)
    # Keeping the path [2, 3] compacts their K/V to positions 10, 11: the next token then sees 70, 80.
    cache.compact(0, 10, [2, 3])
    nxt = run(model, cache, 0, [90])
    c = model.new_cache(1, 64)
    run(model, c, 0, ids + [70, 80])
    torch.testing.assert_close(nxt, run(model, c, 0, [90]), **exact)


@PATHS
@pytest.mark.parametrize("dtype,weights", [(torch.float32, "dense"), (torch.bfloat16, "int8")])
def test_invariance_holds_across_key_buckets(dtype, weights, native):
    """Decode and verify rows straddling a KEY_BUCKET boundary (the torch path attends over 512 vs 1024 keys)
    agree."""
    model = tiny_model("llama", dtype=dtype, weights=weights, native=native)
    for width, (together, plain) in enumerate(straddling_the_bucket(model), 1):
        assert torch.equal(together, plain), f"width {width}: verify rows differ from plain decoding"


def straddling_the_bucket(model) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return verify_and_plain(model, prompt(KEY_BUCKET - 4, seed=5), prompt(8, seed=6), 3 * KEY_BUCKET)


def test_control_plain_linears_break_the_row_invariance(monkeypatch):
    """Control for the two tests above that compare rows bit for bit: at their shapes, linears run as one plain
    F.linear per call (not in fixed row blocks) give verify rows other bits than plain decoding, and a request
    other bits beside others than alone, so those tests can fail. fp32: on an AVX2 CPU (torch 2.13) bf16
    F.linear gave the same bits at every row count of these shapes, so no bf16 control exists there."""
    monkeypatch.setattr(DenseLinear, "__call__", lambda self, x: F.linear(x, self.weight, self.bias))
    model = tiny_model("qwen2", native=False)
    assert not all(torch.equal(t, p) for t, p in verify_and_plain(model, prompt(30), prompt(9, seed=2), 128))
    assert not all(torch.equal(a, t) for a, t in alone_and_together(tiny_model("llama", native=False)))


def test_control_unbucketed_keys_break_the_invariance_across_buckets(monkeypatch):
    """Control for the key-bucket test: attending over just the live keys (no padding to KEY_BUCKET) gives the
    rows straddling a bucket boundary other bits in a verify pass than in plain decoding. fp32 only: on the Intel
    Xeon with AMX (torch 2.13) bf16 attention over the live keys gave the same bits as over the bucket, so no bf16
    control exists there (on the AMD EPYC machines it did break)."""
    monkeypatch.setattr(attention, "bucket_keys", lambda length, capacity: length)
    model = tiny_model("llama", dtype=torch.float32, weights="dense", native=False)
    assert not all(torch.equal(t, p) for t, p in straddling_the_bucket(model))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_exact_plan_decodes_like_hf(arch):
    """The drafter's cheaper attention plan, step by step over a prompt longer than Mistral's window."""
    ours, theirs = tiny_model(arch, batch_invariant=False, native=False), hf_model(arch)
    ids = prompt(30)
    cache = ours.new_cache(1, 64)
    run(ours, cache, 0, ids[:10])
    steps = torch.cat([run(ours, cache, 0, [t]) for t in ids[10:]])
    torch.testing.assert_close(steps, theirs(torch.tensor([ids])).logits[0, 10:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_fused_layers_are_bitwise_the_per_layer_path(arch):
    """With GGUF-format linears the native path runs a forward's layers in one C++ call (`decoder_layers`): it
    gives exactly what the layer-by-layer path gives (logits, hidden states, every K/V written) for a prompt, two
    sequences in one call, a tree and a layer slice (qwen2: q/k/v biases; mistral: a sliding window)."""
    fused, layered = (tiny_model(arch, dtype=torch.bfloat16, weights="gguf") for _ in range(2))
    layered._fused_args = lambda start, end: None  # noqa: E731 - pins the per-layer path
    assert fused._fused_args(0, fused.num_layers) is not None
    caches = {m: m.new_cache(2, 64) for m in (fused, layered)}
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    batches = [ForwardBatch.chain([0], [prompt(19)], [0]),
               ForwardBatch.chain([1], [prompt(7, seed=2)], [0]),
               ForwardBatch.chain([0, 1], [[5, 6, 7], [8]], [19, 7]),
               ForwardBatch(torch.tensor([9, 10, 11]), torch.tensor([8, 9, 9]), [1], [3], [tree])]
    for batch in batches:
        out = {m: m.forward(batch, caches[m], hidden_layers=(1,)) for m in (fused, layered)}
        assert torch.equal(out[fused].logits, out[layered].logits)
        assert torch.equal(out[fused].hidden[1], out[layered].hidden[1])
    for a, b in zip(caches[fused].keys + caches[fused].values, caches[layered].keys + caches[layered].values):
        assert torch.equal(a, b)
    h = fused.embed(torch.tensor([12, 13]))
    sliced = {m: m.run_layers(h, m.context(ForwardBatch.chain([0], [[12, 13]], [22]), caches[m]), 1, m.num_layers)
              for m in (fused, layered)}  # slot 0 holds 22 positions: the rows go at 22, 23
    assert torch.equal(sliced[fused], sliced[layered])
