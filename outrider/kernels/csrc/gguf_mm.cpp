// GGUF weight-only matmul with int8 activations (AVX512-VNNI), batch-invariant by construction.
//
// y[m, n] = sum_k x[m, k] * W[n, k] where W stays in its GGUF block format (Q4_K, Q6_K, Q4_0, Q5_0, Q8_0: exact codes,
// scales and mins, no requantization) in a repacked byte order (`outrider/kernels/gguf.py` `repack`: same bytes
// per block, codes reordered so one VPDPBUSD lane always belongs to one sub-block).
//
// Activations are quantized per row the way llama.cpp does (Q8_K: one fp32 scale per 256 for the K-quants; Q8_0:
// one per 32 for the 32-element formats), round-to-nearest-even of x / (amax / 127).
//
// Why it is batch-invariant: output (m, n) is computed from row m of the activations and row n of the weights only,
// by one fixed sequence of instructions (16 fp32 lanes accumulated block after block, then one fixed reduction),
// whatever M is and however the rows are split between threads. There is no split-K.
//
// Why verification is cheap: each weight block is unpacked once and then used by all M (<= 8 at a time)
// activation rows while it is in registers, so the bytes streamed per call do not grow with M, and each extra
// row costs about 8 vector instructions per 256 weights.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace {

constexpr int64_t Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14;  // GGML type ids
constexpr int ROWS = 8;                                       // activation rows kept in registers at once

inline float f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

int64_t unit_elems(int64_t t) { return (t == Q4_K || t == Q6_K) ? 256 : 64; }
int64_t unit_bytes(int64_t t) {
  switch (t) {
    case Q4_K: return 144;
    case Q6_K: return 210;
    case Q4_0: return 36;  // two 32-element blocks
    case Q5_0: return 44;
    case Q8_0: return 68;
  }
  TORCH_CHECK(false, "gguf_mm: unsupported GGML type ", t);
}
bool k_family(int64_t t) { return t == Q4_K || t == Q6_K; }

// ---- activations ------------------------------------------------------------------------------------------

// Quantize n floats with one scale: codes = rint(x / d), d = amax / 127 (0 codes when amax is 0).
inline float quantize_block(const float* x, int n, int8_t* q) {
  __m512 amax = _mm512_setzero_ps();
  for (int i = 0; i < n; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  const float d = _mm512_reduce_max_ps(amax) / 127.0f;
  if (d == 0.0f) {
    std::memset(q, 0, n);
    return 0.0f;
  }
  const __m512 vd = _mm512_set1_ps(d);
  for (int i = 0; i < n; i += 16) {
    __m512i c = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(x + i), vd));  // nearest-even
    c = _mm512_max_epi32(_mm512_min_epi32(c, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i), _mm512_cvtepi32_epi8(c));
  }
  return d;
}

// Activations are stored block-major ([block][row][...]): the rows a kernel call scores sit at fixed offsets from
// one pointer per block, so eight rows do not need eight live pointers.
//
// K-quants, per 256 block and row: codes in lane order (chunk c, lane l, byte t <- element 16 l + 4 c + t), the
// scale, and per 16-element group l: 32 * sum (Q6_K's -32 offset) and d * sum (Q4_K's mins).
struct KActs {
  int64_t M = 0;
  std::vector<int8_t> q;        // [K / 256, M, 256]
  std::vector<float> d;         // [K / 256, M]
  std::vector<int32_t> sum32;   // [K / 256, M, 16]
  std::vector<float> dsum;      // [K / 256, M, 16]
};

