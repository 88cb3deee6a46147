// GGUF weight-only matmul with int8 activations (AVX512-VNNI), batch-invariant by construction.
//
// y[m, n] = sum_k x[m, k] * W[n, k] where W stays in its GGUF block format (Q4_K, Q6_K, Q5_0, Q8_0: exact codes,
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

namespace {

constexpr int64_t Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14;  // GGML type ids
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
    case Q5_0: return 44;  // two 32-element blocks
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

// K-quant activations of one row: per 256 block, codes in lane order (chunk c, lane l, byte t <- element
// 16 l + 4 c + t), the scale, and per 16-element group l: 32 * sum (for Q6_K's -32 offset) and d * sum (Q4_K's mins).
struct KActs {
  std::vector<int8_t> q;        // [M, K]
  std::vector<float> d;         // [M, K / 256]
  std::vector<int32_t> sum32;   // [M, K / 256, 16]
  std::vector<float> dsum;      // [M, K / 256, 16]
};

void quantize_k(const float* x, int64_t M, int64_t K, KActs& a) {
  const int64_t nb = K / 256;
  a.q.resize(M * K);
  a.d.resize(M * nb);
  a.sum32.resize(M * nb * 16);
  a.dsum.resize(M * nb * 16);
  at::parallel_for(0, M * nb, 16, [&](int64_t begin, int64_t end) {
    alignas(64) int8_t natural[256];
    for (int64_t i = begin; i < end; ++i) {
      const float d = quantize_block(x + i * 256, 256, natural);
      a.d[i] = d;
      int8_t* out = a.q.data() + i * 256;
      for (int l = 0; l < 16; ++l) {
        int32_t s = 0;
        for (int c = 0; c < 4; ++c)
          for (int t = 0; t < 4; ++t) {
            const int8_t v = natural[16 * l + 4 * c + t];
            out[64 * c + 4 * l + t] = v;
            s += v;
          }
        a.sum32[i * 16 + l] = 32 * s;
        a.dsum[i * 16 + l] = d * static_cast<float>(s);
      }
    }
  });
}

// 32-element activations of one row: natural order, one scale per 32 expanded to the 8 lanes that block fills.
struct Acts32 {
  std::vector<int8_t> q;   // [M, K]
  std::vector<float> d;    // [M, K / 64, 16]
};

void quantize_32(const float* x, int64_t M, int64_t K, Acts32& a) {
  const int64_t nb = K / 32;
  a.q.resize(M * K);
  a.d.resize(M * nb * 8);
  at::parallel_for(0, M * nb, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float d = quantize_block(x + i * 32, 32, a.q.data() + i * 32);
      for (int l = 0; l < 8; ++l) a.d[i * 8 + l] = d;
    }
  });
}

// ---- weights: per unit, unpack once (shared by all rows), then a few instructions per activation row -------

inline void q4k_scales(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
    sc[j + 4] = (s[j + 8] & 0x0F) | ((s[j] >> 6) << 4);
    mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
  }
}

// 16 lanes, lane l = v[l / 2] (a Q4_K sub-block of 32 is two 16-element groups)
inline __m512 pairs_to_lanes(const uint8_t v[8], float scale) {
  const __m128i b = _mm_unpacklo_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)),
                                      _mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), _mm512_set1_ps(scale));
}

inline __m512i nibbles(const uint8_t* p) {  // 32 bytes -> 64 codes: low nibbles, then high nibbles
  const __m512i z = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_and_si512(_mm512_mask_blend_epi64(0xF0, z, _mm512_srli_epi16(z, 4)), _mm512_set1_epi8(0x0F));
}

