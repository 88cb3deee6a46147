// gguf_mm's arithmetic on AVX512-VNNI: one VPDPBUSD lane per output row, 16 rows in one zmm (Zen 4+, Ice Lake+).
//
// A block's codes and scales are unpacked once for 16 rows and then serve every activation row while they sit in
// registers; each activation row then costs little more than its VPDPBUSDs (one per 64 weights), and a lane ends
// holding its output, with no horizontal sum. Included by gguf_mm.cpp only.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gguf_layout.h"
#include "vec.h"

namespace {

constexpr int ROWS = 8;  // activation rows kept in registers at once, at most
// Rows per pass: past these the accumulators spill (Q4_K keeps two per row plus eight code vectors; measured
// cache-resident, a seventh Q4_K row cost twice a sixth).
constexpr int64_t rows_per_pass(int64_t t) { return t == Q4_K ? 6 : t == Q6_K ? 5 : ROWS; }

// ---- activations ------------------------------------------------------------------------------------------

// Quantize n floats with one scale: codes = rint(x / d), d = amax / 127 (0 codes when amax is 0).
template <typename In>  // float or c10::BFloat16 (read as the fp32 it is)
inline float quantize_block(const In* x, int n, int8_t* q) {
  const __mmask16 all = 0xFFFF;
  __m512 amax = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(outrider::load16(x + i, all)));
  const float d = _mm512_reduce_max_ps(amax) / 127.0f;
  if (d == 0.0f) {
    std::memset(q, 0, n);
    return 0.0f;
  }
  const __m512 vd = _mm512_set1_ps(d);
  for (int i = 0; i < n; i += 16) {
    __m512i c = _mm512_cvtps_epi32(_mm512_div_ps(outrider::load16(x + i, all), vd));  // nearest-even
    c = _mm512_max_epi32(_mm512_min_epi32(c, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(c));
  }
  return d;
}

// Activations, block-major ([block][row]): the rows one kernel call scores sit at fixed offsets from one pointer
// per block. Per block and row: the codes in natural order, the scale d, and what each type's code offset or
// mins need: Q4_K d * (sum of each 32), Q6_K 32 * (sum of each 16), the 32-weight types offset * (block sum).
struct Acts {
  int64_t M = 0;
  std::vector<int8_t> q;          // [blocks, M, E]
  std::vector<float> d;           // [blocks, M]
  std::vector<float> dsum;        // Q4_K: [blocks, M, 8]
  std::vector<int32_t> off;       // Q6_K: [blocks, M, 16]; 32-weight types: [blocks, M]
};

template <typename In>
void quantize(const In* x, int64_t M, int64_t K, int64_t t, Acts& a) {
  const int64_t E = block_elems(t), nb = K / E;
  const int64_t offset = t == Q4_0 ? 8 : t == Q5_0 ? 16 : 128;  // Q8_0 codes enter VPDPBUSD as code + 128
  const int64_t per = t == Q4_K ? 8 : t == Q6_K ? 16 : 1;
  a.M = M;
  // Zero codes past the last row: an AMX tile of 16 rows may read up to 15 rows beyond a pass (gguf_amx.h).
  a.q.resize(M * K + 16 * E);
  a.d.resize(M * nb);
  if (t == Q4_K)
    a.dsum.resize(M * nb * per);
  else
    a.off.resize(M * nb * per);
  // A parallel region costs more than quantizing a decode step's few thousand values: split only real batches.
  at::parallel_for(0, M * nb, std::max<int64_t>(1, (1 << 15) / E), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / nb, b = i % nb, j = b * M + m;
      int8_t* q = a.q.data() + j * E;
      const float d = quantize_block(x + m * K + b * E, E, q);
      a.d[j] = d;
      if (t == Q4_K)
        for (int s = 0; s < 8; ++s) a.dsum[j * 8 + s] = d * static_cast<float>(sum_codes(q + 32 * s, 32));
      else if (t == Q6_K)
        for (int s = 0; s < 16; ++s) a.off[j * 16 + s] = 32 * sum_codes(q + 16 * s, 16);
      else
        a.off[j] = static_cast<int32_t>(offset) * sum_codes(q, 32);
    }
  });
}

