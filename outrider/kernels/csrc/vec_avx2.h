// Small AVX2 helpers shared by our CPU kernels' AVX2 build: 8-lane loads and stores of fp32 or bf16 with a tail,
// fixed-order horizontal sums, and an exp whose result depends only on its input (no lane or order effects), which
// the batch-invariant kernels need. AVX2 has no masked 16-bit loads or stores, so bf16 tails go element by element.
#pragma once

#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <cstdint>

namespace outrider {

// Lanes i < n set (all for n >= 8), for the fp32 masked loads and stores.
inline __m256i tail_mask8(int64_t n) {
  const int live = n >= 8 ? 8 : static_cast<int>(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(live), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

inline __m256 bf16x8_to_ps(__m128i h) {  // bf16 is the top half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// The first min(n, 8) values, zeros past them.
inline __m256 load8(const float* p, int64_t n) {
  return n >= 8 ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, tail_mask8(n));
}
// A bf16 tail element by element (no library call: a call in a kernel's loop makes the compiler keep that loop's
// vector registers in memory, since a call may clobber them).
inline __m128i load_u16_tail(const uint16_t* p, int64_t n) {
  __m128i h = _mm_setzero_si128();
  switch (n) {
    case 7: h = _mm_insert_epi16(h, p[6], 6); [[fallthrough]];
    case 6: h = _mm_insert_epi16(h, p[5], 5); [[fallthrough]];
    case 5: h = _mm_insert_epi16(h, p[4], 4); [[fallthrough]];
    case 4: h = _mm_insert_epi16(h, p[3], 3); [[fallthrough]];
    case 3: h = _mm_insert_epi16(h, p[2], 2); [[fallthrough]];
    case 2: h = _mm_insert_epi16(h, p[1], 1); [[fallthrough]];
    case 1: h = _mm_insert_epi16(h, p[0], 0);
  }
  return h;
}
inline void store_u16_tail(uint16_t* p, __m128i h, int64_t n) {
  switch (n) {
    case 7: p[6] = static_cast<uint16_t>(_mm_extract_epi16(h, 6)); [[fallthrough]];
    case 6: p[5] = static_cast<uint16_t>(_mm_extract_epi16(h, 5)); [[fallthrough]];
    case 5: p[4] = static_cast<uint16_t>(_mm_extract_epi16(h, 4)); [[fallthrough]];
    case 4: p[3] = static_cast<uint16_t>(_mm_extract_epi16(h, 3)); [[fallthrough]];
    case 3: p[2] = static_cast<uint16_t>(_mm_extract_epi16(h, 2)); [[fallthrough]];
    case 2: p[1] = static_cast<uint16_t>(_mm_extract_epi16(h, 1)); [[fallthrough]];
    case 1: p[0] = static_cast<uint16_t>(_mm_extract_epi16(h, 0));
  }
}

inline __m256 load8(const c10::BFloat16* p, int64_t n) {
  if (n >= 8) return bf16x8_to_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return bf16x8_to_ps(load_u16_tail(reinterpret_cast<const uint16_t*>(p), n));
}

// Round to nearest even, as c10::BFloat16(float) does (NaN stays NaN: its quiet bit survives the shift).
inline __m128i ps_to_bf16x8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i out = _mm256_blendv_epi8(rounded, quiet, nan);
  // 32 -> 16 bits: packus works within 128-bit halves, so gather the halves' low quads back in order
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(out, out), 0xD8);
  return _mm256_castsi256_si128(packed);
}

// The first min(n, 8) lanes of v.
inline void store8(float* p, __m256 v, int64_t n) {
  if (n >= 8)
    _mm256_storeu_ps(p, v);
  else
    _mm256_maskstore_ps(p, tail_mask8(n), v);
}
inline void store8(c10::BFloat16* p, __m256 v, int64_t n) {
  const __m128i h = ps_to_bf16x8(v);
  if (n >= 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
  else
    store_u16_tail(reinterpret_cast<uint16_t*>(p), h, n);
}

// Lane sums in one fixed order: the two halves, then pairs.
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float hmax8(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

// p * 2^n for integer-valued n in [-150, 128], as AVX512's VSCALEFPS gives it: two exact power-of-two factors,
// each a normal float (2^n alone may be out of fp32's exponent range), so only the last product rounds.
inline __m256 scale_pow2(__m256 p, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i half = _mm256_srai_epi32(ni, 1), rest = _mm256_sub_epi32(ni, half);
  const auto pow2 = [](__m256i e) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  };
  return _mm256_mul_ps(_mm256_mul_ps(p, pow2(half)), pow2(rest));
}

// e^x lane by lane: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, then scale by 2^n.
// Relative error about 2e-7; e^-inf = 0, which masked-out scores never reach (they are skipped, not masked).
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-104.0f));
  x = _mm256_min_ps(x, _mm256_set1_ps(88.7f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts keeps r exact
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  return scale_pow2(p, n);
}

}  // namespace outrider