template <int64_t T>
void dot_rows_k(const uint8_t* w, int64_t nb, const KActs& a, int64_t K, int64_t m0, int64_t rows, float* out) {
  __m512 acc[ROWS];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i hi_shift = _mm512_set_epi64(6 * 0x0001000100010001LL, 6 * 0x0001000100010001LL,
                                            4 * 0x0001000100010001LL, 4 * 0x0001000100010001LL,
                                            2 * 0x0001000100010001LL, 2 * 0x0001000100010001LL, 0, 0);
  for (int64_t b = 0; b < nb; ++b, w += unit_bytes(T)) {
    __m512i codes[4];
    __m512 vscale, vmin = _mm512_setzero_ps();
    if constexpr (T == Q4_K) {
      uint8_t sc[8], mn[8];
      q4k_scales(w + 4, sc, mn);
      vscale = pairs_to_lanes(sc, f16(w));
      vmin = pairs_to_lanes(mn, f16(w + 2));
      for (int c = 0; c < 4; ++c) codes[c] = nibbles(w + 16 + 32 * c);
    } else {  // Q6_K: [d][16 int8 scales][128 bytes low nibbles][64 bytes of 2-bit highs]
      vscale = _mm512_mul_ps(
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 2)))),
          _mm512_set1_ps(f16(w)));
      for (int c = 0; c < 4; ++c) {
        __m512i h = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 146 + 16 * c)));
        h = _mm512_and_si512(_mm512_slli_epi16(_mm512_srlv_epi16(h, hi_shift), 4), _mm512_set1_epi8(0x30));
        codes[c] = _mm512_or_si512(nibbles(w + 18 + 32 * c), h);
      }
    }
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const int8_t* q = a.q.data() + m * K + b * 256;
      __m512i isum = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) isum = _mm512_dpbusd_epi32(isum, codes[c], _mm512_loadu_si512(q + 64 * c));
      const int64_t i = m * nb + b;
      if constexpr (T == Q6_K) isum = _mm512_sub_epi32(isum, _mm512_loadu_si512(a.sum32.data() + i * 16));
      const __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(a.d[i]));
      acc[r] = _mm512_fmadd_ps(s, vscale, acc[r]);
      if constexpr (T == Q4_K) acc[r] = _mm512_fnmadd_ps(vmin, _mm512_loadu_ps(a.dsum.data() + i * 16), acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

template <int64_t T>
void dot_rows_32(const uint8_t* w, int64_t nu, const Acts32& a, int64_t K, int64_t m0, int64_t rows, float* out) {
  __m512 acc[ROWS];
  for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t u = 0; u < nu; ++u, w += unit_bytes(T)) {
    // two blocks of 32: signed codes as |w| (unsigned) and a sign mask moved onto the activations
    __m512i sw;
    if constexpr (T == Q5_0) {  // [d0][d1][u64 fifth bits][32 bytes nibbles]
      uint64_t fifth;
      std::memcpy(&fifth, w + 4, 8);
      const __m512i c = _mm512_or_si512(nibbles(w + 12), _mm512_maskz_mov_epi8(fifth, _mm512_set1_epi8(0x10)));
      sw = _mm512_sub_epi8(c, _mm512_set1_epi8(16));
    } else {  // Q8_0: [d0][d1][64 int8]
      sw = _mm512_loadu_si512(w + 4);
    }
    const __m512i aw = _mm512_abs_epi8(sw);
    const __mmask64 neg = _mm512_movepi8_mask(sw);
    const __m512 vdw = _mm512_castsi512_ps(_mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_castps_si256(_mm256_set1_ps(f16(w)))),
        _mm256_castps_si256(_mm256_set1_ps(f16(w + 2))), 1));
    for (int r = 0; r < rows; ++r) {
      const int64_t m = m0 + r;
      const __m512i q = _mm512_loadu_si512(a.q.data() + m * K + u * 64);
      const __m512i qs = _mm512_mask_sub_epi8(q, neg, _mm512_setzero_si512(), q);
      const __m512i isum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, qs);
      const __m512 vd = _mm512_mul_ps(vdw, _mm512_loadu_ps(a.d.data() + (m * nu + u) * 16));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), vd, acc[r]);
    }
  }
  for (int r = 0; r < rows; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

using RowFn = void (*)(const uint8_t*, int64_t, const void*, int64_t, int64_t, int64_t, float*);

template <int64_t T>
void row_fn(const uint8_t* w, int64_t n_units, const void* acts, int64_t K, int64_t m0, int64_t rows, float* out) {
  if constexpr (T == Q4_K || T == Q6_K)
    dot_rows_k<T>(w, n_units, *static_cast<const KActs*>(acts), K, m0, rows, out);
  else
    dot_rows_32<T>(w, n_units, *static_cast<const Acts32*>(acts), K, m0, rows, out);
}

RowFn row_fn_for(int64_t t) {
  switch (t) {
    case Q4_K: return row_fn<Q4_K>;
    case Q6_K: return row_fn<Q6_K>;
    case Q5_0: return row_fn<Q5_0>;
    case Q8_0: return row_fn<Q8_0>;
  }
  TORCH_CHECK(false, "gguf_mm: unsupported GGML type ", t);
}

// x [M, K] (fp32 or bf16); weights: one uint8 [N_i, units * unit_bytes] per part, all with K inputs; the parts'
// outputs are concatenated: y [M, sum N_i] in x's dtype.
at::Tensor gguf_mm(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef qtypes) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "gguf_mm: x must be a 2-D CPU tensor");
  TORCH_CHECK(weights.size() == qtypes.size() && !weights.empty(), "gguf_mm: one qtype per weight part");
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
  KActs ka;
  Acts32 a32;
  if (M > 0 && need_k) quantize_k(x.data_ptr<float>(), M, K, ka);
  if (M > 0 && need_32) quantize_32(x.data_ptr<float>(), M, K, a32);
  at::Tensor y32 = at::empty({N, M}, x.options());  // transposed: each thread writes whole output rows
  float* yp = y32.data_ptr<float>();
  // Thread split over output features only: it never changes what one output computes.
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    size_t part = 0;
    for (int64_t n = begin; n < end; ++n) {
      while (n >= offsets[part + 1]) ++part;
      const int64_t t = qtypes[part];
      const uint8_t* row = weights[part].data_ptr<uint8_t>() + (n - offsets[part]) * weights[part].size(1);
      const void* acts = k_family(t) ? static_cast<const void*>(&ka) : static_cast<const void*>(&a32);
      const RowFn fn = row_fn_for(t);
      for (int64_t m0 = 0; m0 < M; m0 += ROWS)
        fn(row, K / unit_elems(t), acts, K, m0, std::min<int64_t>(ROWS, M - m0), yp + n * M + m0);
    }
  });
  return y32.t().to(x_in.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY(outrider_gguf, m) { m.def("mm(Tensor x, Tensor[] weights, int[] qtypes) -> Tensor"); }
TORCH_LIBRARY_IMPL(outrider_gguf, CPU, m) { m.impl("mm", gguf_mm); }
