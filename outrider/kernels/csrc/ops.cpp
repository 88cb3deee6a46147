// The small per-token ops of a decoder layer, each one call instead of the several torch ops (and their dispatch,
// about 3 us apiece) it replaces: RMSNorm, RoPE with the K/V cache write, and SiLU(gate) * up. Also the argmax of
// greedy decoding, and the plain read that `outrider bench kernels` sets the kernels' bytes per second against.
//
// All of them work row by row with fp32 math and one rounding to the output dtype, so a row's result never depends
// on the other rows in the call (batch invariance) or on the thread that computes it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>

#include "isa.h"
#if OUTRIDER_AVX512
#include "ops_avx512.h"
#else
#include "ops_avx2.h"
#endif

namespace {

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.device().is_cpu() && x_in.size(-1) == w_in.numel(), "rms_norm: x [..., n] and w [n] on the CPU");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t n = x.size(-1), rows = n ? x.numel() / n : 0;
  const auto run = [&](auto* xp, auto* yp) {
    if (w.scalar_type() == at::kFloat)
      rms_norm_rows(xp, w.data_ptr<float>(), yp, rows, n, static_cast<float>(eps));
    else if (w.scalar_type() == at::kBFloat16)
      rms_norm_rows(xp, w.data_ptr<c10::BFloat16>(), yp, rows, n, static_cast<float>(eps));
    else
      TORCH_CHECK(false, "rms_norm: weight must be fp32 or bf16");
  };
  if (x.scalar_type() == at::kFloat)
    run(x.data_ptr<float>(), y.data_ptr<float>());
  else if (x.scalar_type() == at::kBFloat16)
    run(x.data_ptr<c10::BFloat16>(), y.data_ptr<c10::BFloat16>());
  else
    TORCH_CHECK(false, "rms_norm: x must be fp32 or bf16");
  return y;
}

// qkv [N, (H + 2 KVH) D] (q heads, then k heads, then v heads): rotates q and k by the rows' cos/sin [N, D] (fp32),
// stores k and v at cache[slot[i], :, pos[i]] and returns the rotated q [N, H, D]. Writing before attending is
// what lets every query read all its keys, its own row's included, from the cache.
template <typename T>
void rope_store_rows(const T* qkv, const float* cos, const float* sin, T* kc, T* vc, const int64_t* slot,
                     const int64_t* pos, int64_t N, int64_t H, int64_t KVH, int64_t D, int64_t C, T* q) {
  const int64_t width = (H + 2 * KVH) * D;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* row = qkv + i * width;
      const float *c = cos + i * D, *s = sin + i * D;
      for (int64_t h = 0; h < H; ++h) rope_head(row + h * D, c, s, D, q + (i * H + h) * D);
      for (int64_t g = 0; g < KVH; ++g) {
        const int64_t at = ((slot[i] * KVH + g) * C + pos[i]) * D;
        rope_head(row + (H + g) * D, c, s, D, kc + at);
        std::memcpy(vc + at, row + (H + KVH + g) * D, D * sizeof(T));
      }
    }
  });
}

at::Tensor rope_store(const at::Tensor& qkv_in, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                      const at::Tensor& v_cache, const at::Tensor& slot, const at::Tensor& pos, int64_t heads) {
  const at::Tensor qkv = qkv_in.contiguous();
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == qkv.scalar_type() &&
                  v_cache.scalar_type() == qkv.scalar_type(),
              "rope_store: caches must be contiguous [slots, kv_heads, capacity, head_dim] in qkv's dtype");
  const int64_t N = qkv.size(0), KVH = k_cache.size(1), C = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(D % 2 == 0 && qkv.dim() == 2 && qkv.size(1) == (heads + 2 * KVH) * D, "rope_store: qkv must be [N, (",
              heads, " + 2 * ", KVH, ") * ", D, "]");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == N * D && sin.numel() == N * D,
              "rope_store: cos and sin must be contiguous fp32 [N, head_dim]");
  TORCH_CHECK(slot.scalar_type() == at::kLong && pos.scalar_type() == at::kLong && slot.numel() == N &&
                  pos.numel() == N && slot.is_contiguous() && pos.is_contiguous(),
              "rope_store: slot and pos must be contiguous int64 [N]");
  const int64_t *sp = slot.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(sp[i] >= 0 && sp[i] < k_cache.size(0) && pp[i] >= 0 && pp[i] < C, "rope_store: row ", i,
                " writes outside the cache (slot ", sp[i], ", position ", pp[i], ")");
  at::Tensor q = at::empty({N, heads, D}, qkv.options());
  if (qkv.scalar_type() == at::kFloat)
    rope_store_rows(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<float>(),
                    v_cache.data_ptr<float>(), sp, pp, N, heads, KVH, D, C, q.data_ptr<float>());
  else if (qkv.scalar_type() == at::kBFloat16)
    rope_store_rows(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<float>(), sin.data_ptr<float>(),
                    k_cache.data_ptr<c10::BFloat16>(), v_cache.data_ptr<c10::BFloat16>(), sp, pp, N, heads, KVH, D, C,
                    q.data_ptr<c10::BFloat16>());
  else
    TORCH_CHECK(false, "rope_store: fp32 or bf16 only");
  return q;
}

at::Tensor silu_mul(const at::Tensor& gu_in) {
  const at::Tensor gu = gu_in.contiguous();
  TORCH_CHECK(gu.dim() == 2 && gu.size(1) % 2 == 0, "silu_mul: gate_up must be [N, 2 I]");
  const int64_t N = gu.size(0), I = gu.size(1) / 2;
  at::Tensor out = at::empty({N, I}, gu.options());
  if (gu.scalar_type() == at::kFloat)
    silu_mul_rows(gu.data_ptr<float>(), out.data_ptr<float>(), N, I);
  else if (gu.scalar_type() == at::kBFloat16)
    silu_mul_rows(gu.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), N, I);
  else
    TORCH_CHECK(false, "silu_mul: fp32 or bf16 only");
  return out;
}

at::Tensor argmax_rows(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) > 0 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "argmax_rows: x must be a non-empty fp32 CPU [N, V]");
  const at::Tensor x = x_in.contiguous();
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({N}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row(xp + r * V, V);
  });
  return out;
}

// Every byte of the tensors read once, each tensor's rows split over the threads as gguf_mm splits its groups,
// and nothing else: the memory bound a weight-streaming kernel is measured against (`outrider bench kernels`).
// Returns the bytes' sum, so the reads cannot be dropped (and a test can check that all of them were read).
int64_t read_bytes(at::TensorList tensors) {
  int64_t total = 0;
  for (const auto& t : tensors) {
    TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "read_bytes: contiguous CPU tensors only");
    const auto* p = static_cast<const uint8_t*>(t.data_ptr());
    const int64_t rows = t.dim() > 0 ? t.size(0) : 1;
    if (t.numel() == 0) continue;
    const int64_t row_bytes = static_cast<int64_t>(t.nbytes()) / rows;
    std::atomic<int64_t> sum{0};
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      sum += sum_bytes(p + begin * row_bytes, (end - begin) * row_bytes);
    });
    total += sum;
  }
  return total;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(outrider, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope_store(Tensor qkv, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot, "
        "Tensor pos, int heads) -> Tensor");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("read_bytes(Tensor[] tensors) -> int");
  m.def("argmax_rows(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(outrider, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rope_store", rope_store);
  m.impl("silu_mul", silu_mul);
  m.impl("read_bytes", read_bytes);
  m.impl("argmax_rows", argmax_rows);
}
