// attention's arithmetic on AVX2 + FMA: 8-lane fp32 vectors over the head dimension, the AVX512 build's sums in the
// same list order. Included by attention.cpp only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "attention_keys.h"
#include "vec_avx2.h"

namespace {

using namespace outrider;

// scale * (q . k) over CH chunks of 8 lanes: even and odd chunks in two FMA chains (half the latency of one), then
// the lanes summed, one fixed order for every key and head.
template <int CH>
[[gnu::always_inline]] inline float score(const float* q, const __m256* k, float scale) {
  __m256 even = _mm256_mul_ps(_mm256_loadu_ps(q), k[0]);
  if constexpr (CH == 1) return hsum8(even) * scale;
  __m256 odd = _mm256_mul_ps(_mm256_loadu_ps(q + 8), k[1]);
  for (int c = 2; c + 1 < CH; c += 2) {
    even = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), k[c], even);
    odd = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c + 8), k[c + 1], odd);
  }
  if constexpr (CH % 2) even = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * (CH - 1)), k[CH - 1], even);
  return hsum8(_mm256_add_ps(even, odd)) * scale;
}

// Scores of G query heads (fp32, CH chunks of 8 each, zero past head_dim) against the L keys: the key row is
// converted once and meets every query head; s[h * Lpad + t] = scale * (q_h . k_t).
template <typename T, int CH>
void scores(const float* qf, int64_t G, int64_t D, const T* kbase, const int64_t* keys, int64_t L, int64_t Lpad,
            float scale, float* s) {
  for (int64_t t = 0; t < L; ++t) {
    const T* krow = kbase + keys[t] * D;
    __m256 kv[CH];
    for (int c = 0; c < CH; ++c) kv[c] = load8(krow + 8 * c, D - 8 * c);
    for (int64_t h = 0; h < G; ++h) s[h * Lpad + t] = score<CH>(qf + h * CH * 8, kv, scale);
  }
}

// Softmax weights, unnormalized, in place, and their sum in fixed 8-wide chunks of the list.
inline float softmax_weights(float* sh, int64_t L) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < L; ++t) mx = std::max(mx, sh[t]);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; t += 8) {  // past L: padding, zeroed
    const __m256 live = _mm256_castsi256_ps(tail_mask8(L - t));
    const __m256 p = _mm256_and_ps(exp8(_mm256_sub_ps(_mm256_loadu_ps(sh + t), _mm256_set1_ps(mx))), live);
    _mm256_storeu_ps(sh + t, p);
    sum = _mm256_add_ps(sum, p);
  }
  return hsum8(sum);
}

// One pass of the value sums for heads h0 .. h0 + HN - 1 and chunks c0 .. c0 + CN - 1: out_h = (sum_t p_t v_t) /
// total_h, each lane summed over the keys in list order, whatever the pass.
template <typename T, int HN, int CN>
void values_pass(const float* s, const float* total, int64_t h0, int c0, int64_t D, const T* vbase,
                 const int64_t* keys, int64_t L, int64_t Lpad, T* out, int64_t out_stride) {
  __m256 acc[HN][CN];
  for (int h = 0; h < HN; ++h)
    for (int c = 0; c < CN; ++c) acc[h][c] = _mm256_setzero_ps();
  for (int64_t t = 0; t < L; ++t) {
    const T* vrow = vbase + keys[t] * D + 8 * c0;
    __m256 vv[CN];
    for (int c = 0; c < CN; ++c) vv[c] = load8(vrow + 8 * c, D - 8 * (c0 + c));
    for (int h = 0; h < HN; ++h) {
      const __m256 p = _mm256_set1_ps(s[(h0 + h) * Lpad + t]);
      for (int c = 0; c < CN; ++c) acc[h][c] = _mm256_fmadd_ps(p, vv[c], acc[h][c]);
    }
  }
  for (int h = 0; h < HN; ++h) {
    const __m256 denom = _mm256_set1_ps(total[h0 + h]);
    for (int c = 0; c < CN; ++c)
      store8(out + (h0 + h) * out_stride + 8 * (c0 + c), _mm256_div_ps(acc[h][c], denom), D - 8 * (c0 + c));
  }
}

// The value sums in passes of 6 heads x 2 chunks (12 accumulators, 2 value chunks and a weight in the 16 ymm), so a
// value chunk is converted once per 6 heads; the heads and chunks left over take passes of one head or chunk.
template <typename T, int CH>
void weighted_values(const float* s, const float* total, int64_t G, int64_t D, const T* vbase, const int64_t* keys,
                     int64_t L, int64_t Lpad, T* out, int64_t out_stride) {
  constexpr int HP = 6;
  for (int c0 = 0; c0 < CH; c0 += 2) {
    const bool pair = c0 + 2 <= CH;
    int64_t h0 = 0;
    for (; h0 + HP <= G; h0 += HP)
      (pair ? values_pass<T, HP, 2> : values_pass<T, HP, 1>)(s, total, h0, c0, D, vbase, keys, L, Lpad, out, out_stride);
    for (; h0 < G; ++h0)
      (pair ? values_pass<T, 1, 2> : values_pass<T, 1, 1>)(s, total, h0, c0, D, vbase, keys, L, Lpad, out, out_stride);
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
    std::vector<float> s, total(G), qf(G * CH * 8);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / KVH, g = task % KVH;
      visible_keys(i, lo, prefix_end, mask, mask_cols, keys);
      const int64_t L = static_cast<int64_t>(keys.size()), Lpad = (L + 7) / 8 * 8;
      s.resize(G * Lpad);
      for (int64_t h = 0; h < G; ++h)  // the query heads in fp32, zero past head_dim
        for (int c = 0; c < CH; ++c)
          _mm256_storeu_ps(qf.data() + (h * CH + c) * 8, load8(qp + (i * H + g * G + h) * D + 8 * c, D - 8 * c));
      const int64_t base = (slot[i] * KVH + g) * C * D;
      scores<T, CH>(qf.data(), G, D, kp + base, keys.data(), L, Lpad, static_cast<float>(scale), s.data());
      for (int64_t h = 0; h < G; ++h) total[h] = softmax_weights(s.data() + h * Lpad, L);
      weighted_values<T, CH>(s.data(), total.data(), G, D, vp + base, keys.data(), L, Lpad, out + (i * H + g * G) * D, D);
    }
  });
}

template <typename T, int... CH>
void attend_rows_chunks(int64_t chunks, std::integer_sequence<int, CH...>, const at::Tensor& q, const at::Tensor& k,
                        const at::Tensor& v, const int64_t* slot, const int64_t* lo, const int64_t* pe,
                        const bool* mask, int64_t R, double scale, T* out) {
  using Fn = void (*)(const at::Tensor&, const at::Tensor&, const at::Tensor&, const int64_t*, const int64_t*,
                      const int64_t*, const bool*, int64_t, double, T*);
  static constexpr Fn table[] = {attend_rows<T, CH + 1>...};
  table[chunks - 1](q, k, v, slot, lo, pe, mask, R, scale, out);
}

template <typename T>
void attend_rows_d(int64_t D, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* slot,
                   const int64_t* lo, const int64_t* pe, const bool* mask, int64_t R, double scale, T* out) {
  TORCH_CHECK(D >= 1 && D <= 128, "attention: head_dim up to 128, got ", D);
  attend_rows_chunks<T>((D + 7) / 8, std::make_integer_sequence<int, 16>{}, q, k, v, slot, lo, pe, mask, R, scale,
                        out);
}

}  // namespace