// ---- one group of 16 output rows, R activation rows ---------------------------------------------------------

inline __m512i load64(const void* p) { return _mm512_loadu_si512(p); }
inline __m512 set1(float v) { return _mm512_set1_ps(v); }
inline __m512i bcast4(const int8_t* p) {  // 4 activation codes into every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline __m512 f16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 u8x16(const uint8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// 4 nibble vectors -> the 8 steps of 32 inputs (vector v: step v low, step v + 4 high)
inline void unpack_nibbles(const uint8_t* p, __m512i* c) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int v = 0; v < 4; ++v) {
    const __m512i z = load64(p + 64 * v);
    c[v] = _mm512_and_si512(z, low4);
    c[v + 4] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low4);
  }
}

// Sum over `steps` of codes times an activation row's codes; VPDPBUSD: unsigned codes, signed activations. With
// one activation row, two interleaved chains: nothing else would hide a chain's latency. Integer sums are exact in
// any order, so the split does not change the result.
template <int STEPS, bool SPLIT>
inline __m512i dot_steps(const __m512i* c, const int8_t* x) {
  if constexpr (!SPLIT) {
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], bcast4(x));
    for (int t = 1; t < STEPS; ++t) s = _mm512_dpbusd_epi32(s, c[t], bcast4(x + 4 * t));
    return s;
  }
  __m512i even = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[0], bcast4(x));
  __m512i odd = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c[1], bcast4(x + 4));
  for (int t = 2; t < STEPS; t += 2) {
    even = _mm512_dpbusd_epi32(even, c[t], bcast4(x + 4 * t));
    odd = _mm512_dpbusd_epi32(odd, c[t + 1], bcast4(x + 4 * t + 4));
  }
  return _mm512_add_epi32(even, odd);
}

// ---- integer sums: the codes of one group and block as VPDPBUSD operands ------------------------------------
//
// Each type's codes come as `Codes<T>`: `sub(s)` unpacks sub-block s into `c` (STEPS vectors of 16 rows x 4 codes,
// one VPDPBUSD operand each, which is also an AMX B tile of STEPS rows, gguf_amx.h) and asks for its share of the
// lines ahead; `dot<R>(r, s)` is row r's exact integer sum over it. The float epilogues below take their integer
// sums from any such source, so the AMX path (sums read back from tiles) runs the very same float operations.

template <int64_t T> struct Codes {  // Q4_0, Q5_0, Q8_0: one sub-block of 32
  static constexpr int SUBS = 1, STEPS = 8, X_ROW = 32;
  const uint8_t* codes;
  const int8_t* x;
  uintptr_t ahead;
  __m512i c[STEPS];
  [[gnu::always_inline]] void sub(int) {
    prefetch_share<code_bytes(T) + param_bytes(T), 1>(ahead, 0);
    if constexpr (T == Q8_0) {
      for (int t = 0; t < 8; ++t) c[t] = load64(codes + 64 * t);
    } else {
      unpack_nibbles(codes, c);
      if constexpr (T == Q5_0) {
        const __m512i sixteen = _mm512_set1_epi8(0x10);
        for (int t = 0; t < 8; ++t) {
          uint64_t fifth;
          std::memcpy(&fifth, codes + 256 + 8 * t, 8);
          c[t] = _mm512_mask_add_epi8(c[t], fifth, c[t], sixteen);
        }
      }
    }
  }
  template <int R> [[gnu::always_inline]] __m512i dot(int r, int) const { return dot_steps<STEPS, R == 1>(c, x + X_ROW * r); }
};

template <> struct Codes<Q4_K> {  // sub-block of 32: 8 steps of nibbles
  static constexpr int SUBS = 8, STEPS = 8, X_ROW = 256;
  const uint8_t* codes;
  const int8_t* x;  // row 0's codes of this block
  uintptr_t ahead;
  __m512i c[STEPS];
  [[gnu::always_inline]] void sub(int s) {
    prefetch_share<code_bytes(Q4_K) + param_bytes(Q4_K), SUBS>(ahead, s);
    unpack_nibbles(codes + 256 * s, c);
  }
  template <int R> [[gnu::always_inline]] __m512i dot(int r, int s) const {
    return dot_steps<STEPS, R == 1>(c, x + X_ROW * r + 32 * s);
  }
};

