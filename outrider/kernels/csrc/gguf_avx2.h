// gguf_mm's arithmetic on AVX2 + FMA + F16C (Haswell+, Zen 1+): the AVX512 build's layout and loop order, each
// 16-row group taken as two halves of 8 lanes, one 32-bit lane per output row. Included by gguf_mm.cpp only.
//
// AVX2 has no VPDPBUSD. VPMADDUBSW multiplies unsigned weight codes by signed activation codes and adds adjacent
// pairs into int16 lanes, saturating: it and the VPADDW sums after it are exact only while every int16 total stays
// below 2^15. The activations' |code| <= 127 and each format's code range bound those totals (worked out at each
// dot below); Q8_0's signed weights, whose +128 codes would overflow, take the sign trick instead: |w| <= 128 by
// the activation with w's sign (llama.cpp's AVX2 dot products do the same). VPMADDWD then widens to int32 and
// applies the K-quants' six- or eight-bit sub-scales, which are integers: a block's whole sum, its mins and its
// code offsets stay exact integers, and each block costs two float operations per row and lane, not one per
// sub-block.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gguf_layout.h"
#include "vec_avx2.h"

namespace {

// Rows per pass: one int32 sum per row beside eight code vectors in the 16 ymm registers, the rest spilled to L1.
// Measured cache-resident on Zen 3 (in-process A/B, CPU cycles per row and 4096 weights): 6 rows per pass took
// 5 and 6 rows from 172 and 180 to 151 and 149 (Q4_K; Q6_K 212, 202 -> 186, 173) against 4; 8 spilled more than
// it saved.
constexpr int64_t rows_per_pass(int64_t) { return 6; }

// ---- activations ------------------------------------------------------------------------------------------

// Quantize n floats (a multiple of 16) with one scale: codes = rint(x / d), d = amax / 127 (0 codes when amax is 0).
template <typename In>  // float or c10::BFloat16 (read as the fp32 it is)
inline float quantize_block(const In* x, int n, int8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax = _mm256_setzero_ps();
  for (int i = 0; i < n; i += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, outrider::load8(x + i, 8)));
  const float d = outrider::hmax8(amax) / 127.0f;
  if (d == 0.0f) {
    std::memset(q, 0, n);
    return 0.0f;
  }
  const __m256 vd = _mm256_set1_ps(d);
  const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
  for (int i = 0; i < n; i += 16) {
    __m256i c[2];
    for (int k = 0; k < 2; ++k) {
      c[k] = _mm256_cvtps_epi32(_mm256_div_ps(outrider::load8(x + i + 8 * k, 8), vd));  // nearest-even
      c[k] = _mm256_max_epi32(_mm256_min_epi32(c[k], hi), lo);
    }
    // packs works within 128-bit halves: order the int16s as the 16 inputs before narrowing to bytes
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8);
    const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), b);
  }
  return d;
}

// Two sub-block code sums as the int16 pair (even, odd) of one int32, what VPMADDWD takes.
inline int32_t pair16(int32_t even, int32_t odd) {
  return static_cast<int32_t>(static_cast<uint16_t>(even) | (static_cast<uint32_t>(static_cast<uint16_t>(odd)) << 16));
}

// Activations, block-major ([block][row]) as in the AVX512 build. Per block and row: the codes in natural order,
// the scale d, and `sums`: the K-quants' sub-block code sums in int16 pairs (Q4_K 8 sums of 32, |sum| <= 4064;
// Q6_K 16 sums of 16), Q4_0 / Q5_0 their code offset times the block's sum, nothing for Q8_0 (signed weights).
struct Acts {
  int64_t M = 0;
  std::vector<int8_t> q;      // [blocks, M, E]
  std::vector<float> d;       // [blocks, M]
  std::vector<int32_t> sums;  // Q4_K: [blocks, M, 4]; Q6_K: [blocks, M, 8]; Q4_0, Q5_0: [blocks, M]
};

constexpr int64_t sum_words(int64_t t) { return t == Q4_K ? 4 : t == Q6_K ? 8 : 1; }

