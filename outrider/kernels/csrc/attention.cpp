// Attention of new rows over a slotted KV cache, over the keys each row may see and no others, batch-invariant by
// construction.
//
// Row i of q attends over an ordered list of cache positions: its sequence's committed keys [lo, prefix_end), then
// the new rows j of its sequence (at prefix_end + j) that mask[i, j] allows (causal order for a chain, ancestors for
// a tree, a window for Mistral). Everything about the row is computed from that list alone:
//   s_t = scale * (q . k_t)            one fixed 16-lane dot product per key
//   p_t = exp(s_t - max_t s_t)         lane-wise, a function of s_t only
//   out = (sum_t p_t v_t) / (sum_t p_t) sums taken in list order (v) or in fixed 16-wide chunks of the list (p)
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

#include "vec.h"

namespace {

using namespace outrider;

// The visible cache positions of row i, in the order every sum over them is taken.
void visible_keys(int64_t i, const int64_t* lo, const int64_t* prefix_end,
                  const bool* mask, int64_t mask_cols, std::vector<int64_t>& keys) {
  keys.clear();
  for (int64_t t = lo[i]; t < prefix_end[i]; ++t) keys.push_back(t);
  for (int64_t j = 0; j < mask_cols; ++j)
    if (mask[i * mask_cols + j]) keys.push_back(prefix_end[i] + j);
}

// One (row, kv head) task: its G query heads over the L visible keys. CH = head_dim / 16 rounded up; HP heads
// share each converted value row so the accumulators (HP * CH vectors) stay in registers.
template <typename T, int CH>
void attend_task(const float* qf, int64_t G, int64_t D, const T* kbase, const T* vbase, const int64_t* keys,
                 int64_t L, float scale, float* s, T* out, int64_t out_stride) {
  constexpr int HP = CH >= 24 ? 1 : 24 / CH;
  const int64_t Lpad = (L + 15) / 16 * 16;
  __mmask16 mk[CH];
  for (int c = 0; c < CH; ++c) mk[c] = tail_mask(D - 16 * c);
  // scores: the key row is converted once and meets every query head
  for (int64_t t = 0; t < L; ++t) {
    const T* krow = kbase + keys[t] * D;
    __m512 kv[CH];
    for (int c = 0; c < CH; ++c) kv[c] = load16(krow + 16 * c, mk[c]);
    for (int64_t h = 0; h < G; ++h) {
      const float* qh = qf + h * CH * 16;
      __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qh), kv[0]);
      for (int c = 1; c < CH; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), kv[c], acc);
      s[h * Lpad + t] = _mm512_reduce_add_ps(acc) * scale;
    }
  }
  // softmax weights, unnormalized, and their sum in fixed 16-wide chunks of the list
  std::vector<float> total(G);
  for (int64_t h = 0; h < G; ++h) {
    float* sh = s + h * Lpad;
    float mx = -INFINITY;
    for (int64_t t = 0; t < L; ++t) mx = std::max(mx, sh[t]);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; t += 16) {
      const __m512 p = _mm512_maskz_mov_ps(tail_mask(L - t),
                                           exp16(_mm512_sub_ps(_mm512_loadu_ps(sh + t), _mm512_set1_ps(mx))));
      _mm512_storeu_ps(sh + t, p);
      sum = _mm512_add_ps(sum, p);
    }
    total[h] = _mm512_reduce_add_ps(sum);
  }
  // values: HP heads at a time, each lane of each head summed over the keys in list order
  for (int64_t h0 = 0; h0 < G; h0 += HP) {
    const int64_t hn = std::min<int64_t>(HP, G - h0);
    __m512 acc[HP][CH];
    for (int h = 0; h < HP; ++h)
      for (int c = 0; c < CH; ++c) acc[h][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < L; ++t) {
      const T* vrow = vbase + keys[t] * D;
      __m512 vv[CH];
      for (int c = 0; c < CH; ++c) vv[c] = load16(vrow + 16 * c, mk[c]);
      for (int h = 0; h < HP; ++h) {
        if (h >= hn) break;
        const __m512 p = _mm512_set1_ps(s[(h0 + h) * Lpad + t]);
        for (int c = 0; c < CH; ++c) acc[h][c] = _mm512_fmadd_ps(p, vv[c], acc[h][c]);
      }
    }
    for (int h = 0; h < hn; ++h) {
      const __m512 denom = _mm512_set1_ps(total[h0 + h]);
      for (int c = 0; c < CH; ++c)
        store16(out + (h0 + h) * out_stride + 16 * c, _mm512_div_ps(acc[h][c], denom), mk[c]);
    }
  }
}

template <typename T, int CH>
void attend_rows(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* slot,
                 const int64_t* lo, const int64_t* prefix_end, const bool* mask, int64_t mask_cols, double scale,
                 T* out) {
  const int64_t N = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KVH = k_cache.size(1), C = k_cache.size(2), G = H / KVH;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  // One task per (row, kv head): a task's result never depends on which thread runs it or what else runs.
  at::parallel_for(0, N * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> keys;
    std::vector<float> s, qf(G * CH * 16);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / KVH, g = task % KVH;
      visible_keys(i, lo, prefix_end, mask, mask_cols, keys);
      const int64_t L = static_cast<int64_t>(keys.size());
      s.resize(G * ((L + 15) / 16 * 16));
      for (int64_t h = 0; h < G; ++h)  // the query heads in fp32, zero past head_dim
        for (int c = 0; c < CH; ++c)
          _mm512_storeu_ps(qf.data() + (h * CH + c) * 16,
                           load16(qp + (i * H + g * G + h) * D + 16 * c, tail_mask(D - 16 * c)));
      const int64_t base = (slot[i] * KVH + g) * C * D;
      attend_task<T, CH>(qf.data(), G, D, kp + base, vp + base, keys.data(), L, static_cast<float>(scale), s.data(),
                         out + (i * H + g * G) * D, D);
    }
  });
}

template <typename T>
void attend_rows_d(int64_t D, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* slot,
                   const int64_t* lo, const int64_t* pe, const bool* mask, int64_t R, double scale, T* out) {
  switch ((D + 15) / 16) {
    case 1: return attend_rows<T, 1>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 2: return attend_rows<T, 2>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 3: return attend_rows<T, 3>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 4: return attend_rows<T, 4>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 5: return attend_rows<T, 5>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 6: return attend_rows<T, 6>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 7: return attend_rows<T, 7>(q, k, v, slot, lo, pe, mask, R, scale, out);
    case 8: return attend_rows<T, 8>(q, k, v, slot, lo, pe, mask, R, scale, out);
  }
  TORCH_CHECK(false, "attention: head_dim up to 128, got ", D);
}

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