template <> struct Codes<Q6_K> {  // sub-block of 16: three byte vectors, the fourth step's six bits in their top two
  static constexpr int SUBS = 16, STEPS = 4, X_ROW = 256;
  const uint8_t* codes;
  const int8_t* x;
  uintptr_t ahead;
  __m512i c[STEPS];
  [[gnu::always_inline]] void sub(int s) {
    prefetch_share<code_bytes(Q6_K) + param_bytes(Q6_K), SUBS>(ahead, s);
    const __m512i six = _mm512_set1_epi8(0x3F), low2 = _mm512_set1_epi8(0x03), low4 = _mm512_set1_epi8(0x0F);
    const uint8_t* v = codes + 192 * s;
    const __m512i A = load64(v), B = load64(v + 64), C = load64(v + 128);
    c[0] = _mm512_and_si512(A, six);
    c[1] = _mm512_and_si512(B, six);
    c[2] = _mm512_and_si512(C, six);
    // step 3: bits 0-1 from A's top, 2-3 from B's, 4-5 from C's (0xE4: mask ? first : second)
    const __m512i ab = _mm512_ternarylogic_epi32(_mm512_srli_epi16(A, 6), _mm512_srli_epi16(B, 4), low2, 0xE4);
    c[3] = _mm512_and_si512(_mm512_ternarylogic_epi32(ab, _mm512_srli_epi16(C, 2), low4, 0xE4), six);
  }
  template <int R> [[gnu::always_inline]] __m512i dot(int r, int s) const {
    return dot_steps<STEPS, R == 1>(c, x + X_ROW * r + 16 * s);
  }
};

// ---- float epilogues: one block of 16 weight rows against R activation rows (j: row 0's block index) ---------

// Q4_K: w = d * sc_s * q - dmin * m_s, sub-block s of 32.
template <int R, class Sums>
[[gnu::always_inline]] inline void q4k_block(const uint8_t* p, const Acts& a, int64_t j, __m512* acc, Sums& sums) {
  const __m512 d = f16x16(p), dmin = f16x16(p + 32);
  const uint8_t *low = p + 64, *top = p + 192;
  alignas(64) uint8_t scale_bytes[128], min_bytes[128];  // byte 16 s + i: row i's six-bit sub-scale / min
  const __m512i low4 = _mm512_set1_epi8(0x0F), bits45 = _mm512_set1_epi8(0x30);
  for (int h = 0; h < 2; ++h) {  // sub-blocks 4h .. 4h + 3 at once: their top bits are bytes 32h .. 32h + 31
    const __m512i l = load64(low + 64 * h);
    __m512i t = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(top + 32 * h)));
    t = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0), t);       // pair q for s = 2q, 2q + 1
    t = _mm512_srlv_epi16(t, _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0, 0,
                                              0x0004000400040004LL, 0x0004000400040004LL, 0, 0));  // odd s: >> 4
    // (a & 0x0F) | b, with b already masked to bits 4-5
    const __m512i sc = _mm512_ternarylogic_epi32(l, _mm512_and_si512(_mm512_slli_epi16(t, 4), bits45), low4, 0xEC);
    const __m512i mn = _mm512_ternarylogic_epi32(_mm512_srli_epi16(l, 4),
                                                 _mm512_and_si512(_mm512_slli_epi16(t, 2), bits45), low4, 0xEC);
    _mm512_store_si512(scale_bytes + 64 * h, sc);
    _mm512_store_si512(min_bytes + 64 * h, mn);
  }
  __m512 fsum[R];
  for (int r = 0; r < R; ++r) fsum[r] = _mm512_setzero_ps();
  const float* xs = a.dsum.data() + j * 8;
  for (int s = 0; s < 8; ++s) {
    const __m512 scale = _mm512_mul_ps(u8x16(scale_bytes + 16 * s), d);
    const __m512 minv = _mm512_mul_ps(u8x16(min_bytes + 16 * s), dmin);
    sums.sub(s);
    for (int r = 0; r < R; ++r) {
      const __m512i isum = sums.template dot<R>(r, s);
      fsum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, fsum[r]);
      acc[r] = _mm512_fnmadd_ps(minv, set1(xs[8 * r + s]), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(fsum[r], set1(a.d[j + r]), acc[r]);
}

// Q6_K: w = d * sc_s * (q - 32), sub-block s of 16.
template <int R, class Sums>
[[gnu::always_inline]] inline void q6k_block(const uint8_t* p, const Acts& a, int64_t j, __m512* acc, Sums& sums) {
  const __m512 d = f16x16(p);
  const uint8_t* scales = p + 32;
  __m512 fsum[R];
  for (int r = 0; r < R; ++r) fsum[r] = _mm512_setzero_ps();
  const int32_t* off = a.off.data() + j * 16;
  for (int s = 0; s < 16; ++s) {
    const __m512 scale = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 16 * s)))),
        d);
    sums.sub(s);
    for (int r = 0; r < R; ++r) {
      const __m512i isum = _mm512_sub_epi32(sums.template dot<R>(r, s), _mm512_set1_epi32(off[16 * r + s]));
      fsum[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, fsum[r]);
    }
  }
  for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(fsum[r], set1(a.d[j + r]), acc[r]);
}

