// Attention of new rows over a slotted KV cache, over the keys each row may see and no others, batch-invariant by
// construction.
//
// Row i of q attends over an ordered list of cache positions: its sequence's committed keys [lo, prefix_end), then
// the new rows j of its sequence (at prefix_end + j) that mask[i, j] allows (causal order for a chain, ancestors for
// a tree, a window for Mistral). Everything about the row is computed from that list alone:
//   s_t = scale * (q . k_t)            one fixed-width dot product per key (16 lanes on AVX512, 8 on AVX2)
//   p_t = exp(s_t - max_t s_t)         lane-wise, a function of s_t only
//   out = (sum_t p_t v_t) / (sum_t p_t) sums taken in list order (v) or in fixed-width chunks of the list (p)
// So a row gives the same bits alone or among others, at any cache capacity, on any thread, and a tree row equals
// the chain row that sees the same keys in the same order (its ancestors sit at other cache positions).
//
// Why not torch's SDPA: its CPU flash kernel walks keys in blocks of 512 whose results depend on the padding, so the
// Python plan had to pad every call to 512 keys and 4 query rows; a 45-token decode paid for 512 keys.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "isa.h"
#if OUTRIDER_AVX512
#include "attention_avx512.h"
#else
#include "attention_avx2.h"
#endif

namespace {

// q [N, H, D]; k_cache, v_cache [slots, KVH, capacity, D] in q's dtype (fp32 or bf16); per row: its slot, its
// committed keys [lo, prefix_end), and mask [N, R] bool over its sequence's new rows, which sit at prefix_end + j
// (written there before attending). Returns [N, H, D] in q's dtype.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& slot, const at::Tensor& lo, const at::Tensor& prefix_end,
                     const at::Tensor& mask, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.is_contiguous() && q.device().is_cpu(),
              "attention: q must be a contiguous CPU [N, H, D]");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.size(3) == q.size(2),
              "attention: caches must be contiguous [slots, kv_heads, capacity, head_dim] matching q");
  TORCH_CHECK(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
              "attention: q and the caches must share a dtype");
  TORCH_CHECK(q.size(1) % k_cache.size(1) == 0, "attention: heads must be a multiple of kv heads");
  const int64_t N = q.size(0);
  for (const auto* t : {&slot, &lo, &prefix_end})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->numel() == N && t->is_contiguous(),
                "attention: per-row index tensors must be contiguous int64 [N]");
  TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == N && mask.is_contiguous(),
              "attention: mask must be a contiguous bool [N, R]");
  const int64_t S = k_cache.size(0), C = k_cache.size(2), R = mask.size(1);
  const int64_t *sp = slot.data_ptr<int64_t>(), *lp = lo.data_ptr<int64_t>(), *pp = prefix_end.data_ptr<int64_t>();
  const bool* mp = mask.data_ptr<bool>();
  for (int64_t i = 0; i < N; ++i) {
    int64_t last = -1;  // the furthest new row this row sees
    for (int64_t j = 0; j < R; ++j)
      if (mp[i * R + j]) last = j;
    TORCH_CHECK(sp[i] >= 0 && sp[i] < S && lp[i] >= 0 && lp[i] <= pp[i] && pp[i] + last < C &&
                    (pp[i] > lp[i] || last >= 0),
                "attention: row ", i, " reads outside the cache or sees no key");
  }
  // written in q's dtype by the kernel itself: one rounding, as torch's would be, without a call to convert
  at::Tensor out = at::empty(q.sizes(), q.options());
  const int64_t D = q.size(2);
  if (q.scalar_type() == at::kFloat)
    attend_rows_d<float>(D, q, k_cache, v_cache, sp, lp, pp, mp, R, scale, out.data_ptr<float>());
  else if (q.scalar_type() == at::kBFloat16)
    attend_rows_d<c10::BFloat16>(D, q, k_cache, v_cache, sp, lp, pp, mp, R, scale, out.data_ptr<c10::BFloat16>());
  else
    TORCH_CHECK(false, "attention: fp32 or bf16 only, got ", q.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(outrider, m) {
  m.def("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slot, Tensor lo, Tensor prefix_end, "
        "Tensor mask, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(outrider, CPU, m) { m.impl("attention", attention); }