inline void block_sums(int64_t t, const int8_t* q, int32_t* out) {
  if (t == Q4_K || t == Q6_K) {
    const int sub = t == Q4_K ? 32 : 16;
    for (int w = 0; w < sum_words(t); ++w)
      out[w] = pair16(sum_codes(q + sub * 2 * w, sub), sum_codes(q + sub * (2 * w + 1), sub));
  } else if (t != Q8_0) {
    out[0] = (t == Q4_0 ? 8 : 16) * sum_codes(q, 32);
  }
}

template <typename In>
void quantize(const In* x, int64_t M, int64_t K, int64_t t, Acts& a) {
  const int64_t E = block_elems(t), nb = K / E, words = sum_words(t);
  a.M = M;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.sums.resize(M * nb * words);
  // A parallel region costs more than quantizing a decode step's few thousand values: split only real batches.
  at::parallel_for(0, M * nb, std::max<int64_t>(1, (1 << 15) / E), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / nb, b = i % nb, j = b * M + m;
      int8_t* q = a.q.data() + j * E;
      a.d[j] = quantize_block(x + m * K + b * E, E, q);
      block_sums(t, q, a.sums.data() + j * words);
    }
  });
}

// ---- one group of 16 output rows, R activation rows, half h = rows 8h .. 8h + 7 -----------------------------

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i bcast4(const int8_t* p) {  // 4 activation codes into every lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline __m256 f16x8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256i u8x8(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline __m256i i8x8(const uint8_t* p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
// Each int32 lane v (|v| < 2^15) as the int16 pair (v, v): a per-row multiplier of both halves for VPMADDWD.
inline __m256i dup16(__m256i v) {
  return _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(v, 16));
}
inline __m256i pair_lanes(__m256i even, __m256i odd) {  // int16 pairs (even, odd) per lane
  return _mm256_or_si256(_mm256_and_si256(even, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(odd, 16));
}
inline __m256i ones16() { return _mm256_set1_epi16(1); }

// 4 nibble vectors (64 bytes apart, this half's 32 bytes of each) -> 8 steps: vector v holds step v low, v + 4 high.
inline void unpack_nibbles(const uint8_t* p, __m256i* c) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int v = 0; v < 4; ++v) {
    const __m256i z = load32(p + 64 * v);
    c[v] = _mm256_and_si256(z, low4);
    c[v + 4] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
  }
}

// Sum over STEPS steps of codes (unsigned) times an activation row's codes (signed), in int16 lanes: each lane adds
// 2 products per step, so it is exact while 2 * STEPS * max code * 127 < 2^15 (the callers' bounds).
template <int STEPS>
[[gnu::always_inline]] inline __m256i dot16(const __m256i* c, const int8_t* x) {
  __m256i s = _mm256_maddubs_epi16(c[0], bcast4(x));
  for (int t = 1; t < STEPS; ++t) s = _mm256_add_epi16(s, _mm256_maddubs_epi16(c[t], bcast4(x + 4 * t)));
  return s;
}

// The 6-bit sub-scales and mins of one Q4_K block of 16 rows (layout in gguf.py: 128 bytes of low nibbles, 64 of
// top bits) -> byte 16 s + i: row i's sub-scale / min of sub-block s, as the AVX512 build decodes them.
inline void q4k_scales(const uint8_t* low, const uint8_t* top, uint8_t* sc, uint8_t* mn) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), bits45 = _mm256_set1_epi8(0x30);
  for (int q = 0; q < 4; ++q) {  // sub-blocks 2q (bytes 0-15) and 2q + 1 (16-31); the odd one's top bits are >> 4
    const __m256i l = load32(low + 32 * q);
    __m256i t = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(top + 16 * q)));
    t = _mm256_srlv_epi64(t, _mm256_set_epi64x(4, 4, 0, 0));
    const __m256i s = _mm256_or_si256(_mm256_and_si256(l, low4), _mm256_and_si256(_mm256_slli_epi16(t, 4), bits45));
    const __m256i m = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 4), low4),
                                      _mm256_and_si256(_mm256_slli_epi16(t, 2), bits45));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(sc + 32 * q), s);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(mn + 32 * q), m);
  }
}