// Q4_0 w = d (q - 8), Q5_0 w = d (q - 16), Q8_0 w = d q (entering as q + 128): the offset comes off through the
// activations' block sums.
template <int R, class Sums>
[[gnu::always_inline]] inline void block32(const uint8_t* p, const Acts& a, int64_t j, __m512* acc, Sums& sums) {
  const __m512 dw = f16x16(p);
  sums.sub(0);
  for (int r = 0; r < R; ++r) {
    const __m512i isum = _mm512_sub_epi32(sums.template dot<R>(r, 0), _mm512_set1_epi32(a.off[j + r]));
    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum), set1(a.d[j + r])), dw, acc[r]);
  }
}

template <int64_t T, int R, class Sums>
[[gnu::always_inline]] inline void block_epilogue(const uint8_t* params, const Acts& a, int64_t j, __m512* acc, Sums& sums) {
  if constexpr (T == Q4_K)
    q4k_block<R>(params, a, j, acc, sums);
  else if constexpr (T == Q6_K)
    q6k_block<R>(params, a, j, acc, sums);
  else
    block32<R>(params, a, j, acc, sums);
}

// Walks a group's records: f(params, codes, b, ahead) for each block b in order.
template <int64_t T, class F>
[[gnu::always_inline]] inline void for_each_block(const uint8_t* g, int64_t nb, F&& f) {
  constexpr int64_t CB = code_bytes(T), PB = param_bytes(T), RB = record_blocks(T);
  for (int64_t b0 = 0; b0 < nb; b0 += RB, g += RB * (CB + PB)) {
    const int64_t n = std::min(RB, nb - b0);
    for (int64_t i = 0; i < n; ++i) {
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(g) + PREFETCH_AHEAD + i * (CB + PB);  // its share, ahead
      f(g + i * PB, g + n * PB + i * CB, b0 + i, ahead);
    }
  }
}

// One group (all blocks of 16 weight rows) against activation rows m0 .. m0 + R - 1: y[r * y_row + lane] for the
// lanes set in `lanes`.
using LaneMask = __mmask16;
inline LaneMask lane_mask(int64_t live) { return outrider::tail_mask(live); }

template <int64_t T, int R>
void group_rows(const uint8_t* g, int64_t nb, const Acts& a, int64_t m0, float* y, int64_t y_row, __mmask16 lanes) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  for_each_block<T>(g, nb, [&](const uint8_t* params, const uint8_t* codes, int64_t b, uintptr_t ahead) {
    const int64_t j = b * a.M + m0;  // this block of row m0; row m0 + r follows at fixed offsets
    Codes<T> sums{codes, a.q.data() + j * block_elems(T), ahead, {}};
    block_epilogue<T, R>(params, a, j, acc, sums);
  });
  for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * y_row, lanes, acc[r]);
}

// One row's fp32 outputs rounded once to bf16.
inline void store_bf16(const float* row, c10::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 tail = outrider::tail_mask(n - i);
    outrider::store16(out + i, _mm512_maskz_loadu_ps(tail, row + i), tail);
  }
}

}  // namespace
