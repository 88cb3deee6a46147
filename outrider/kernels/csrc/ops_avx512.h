// The small ops' arithmetic on AVX512: 16-lane fp32 vectors with tail masks. Included by ops.cpp only.
#pragma once

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace {

using namespace outrider;

// y = x / sqrt(mean(x^2) + eps) * w, the sum of squares taken in 16 lanes over the row, then one fixed reduction.
template <typename T, typename W>
void rms_norm_rows(const T* x, const W* w, T* y, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      __m512 ss = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 v = load16(xr + i, tail_mask(n - i));
        ss = _mm512_fmadd_ps(v, v, ss);
      }
      const float inv = 1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps);
      const __m512 vinv = _mm512_set1_ps(inv);
      for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 m = tail_mask(n - i);
        store16(y + r * n + i, _mm512_mul_ps(_mm512_mul_ps(load16(xr + i, m), vinv), load16(w + i, m)), m);
      }
    }
  });
}

// HF's rotate_half RoPE on one head: out[d] = x[d] cos[d] - x[d + D/2] sin[d] for d < D/2 and
// x[d] cos[d] + x[d - D/2] sin[d] above, in fp32.
template <typename T>
void rope_head(const T* x, const float* cos, const float* sin, int64_t D, T* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; d += 16) {
    const __mmask16 m = tail_mask(half - d);
    const __m512 a = load16(x + d, m), b = load16(x + half + d, m);
    store16(out + d, _mm512_fnmadd_ps(b, _mm512_maskz_loadu_ps(m, sin + d), _mm512_mul_ps(a, _mm512_maskz_loadu_ps(m, cos + d))), m);
    store16(out + half + d, _mm512_fmadd_ps(a, _mm512_maskz_loadu_ps(m, sin + half + d),
                                            _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, cos + half + d))), m);
  }
}

// gate_up [N, 2 I] (gate, then up) -> SiLU(gate) * up [N, I]; SiLU(g) = g / (1 + e^-g).
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t N, int64_t I) {
  at::parallel_for(0, N * ((I + 1023) / 1024), 1, [&](int64_t begin, int64_t end) {
    const int64_t per_row = (I + 1023) / 1024;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / per_row, lo = (task % per_row) * 1024, hi = std::min<int64_t>(I, lo + 1024);
      for (int64_t i = lo; i < hi; i += 16) {
        const __mmask16 m = tail_mask(hi - i);
        const __m512 g = load16(gu + r * 2 * I + i, m), u = load16(gu + r * 2 * I + I + i, m);
        const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store16(out + r * I + i, _mm512_mul_ps(silu, u), m);
      }
    }
  });
}

// The index of each row's maximum, as torch.argmax(-1) picks it: the first of equal maxima, and a NaN above
// everything (the first NaN). torch's CPU argmax took about 210 us for one 151,936-wide row of logits here and
// 500 us for four; two vector passes over the row (its maximum, then where it first occurs) take a few.
int64_t argmax_row(const float* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= n && !nan; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    best = _mm512_max_ps(best, v);
  }
  if (nan) return i - 16 + __builtin_ctz(nan);
  float m = _mm512_reduce_max_ps(best);
  for (; i < n; ++i) {
    if (std::isnan(x[i])) return i;
    m = std::max(m, x[i]);
  }
  const __m512 vm = _mm512_set1_ps(m);
  for (i = 0; i + 16 <= n; i += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), vm, _CMP_EQ_OQ);
    if (hit) return i + __builtin_ctz(hit);
  }
  for (; i < n; ++i)
    if (x[i] == m) return i;
  return 0;  // unreachable: some element equals the maximum
}

// The sum of n bytes, 128 at a time (read_bytes' per-thread share).
inline int64_t sum_bytes(const uint8_t* q, int64_t n) {
  const __m512i zero = _mm512_setzero_si512();
  __m512i a = zero, b = zero;  // byte sums in 64-bit lanes (VPSADBW), two chains
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    a = _mm512_add_epi64(a, _mm512_sad_epu8(_mm512_loadu_si512(q + i), zero));
    b = _mm512_add_epi64(b, _mm512_sad_epu8(_mm512_loadu_si512(q + i + 64), zero));
  }
  int64_t s = _mm512_reduce_add_epi64(_mm512_add_epi64(a, b));
  for (; i < n; ++i) s += q[i];
  return s;
}

}  // namespace