// Q4_K: w = d * sc_s * q - dmin * m_s, sub-block s of 32. Per row and lane, in integers: T = sum_s sc_s (q . a)_s
// (dot16<8>: 16 products of <= 15 * 127 per int16 lane, 30,480; T <= 8 * 2 * 30,480 * 63 < 2^25) and
// Mn = sum_s m_s (sum a)_s; then y += d_a (d T - dmin Mn).
template <int R>
[[gnu::always_inline]] inline void q4k_block(const uint8_t* codes, const uint8_t* p, const Acts& a, int64_t j,
                                             __m256* acc, uintptr_t ahead) {
  alignas(32) uint8_t sc_bytes[128], mn_bytes[128];
  q4k_scales(p + 64, p + 192, sc_bytes, mn_bytes);
  const int8_t* xq = a.q.data() + j * 256;
  const int32_t* sums = a.sums.data() + j * 4;
  for (int h = 0; h < 2; ++h) {
    __m256i sc[8], mn[4];
    for (int s = 0; s < 8; ++s) sc[s] = dup16(u8x8(sc_bytes + 16 * s + 8 * h));
    for (int q = 0; q < 4; ++q) mn[q] = pair_lanes(u8x8(mn_bytes + 32 * q + 8 * h), u8x8(mn_bytes + 32 * q + 16 + 8 * h));
    __m256i tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_si256();
    for (int s = 0; s < 8; ++s) {
      prefetch_share<code_bytes(Q4_K) + param_bytes(Q4_K), 16>(ahead, 8 * h + s);
      __m256i c[8];
      unpack_nibbles(codes + 256 * s + 32 * h, c);
      for (int r = 0; r < R; ++r)
        tot[r] = _mm256_add_epi32(tot[r], _mm256_madd_epi16(dot16<8>(c, xq + 256 * r + 32 * s), sc[s]));
    }
    const __m256 d = f16x8(p + 16 * h), dmin = f16x8(p + 32 + 16 * h);
    for (int r = 0; r < R; ++r) {
      __m256i m = _mm256_madd_epi16(mn[0], _mm256_set1_epi32(sums[4 * r]));
      for (int q = 1; q < 4; ++q) m = _mm256_add_epi32(m, _mm256_madd_epi16(mn[q], _mm256_set1_epi32(sums[4 * r + q])));
      const __m256 da = _mm256_set1_ps(a.d[j + r]);
      acc[2 * r + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot[r]), _mm256_mul_ps(d, da), acc[2 * r + h]);
      acc[2 * r + h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m), _mm256_mul_ps(dmin, da), acc[2 * r + h]);
    }
  }
}