void quantize_k(const float* x, int64_t M, int64_t K, KActs& a) {
  const int64_t nb = K / 256;
  a.M = M;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.sum32.resize(M * nb * 16);
  a.dsum.resize(M * nb * 16);
  at::parallel_for(0, M * nb, 16, [&](int64_t begin, int64_t end) {
    alignas(64) int8_t natural[256];
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / nb, b = i % nb, j = b * M + m;
      const float d = quantize_block(x + m * K + b * 256, 256, natural);
      a.d[j] = d;
      int8_t* out = a.q.data() + j * 256;
      for (int l = 0; l < 16; ++l) {
        int32_t s = 0;
        for (int c = 0; c < 4; ++c)
          for (int t = 0; t < 4; ++t) {
            const int8_t v = natural[16 * l + 4 * c + t];
            out[64 * c + 4 * l + t] = v;
            s += v;
          }
        a.sum32[j * 16 + l] = 32 * s;
        a.dsum[j * 16 + l] = d * static_cast<float>(s);
      }
    }
  });
}

// 32-element types, per unit of two blocks (64 weights) and row: codes in natural order, and each block's scale
// repeated over the 8 lanes it fills.
struct Acts32 {
  int64_t M = 0;
  std::vector<int8_t> q;     // [K / 64, M, 64]
  std::vector<float> d;      // [K / 64, M, 16]
  std::vector<int32_t> off;  // [K / 64, M, 16] lane sums times the weight code offset (8 for Q4_0, 16 for Q5_0, 128 for Q8_0)
};

void quantize_32(const float* x, int64_t M, int64_t K, int32_t offset, Acts32& a) {
  const int64_t nu = K / 64;
  a.M = M;
  a.q.resize(M * K);
  a.d.resize(M * nu * 16);
  a.off.resize(M * nu * 16);
  at::parallel_for(0, M * nu, 32, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / nu, u = i % nu, j = u * M + m;
      for (int half = 0; half < 2; ++half) {
        const float d = quantize_block(x + m * K + u * 64 + 32 * half, 32, a.q.data() + j * 64 + 32 * half);
        for (int l = 0; l < 8; ++l) a.d[j * 16 + 8 * half + l] = d;
      }
      const int8_t* q = a.q.data() + j * 64;
      for (int l = 0; l < 16; ++l) a.off[j * 16 + l] = offset * (q[4 * l] + q[4 * l + 1] + q[4 * l + 2] + q[4 * l + 3]);
    }
  });
}

// ---- weights: per unit, unpack once (shared by all rows), then a few instructions per activation row -------
//
// Repacked K-quant block (`gguf.py` `pack`): codes of the 4 lane-order chunks as nibbles of two 64-byte vectors
// (chunk 2h in the low nibbles of vector h, chunk 2h + 1 in the high ones), so unpacking is one mask or one
// shift-and-mask per chunk; Q6_K's top two bits of chunk c sit at bits 2c, 2c + 1 of a third 64-byte vector.

// Q4_K's 12 packed bytes -> bytes 0..7 the 8 sub-scales, bytes 8..15 the 8 mins (six bits each), in one xmm with
// vector ops: scales 0..3 and mins 0..3 are the low six bits of bytes 0..3 and 4..7; scales 4..7 and mins 4..7 take
// their low four bits from the low and high nibbles of bytes 8..11 and their top two from bits 6..7 of bytes 0..3
// and 4..7. Reads 16 bytes (the
// 4 after the 12 are the block's first codes, ignored).
inline __m128i q4k_scales(const uint8_t* s) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s));
  const __m128i low = _mm_shuffle_epi8(v, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
  const __m128i top = _mm_shuffle_epi8(v, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
  const __m128i lo_bits = _mm_and_si128(_mm_srlv_epi32(low, _mm_setr_epi32(0, 0, 0, 4)),
                                        _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
  const __m128i hi_bits = _mm_and_si128(_mm_srli_epi16(top, 2), _mm_set1_epi8(0x30));  // bits 6..7 -> 4..5
  return _mm_or_si128(lo_bits, hi_bits);
}

// 16 fp32 lanes from 16 bytes times a scale
inline __m512 bytes_to_lanes(__m128i b, __m512 scale) {
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), scale);
}

inline __m512i load64(const void* p) { return _mm512_loadu_si512(p); }

