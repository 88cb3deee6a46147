// attention's arithmetic on AVX512: 16-lane fp32 vectors over the head dimension. Included by attention.cpp only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "attention_keys.h"
#include "vec.h"

namespace {

using namespace outrider;

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

}  // namespace