// Q6_K: w = d * sc_s * (q - 32), sub-block s of 16 (four steps: three byte vectors, the fourth step's six bits in
// their top two bits). Per row and lane: T = sum_s sc_s (q . a)_s - 32 sum_s sc_s (sum a)_s, where each dot16<2>
// adds 4 products of <= 63 * 127 per int16 lane (32,004) and |T| <= 256 * 63 * 127 * 128 < 2^29; then y += d_a d T.
template <int R>
[[gnu::always_inline]] inline void q6k_block(const uint8_t* codes, const uint8_t* p, const Acts& a, int64_t j,
                                             __m256* acc, uintptr_t ahead) {
  const uint8_t* scales = p + 32;  // int8, byte 16 s + i
  const __m256i six = _mm256_set1_epi8(0x3F), low2 = _mm256_set1_epi8(0x03);
  const __m256i bits23 = _mm256_set1_epi8(0x0C), bits45 = _mm256_set1_epi8(0x30);
  const int8_t* xq = a.q.data() + j * 256;
  const int32_t* sums = a.sums.data() + j * 8;
  for (int h = 0; h < 2; ++h) {
    __m256i tot[R];
    for (int r = 0; r < R; ++r) tot[r] = _mm256_setzero_si256();
    for (int s = 0; s < 16; ++s) {
      prefetch_share<code_bytes(Q6_K) + param_bytes(Q6_K), 32>(ahead, 16 * h + s);
      const __m256i sc = dup16(i8x8(scales + 16 * s + 8 * h));
      const uint8_t* v = codes + 192 * s + 32 * h;
      const __m256i A = load32(v), B = load32(v + 64), C = load32(v + 128);
      __m256i c[4];
      c[0] = _mm256_and_si256(A, six);
      c[1] = _mm256_and_si256(B, six);
      c[2] = _mm256_and_si256(C, six);
      // step 3: bits 0-1 from A's top, 2-3 from B's, 4-5 from C's
      c[3] = _mm256_or_si256(_mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 6), low2),
                                             _mm256_and_si256(_mm256_srli_epi16(B, 4), bits23)),
                             _mm256_and_si256(_mm256_srli_epi16(C, 2), bits45));
      for (int r = 0; r < R; ++r) {
        const int8_t* x = xq + 256 * r + 16 * s;
        const __m256i first = _mm256_madd_epi16(dot16<2>(c, x), sc), second = _mm256_madd_epi16(dot16<2>(c + 2, x + 8), sc);
        tot[r] = _mm256_add_epi32(tot[r], _mm256_add_epi32(first, second));
      }
    }
    __m256i scp[8];  // (sc_2q, sc_2q+1) pairs, for the code offset
    for (int q = 0; q < 8; ++q) scp[q] = pair_lanes(i8x8(scales + 32 * q + 8 * h), i8x8(scales + 32 * q + 16 + 8 * h));
    const __m256 d = f16x8(p + 16 * h);
    for (int r = 0; r < R; ++r) {
      __m256i off = _mm256_madd_epi16(scp[0], _mm256_set1_epi32(sums[8 * r]));
      for (int q = 1; q < 8; ++q) off = _mm256_add_epi32(off, _mm256_madd_epi16(scp[q], _mm256_set1_epi32(sums[8 * r + q])));
      const __m256i t = _mm256_sub_epi32(tot[r], _mm256_slli_epi32(off, 5));
      acc[2 * r + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(d, _mm256_set1_ps(a.d[j + r])), acc[2 * r + h]);
    }
  }
}

// Q5_0's fifth bits of one step and half (bit k: byte k) -> 0x10 in the bytes whose bit is set.
inline __m256i fifth_bits(const uint8_t* p) {
  uint32_t bits;
  std::memcpy(&bits, p, 4);
  const __m256i spread = _mm256_shuffle_epi8(  // byte k <- bits' byte k / 8 (each 128-bit half holds all four)
      _mm256_set1_epi32(static_cast<int32_t>(bits)),
      _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));  // byte k: 1 << (k % 8)
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10));
}

// Q8_0's signed codes w times an activation row: VPMADDUBSW(|w|, a with w's sign) per step, each int16 lane two
// products of <= 128 * 127 (32,512), widened at once.
[[gnu::always_inline]] inline __m256i dot_signed(const __m256i* w, const __m256i* aw, const int8_t* x) {
  __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw[0], _mm256_sign_epi8(bcast4(x), w[0])), ones16());
  for (int t = 1; t < 8; ++t)
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(aw[t], _mm256_sign_epi8(bcast4(x + 4 * t), w[t])),
                                              ones16()));
  return s;
}

// The block's integer sum for one row: Q4_0 w = d (q - 8), Q5_0 w = d (q - 16) with the offsets off through the
// activations' block sums (dot16<8> of <= 15 * 127: 30,480; Q5_0 two dot16<4> of <= 31 * 127: 31,496); Q8_0 w = d q.
template <int64_t T>
[[gnu::always_inline]] inline __m256i block32_sum(const __m256i* c, const __m256i* aw, const int8_t* x, int32_t off) {
  if constexpr (T == Q8_0) return dot_signed(c, aw, x);
  __m256i s;
  if constexpr (T == Q5_0)
    s = _mm256_add_epi32(_mm256_madd_epi16(dot16<4>(c, x), ones16()), _mm256_madd_epi16(dot16<4>(c + 4, x + 16), ones16()));
  else
    s = _mm256_madd_epi16(dot16<8>(c, x), ones16());
  return _mm256_sub_epi32(s, _mm256_set1_epi32(off));
}