template <int64_t T, int R>
void rows_k(const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t nb, const KActs& a, int64_t m0,
            float* y, int64_t y_row) {
  const int64_t M = a.M;
  const __m512i low4 = _mm512_set1_epi8(0x0F), top2 = _mm512_set1_epi8(0x30);
  for (int64_t n = 0; n < n_rows; ++n, w += row_bytes, ++y) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* blk = w;
    for (int64_t b = 0; b < nb; ++b, blk += unit_bytes(T)) {
      __m512i codes[4];
      __m512 vscale, vmin = _mm512_setzero_ps();
      const uint8_t* lo;
      if constexpr (T == Q4_K) {  // [d][dmin][12 bytes scales and mins][128 bytes nibbles]
                const __m128i sm = q4k_scales(blk + 4);
        const __m128 dd = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(blk)));
        vscale = bytes_to_lanes(_mm_unpacklo_epi8(sm, sm), _mm512_broadcastss_ps(dd));  // lane l: sub-block l / 2
        vmin = bytes_to_lanes(_mm_unpackhi_epi8(sm, sm), _mm512_broadcastss_ps(_mm_movehdup_ps(dd)));
        lo = blk + 16;
      } else {  // Q6_K: [d][16 int8 scales][128 bytes low nibbles][64 bytes of top bits]
        vscale = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)))),
            _mm512_set1_ps(f16(blk)));
        lo = blk + 18;
      }
      const __m512i z0 = load64(lo), z1 = load64(lo + 64);
      codes[0] = _mm512_and_si512(z0, low4);
      codes[1] = _mm512_and_si512(_mm512_srli_epi16(z0, 4), low4);
      codes[2] = _mm512_and_si512(z1, low4);
      codes[3] = _mm512_and_si512(_mm512_srli_epi16(z1, 4), low4);
      if constexpr (T == Q6_K) {
        const __m512i h = load64(lo + 128);
        codes[0] = _mm512_or_si512(codes[0], _mm512_and_si512(_mm512_slli_epi16(h, 4), top2));
        codes[1] = _mm512_or_si512(codes[1], _mm512_and_si512(_mm512_slli_epi16(h, 2), top2));
        codes[2] = _mm512_or_si512(codes[2], _mm512_and_si512(h, top2));
        codes[3] = _mm512_or_si512(codes[3], _mm512_and_si512(_mm512_srli_epi16(h, 2), top2));
      }
      const int64_t j = b * M + m0;  // this block of row m0; row m0 + r follows at fixed offsets
      const int8_t* qb = a.q.data() + j * 256;
      const float* db = a.d.data() + j;
      const int32_t* sb = a.sum32.data() + j * 16;
      const float* mb = a.dsum.data() + j * 16;
      for (int r = 0; r < R; ++r) {
        __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes[0], load64(qb + 256 * r));
        for (int c = 1; c < 4; ++c) isum = _mm512_dpbusd_epi32(isum, codes[c], load64(qb + 256 * r + 64 * c));
        if constexpr (T == Q6_K) isum = _mm512_sub_epi32(isum, load64(sb + 16 * r));
        const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(db[r]));
        acc[r] = _mm512_fmadd_ps(s, vscale, acc[r]);
        if constexpr (T == Q4_K) acc[r] = _mm512_fnmadd_ps(vmin, _mm512_loadu_ps(mb + 16 * r), acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[r * y_row] = _mm512_reduce_add_ps(acc[r]);
  }
}

