// The small ops' arithmetic on AVX2 + FMA: 8-lane fp32 vectors with tails, the AVX512 build's operations in the
// same order. Included by ops.cpp only.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec_avx2.h"

namespace {

using namespace outrider;

// y = x / sqrt(mean(x^2) + eps) * w, the sum of squares taken in 8 lanes over the row, then one fixed reduction.
template <typename T, typename W>
void rms_norm_rows(const T* x, const W* w, T* y, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      __m256 ss = _mm256_setzero_ps();
      for (int64_t i = 0; i < n; i += 8) {
        const __m256 v = load8(xr + i, n - i);
        ss = _mm256_fmadd_ps(v, v, ss);
      }
      const float inv = 1.0f / std::sqrt(hsum8(ss) / static_cast<float>(n) + eps);
      const __m256 vinv = _mm256_set1_ps(inv);
      for (int64_t i = 0; i < n; i += 8)
        store8(y + r * n + i, _mm256_mul_ps(_mm256_mul_ps(load8(xr + i, n - i), vinv), load8(w + i, n - i)), n - i);
    }
  });
}

// HF's rotate_half RoPE on one head: out[d] = x[d] cos[d] - x[d + D/2] sin[d] for d < D/2 and
// x[d] cos[d] + x[d - D/2] sin[d] above, in fp32.
template <typename T>
void rope_head(const T* x, const float* cos, const float* sin, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 8) {
    const int64_t m = half - d;
    const __m256 a = load8(x + d, m), b = load8(x + half + d, m);
    store8(out + d, _mm256_fnmadd_ps(b, load8(sin + d, m), _mm256_mul_ps(a, load8(cos + d, m))), m);
    store8(out + half + d, _mm256_fmadd_ps(a, load8(sin + half + d, m), _mm256_mul_ps(b, load8(cos + half + d, m))), m);
  }
}

// gate_up [N, 2 I] (gate, then up) -> SiLU(gate) * up [N, I]; SiLU(g) = g / (1 + e^-g).
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t N, int64_t I) {
  at::parallel_for(0, N * ((I + 1023) / 1024), 1, [&](int64_t begin, int64_t end) {
    const int64_t per_row = (I + 1023) / 1024;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / per_row, lo = (task % per_row) * 1024, hi = std::min<int64_t>(I, lo + 1024);
      for (int64_t i = lo; i < hi; i += 8) {
        const int64_t m = hi - i;
        const __m256 g = load8(gu + r * 2 * I + i, m), u = load8(gu + r * 2 * I + I + i, m);
        const __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        store8(out + r * I + i, _mm256_mul_ps(silu, u), m);
      }
    }
  });
}

// The index of each row's maximum, as torch.argmax(-1) picks it: the first of equal maxima, and a NaN above
// everything (the first NaN). Two vector passes over the row: its maximum, then where it first occurs.
inline int64_t argmax_row(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-INFINITY);
  int nan = 0;
  int64_t i = 0;
  for (; i + 8 <= n && !nan; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    nan = _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    best = _mm256_max_ps(best, v);
  }
  if (nan) return i - 8 + __builtin_ctz(nan);
  float m = hmax8(best);
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    m = std::max(m, x[i]);
  }
  const __m256 vm = _mm256_set1_ps(m);
  for (i = 0; i + 8 <= n; i += 8) {
    const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vm, _CMP_EQ_OQ));
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // unreachable: some element equals the maximum
}

// The sum of n bytes, 128 at a time (read_bytes' per-thread share).
inline int64_t sum_bytes(const uint8_t* q, int64_t n) {
  const __m256i zero = _mm256_setzero_si256();
  __m256i a = zero, b = zero;  // byte sums in 64-bit lanes (VPSADBW), two chains
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const auto at = [&](int64_t o) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i + o)); };
    a = _mm256_add_epi64(a, _mm256_add_epi64(_mm256_sad_epu8(at(0), zero), _mm256_sad_epu8(at(32), zero)));
    b = _mm256_add_epi64(b, _mm256_add_epi64(_mm256_sad_epu8(at(64), zero), _mm256_sad_epu8(at(96), zero)));
  }
  alignas(32) int64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), _mm256_add_epi64(a, b));
  int64_t s = lanes[0] + lanes[1] + lanes[2] + lanes[3];
  for (; i < n; ++i) s += q[i];
  return s;
}

}  // namespace