template <int64_t T, int R>
[[gnu::always_inline]] inline void block32(const uint8_t* codes, const uint8_t* p, const Acts& a, int64_t j,
                                           __m256* acc, uintptr_t ahead) {
  prefetch_share<code_bytes(T) + param_bytes(T), 1>(ahead, 0);
  const int8_t* xq = a.q.data() + j * 32;
  for (int h = 0; h < 2; ++h) {
    __m256i c[8], aw[8];
    if constexpr (T == Q8_0) {
      for (int t = 0; t < 8; ++t) {
        c[t] = _mm256_xor_si256(load32(codes + 64 * t + 32 * h), _mm256_set1_epi8(static_cast<char>(0x80)));  // code - 128
        aw[t] = _mm256_abs_epi8(c[t]);
      }
    } else {
      unpack_nibbles(codes + 32 * h, c);
      if constexpr (T == Q5_0)
        for (int t = 0; t < 8; ++t) c[t] = _mm256_or_si256(c[t], fifth_bits(codes + 256 + 8 * t + 4 * h));
    }
    const __m256 dw = f16x8(p + 16 * h);
    for (int r = 0; r < R; ++r) {
      const __m256i isum = block32_sum<T>(c, aw, xq + 32 * r, T == Q8_0 ? 0 : a.sums[j + r]);
      acc[2 * r + h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(a.d[j + r])), dw,
                                       acc[2 * r + h]);
    }
  }
}

// One group (all blocks of 16 weight rows) against activation rows m0 .. m0 + R - 1: y[r * y_row + lane] for the
// first `lanes` lanes.
using LaneMask = int64_t;
inline LaneMask lane_mask(int64_t live) { return live; }

template <int64_t T, int R>
void group_rows(const uint8_t* g, int64_t nb, const Acts& a, int64_t m0, float* y, int64_t y_row, LaneMask lanes) {
  __m256 acc[2 * R];  // row r: lanes 0-7, then 8-15
  for (int i = 0; i < 2 * R; ++i) acc[i] = _mm256_setzero_ps();
  constexpr int64_t CB = code_bytes(T), PB = param_bytes(T), RB = record_blocks(T);
  for (int64_t b0 = 0; b0 < nb; b0 += RB, g += RB * (CB + PB)) {
    const int64_t n = std::min(RB, nb - b0);
    for (int64_t i = 0; i < n; ++i) {
      const uint8_t *params = g + i * PB, *codes = g + n * PB + i * CB;
      const int64_t j = (b0 + i) * a.M + m0;  // this block of row m0; row m0 + r follows at fixed offsets
      const uintptr_t ahead = reinterpret_cast<uintptr_t>(g) + PREFETCH_AHEAD + i * (CB + PB);  // its share, ahead
      if constexpr (T == Q4_K)
        q4k_block<R>(codes, params, a, j, acc, ahead);
      else if constexpr (T == Q6_K)
        q6k_block<R>(codes, params, a, j, acc, ahead);
      else
        block32<T, R>(codes, params, a, j, acc, ahead);
    }
  }
  for (int r = 0; r < R; ++r) {
    outrider::store8(y + r * y_row, acc[2 * r], lanes);
    if (lanes > 8) outrider::store8(y + r * y_row + 8, acc[2 * r + 1], lanes - 8);
  }
}

// One row's fp32 outputs rounded once to bf16.
inline void store_bf16(const float* row, c10::BFloat16* out, int64_t n) {
  for (int64_t i = 0; i < n; i += 8) outrider::store8(out + i, outrider::load8(row + i, n - i), n - i);
}

}  // namespace