// Two 32-weight blocks per unit: Q4_0 [d0][d1][32 bytes: low nibble code p, high code 32 + p]; Q5_0 the same with
// [u64 fifth bits] before the nibbles; Q8_0 [d0][d1][64 int8]. Codes enter VPDPBUSD unsigned (Q4_0 and Q5_0 as
// stored, Q8_0 + 128) and the offset comes off
// through the activations' lane sums.
template <int64_t T, int R>
void rows_32(const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t nu, const Acts32& a, int64_t m0,
             float* y, int64_t y_row) {
  const int64_t M = a.M;
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  for (int64_t n = 0; n < n_rows; ++n, w += row_bytes, ++y) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    const uint8_t* unit = w;
    for (int64_t u = 0; u < nu; ++u, unit += unit_bytes(T)) {
      __m512i codes;
      if constexpr (T == Q4_0 || T == Q5_0) {
        // the 32 nibble bytes in both halves; the upper half shifted down: codes 0..31 low, 32..63 high nibbles
        const __m512i z = _mm512_broadcast_i64x4(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + (T == Q5_0 ? 12 : 4))));
        codes = _mm512_and_si512(_mm512_mask_srli_epi16(z, 0xFFFF0000u, z, 4), _mm512_set1_epi8(0x0F));
        if constexpr (T == Q5_0) {
          uint64_t fifth;
          std::memcpy(&fifth, unit + 4, 8);
          codes = _mm512_mask_add_epi8(codes, fifth, codes, _mm512_set1_epi8(0x10));
        }
      } else {
        codes = _mm512_xor_si512(load64(unit + 4), _mm512_set1_epi8(static_cast<char>(0x80)));
      }
      const __m128 d01 = _mm_cvtph_ps(_mm_cvtsi32_si128(*reinterpret_cast<const int32_t*>(unit)));
      const __m512 vdw = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d01));
      const int64_t j = u * M + m0;
      const int8_t* qu = a.q.data() + j * 64;
      const float* du = a.d.data() + j * 16;
      const int32_t* ou = a.off.data() + j * 16;
      for (int r = 0; r < R; ++r) {
        const __m512i isum = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, load64(qu + 64 * r)),
                                              load64(ou + 16 * r));
        const __m512 vd = _mm512_mul_ps(vdw, _mm512_loadu_ps(du + 16 * r));
        acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), vd, acc[r]);
      }
    }
    for (int r = 0; r < R; ++r) y[r * y_row] = _mm512_reduce_add_ps(acc[r]);
  }
}

// One part's output rows [n0, n0 + n_rows) for activation rows m0 .. m0 + R - 1.
using RowsFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, const void*, int64_t, float*, int64_t);

template <int64_t T, int R>
void rows_fn(const uint8_t* w, int64_t row_bytes, int64_t n_rows, int64_t units, const void* acts, int64_t m0,
             float* y, int64_t y_row) {
  if constexpr (T == Q4_K || T == Q6_K)
    rows_k<T, R>(w, row_bytes, n_rows, units, *static_cast<const KActs*>(acts), m0, y, y_row);
  else
    rows_32<T, R>(w, row_bytes, n_rows, units, *static_cast<const Acts32*>(acts), m0, y, y_row);
}

template <int64_t T>
RowsFn rows_fn_for_rows(int64_t rows) {  // the row count is a template argument: the accumulators stay in registers
  static constexpr RowsFn table[ROWS] = {rows_fn<T, 1>, rows_fn<T, 2>, rows_fn<T, 3>, rows_fn<T, 4>,
                                         rows_fn<T, 5>, rows_fn<T, 6>, rows_fn<T, 7>, rows_fn<T, 8>};
  return table[rows - 1];
}

RowsFn rows_fn_for(int64_t t, int64_t rows) {
  switch (t) {
    case Q4_K: return rows_fn_for_rows<Q4_K>(rows);
    case Q6_K: return rows_fn_for_rows<Q6_K>(rows);
    case Q4_0: return rows_fn_for_rows<Q4_0>(rows);
    case Q5_0: return rows_fn_for_rows<Q5_0>(rows);
    case Q8_0: return rows_fn_for_rows<Q8_0>(rows);
  }
  TORCH_CHECK(false, "gguf_mm: unsupported GGML type ", t);
}

// x [M, K] (fp32 or bf16); weights: one uint8 [N_i, units * unit_bytes] per part, all with K inputs; the parts'
// outputs are concatenated, plus the bias [sum N_i] if given: y [M, sum N_i] in x's dtype.
at::Tensor gguf_mm(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef qtypes,
                   const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "gguf_mm: x must be a 2-D CPU tensor");
  TORCH_CHECK(weights.size() == qtypes.size() && !weights.empty(), "gguf_mm: one qtype per weight part");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "gguf_mm: x must be fp32 or bf16");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  std::vector<int64_t> offsets{0};
  bool need_k = false, need_32 = false;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    const int64_t t = qtypes[i];
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "gguf_mm: weight part ", i,
                " must be a contiguous uint8 [rows, bytes] tensor");
    TORCH_CHECK(K % unit_elems(t) == 0 && w.size(1) == K / unit_elems(t) * unit_bytes(t), "gguf_mm: part ", i,
                " holds ", w.size(1), " bytes per row, not what ", K, " inputs of type ", t, " need");
    (k_family(t) ? need_k : need_32) = true;
    offsets.push_back(offsets.back() + w.size(0));
  }
  const int64_t N = offsets.back();
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == N, "gguf_mm: bias has ", bias.numel(), " entries for ", N, " outputs");
  }
  KActs ka;
  Acts32 a4, a5, a8;  // the 32-weight types differ only in the code offset the lane sums carry
  const float* xp = x.data_ptr<float>();
  for (const int64_t t : qtypes) {
    if (M == 0) break;
    if (k_family(t) && ka.M == 0) quantize_k(xp, M, K, ka);
    if (t == Q4_0 && a4.M == 0) quantize_32(xp, M, K, 8, a4);
    if (t == Q5_0 && a5.M == 0) quantize_32(xp, M, K, 16, a5);
    if (t == Q8_0 && a8.M == 0) quantize_32(xp, M, K, 128, a8);
  }
  at::Tensor y32 = at::empty({M, N}, x.options());
  at::Tensor y = x_in.scalar_type() == at::kFloat ? y32 : at::empty({M, N}, x_in.options());
  float* yp = y32.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  // Thread split over output features only: it never changes what one output computes.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (size_t part = 0; part < weights.size(); ++part) {
      const int64_t lo = std::max(begin, offsets[part]), hi = std::min(end, offsets[part + 1]);
      if (lo >= hi) continue;
      const int64_t t = qtypes[part], row_bytes = weights[part].size(1);
      const uint8_t* rows = weights[part].data_ptr<uint8_t>() + (lo - offsets[part]) * row_bytes;
      const void* acts = k_family(t) ? static_cast<const void*>(&ka)
                         : t == Q4_0 ? static_cast<const void*>(&a4)
                         : t == Q5_0 ? static_cast<const void*>(&a5) : static_cast<const void*>(&a8);
      // Past 8 activation rows (prefill), a tile of weight rows that fits in L2 meets every group of 8 rows
      // before the next tile is read, so the weights stream from memory once, not once per group.
      const int64_t tile = M <= ROWS ? hi - lo : std::max<int64_t>(1, (256 << 10) / row_bytes);
      for (int64_t n0 = lo; n0 < hi; n0 += tile) {
        const int64_t nt = std::min(tile, hi - n0);
        for (int64_t m0 = 0; m0 < M; m0 += ROWS) {
          const int64_t r = std::min<int64_t>(ROWS, M - m0);
          rows_fn_for(t, r)(rows + (n0 - lo) * row_bytes, row_bytes, nt, K / unit_elems(t), acts, m0,
                            yp + m0 * N + n0, N);
        }
      }
    }
    // this thread's outputs: the bias, then the one rounding to x's dtype
    for (int64_t m = 0; m < M; ++m) {
      float* row = yp + m * N;
      if (bp)
        for (int64_t n = begin; n < end; ++n) row[n] += bp[n];
      if (x_in.scalar_type() == at::kBFloat16) {
        c10::BFloat16* out = y.data_ptr<c10::BFloat16>() + m * N;
        for (int64_t n = begin; n < end; n += 16) {
          const __mmask16 tail = outrider::tail_mask(end - n);
          outrider::store16(out + n, _mm512_maskz_loadu_ps(tail, row + n), tail);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(outrider, m) { m.def("gguf_mm(Tensor x, Tensor[] weights, int[] qtypes, Tensor? bias=None) -> Tensor"); }
TORCH_LIBRARY_IMPL(outrider, CPU, m) { m.impl("gguf_mm", gguf_mm); }
