// GGUF weight-only matmul with int8 activations, batch-invariant by construction: the op's checks, thread split
// and output rounding; the arithmetic per instruction set in gguf_avx512.h (VPDPBUSD) and gguf_avx2.h
// (VPMADDUBSW), the same layout and the same results up to float rounding; in the build with AMX, the integer sums
// of many activation rows from tile multiplies (gguf_amx.h), bitwise the VNNI path's outputs, chosen by row count.
//
// y[m, n] = sum_k x[m, k] * W[n, k] where W stays in its GGUF block format (Q4_K, Q6_K, Q4_0, Q5_0, Q8_0: exact codes,
// scales and mins, no requantization) in a repacked byte order (`outrider/kernels/gguf.py` `pack`): output rows in
// groups of 16, one 32-bit integer lane per output row.
//
// Activations are quantized per row the way llama.cpp does (Q8_K: one fp32 scale per 256 for the K-quants; Q8_0:
// one per 32 for the 32-element formats), round-to-nearest-even of x / (amax / 127).
//
// Why it is batch-invariant: output (m, n) is computed from row m of the activations and row n of the weights only:
// exact integer sums per sub-block (their order may vary with the rows per pass; an integer sum does not), then one
// fixed sequence of float lane operations, block after block in order, whatever M is, whichever other rows share
// its group, and however the groups are split between threads. There is no split-K.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "isa.h"
#if OUTRIDER_AMX
#include "gguf_amx.h"
#elif OUTRIDER_AVX512
#include "gguf_avx512.h"
#else
#include "gguf_avx2.h"
#endif

namespace {

// group_rows<T, R>: one group of 16 weight rows against R activation rows, writing the lanes of its real rows.
using GroupFn = void (*)(const uint8_t*, int64_t, const Acts&, int64_t, float*, int64_t, LaneMask);

// The row count is a template argument, so the accumulators stay in registers; one instance per count a pass uses.
template <int64_t T, size_t... R>
GroupFn group_fn_in(int64_t rows, std::index_sequence<R...>) {
  static constexpr GroupFn table[] = {group_rows<T, static_cast<int>(R) + 1>...};
  return table[rows - 1];
}

template <int64_t T>
GroupFn group_fn_for_rows(int64_t rows) {
  return group_fn_in<T>(rows, std::make_index_sequence<rows_per_pass(T)>{});
}

GroupFn group_fn(int64_t t, int64_t rows) {
  switch (t) {
    case Q4_K: return group_fn_for_rows<Q4_K>(rows);
    case Q6_K: return group_fn_for_rows<Q6_K>(rows);
    case Q4_0: return group_fn_for_rows<Q4_0>(rows);
    case Q5_0: return group_fn_for_rows<Q5_0>(rows);
    case Q8_0: return group_fn_for_rows<Q8_0>(rows);
  }
  TORCH_CHECK(false, "gguf_mm: unsupported GGML type ", t);
}

// Calls of amx_min_rows .. amx_max_rows activation rows take the AMX path, where the build and the OS have it
// (min 0: never): the row counts where it measured faster than VNNI (`outrider bench kernels`, its gguf-vnni and
// gguf-amx rows). `gguf_amx_rows` sets the window, to compare the paths.
std::atomic<int64_t> amx_min_rows{16}, amx_max_rows{int64_t{1} << 40};

bool amx_available() {
#if OUTRIDER_AMX
  return amx_permitted();
#else
  return false;
#endif
}

bool use_amx(int64_t M) {
  const int64_t min_rows = amx_min_rows.load(std::memory_order_relaxed);
  return min_rows > 0 && M >= min_rows && M <= amx_max_rows.load(std::memory_order_relaxed) && amx_available();
}

// One group of 16 output rows against all M activation rows, by passes of the path's rows.
void group_all_rows(int64_t t, const uint8_t* g, int64_t nb, const Acts& acts, int64_t M, float* y, int64_t N,
                    LaneMask lanes, bool amx, int& tiles_for) {
#if OUTRIDER_AMX
  if (amx) {
    for (int64_t m0 = 0; m0 < M; m0 += AMX_ROWS) {
      const int r = static_cast<int>(std::min<int64_t>(AMX_ROWS, M - m0));
      if (tiles_for != amx_k_bytes(t)) {  // the tile shapes follow the type's sub-block
        configure_tiles(amx_k_bytes(t));
        tiles_for = amx_k_bytes(t);
      }
      amx_group_fn(t)(g, nb, acts, m0, r, y + m0 * N, N, lanes);
    }
    return;
  }
#endif
  (void)amx;
  (void)tiles_for;
  // Past one pass of activation rows (prefill) the group's weights, a few KB to ~100 KB, stay in cache between passes.
  for (int64_t m0 = 0; m0 < M; m0 += rows_per_pass(t)) {
    const int64_t r = std::min<int64_t>(rows_per_pass(t), M - m0);
    group_fn(t, r)(g, nb, acts, m0, y + m0 * N, N, lanes);
  }
}

// x [M, K] (fp32 or bf16); weights: one uint8 [groups_i, group_bytes] per part, all with K inputs and
// rows_i real rows; the parts' outputs are concatenated, plus the bias [sum rows_i] if given: y [M, sum rows_i] in
// x's dtype.
at::Tensor gguf_mm(const at::Tensor& x_in, at::TensorList weights, at::IntArrayRef qtypes, at::IntArrayRef rows,
                   const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "gguf_mm: x must be a 2-D CPU tensor");
  TORCH_CHECK(weights.size() == qtypes.size() && weights.size() == rows.size() && !weights.empty(),
              "gguf_mm: one qtype and one row count per weight part");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "gguf_mm: x must be fp32 or bf16");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t parts = static_cast<int64_t>(weights.size());
  std::vector<int64_t> col{0}, first_group{0};  // per part: first output column, first global group
  for (int64_t i = 0; i < parts; ++i) {
    const auto& w = weights[i];
    const int64_t t = qtypes[i];
    TORCH_CHECK(block_bytes(t) > 0, "gguf_mm: unsupported GGML type ", t);
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), "gguf_mm: weight part ", i,
                " must be a contiguous uint8 [groups, bytes] tensor");
    TORCH_CHECK(K % block_elems(t) == 0 && w.size(1) == group_bytes(t, K), "gguf_mm: part ",
                i, " holds ", w.size(1), " bytes per group, not what ", K, " inputs of type ", t, " need");
    TORCH_CHECK(rows[i] > 0 && w.size(0) == (rows[i] + LANES - 1) / LANES, "gguf_mm: part ", i, " has ", w.size(0),
                " groups for ", rows[i], " rows");
    col.push_back(col.back() + rows[i]);
    first_group.push_back(first_group.back() + w.size(0));
  }
  const int64_t N = col.back();
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kFloat).contiguous();  // GGUFLinear keeps its bias in fp32: no copy
    TORCH_CHECK(bias.numel() == N, "gguf_mm: bias has ", bias.numel(), " entries for ", N, " outputs");
  }
  // one set of quantized activations per type in the call (they differ in block size and offsets), kept at the
  // type's first part: acts_of[i] is the part whose set part i reads
  std::vector<Acts> acts(parts);
  std::vector<int64_t> acts_of(parts);
  for (int64_t i = 0; i < parts; ++i) {
    acts_of[i] = 0;
    while (qtypes[acts_of[i]] != qtypes[i]) ++acts_of[i];
    if (acts_of[i] != i || M == 0) continue;
    if (x.scalar_type() == at::kFloat)
      quantize(x.data_ptr<float>(), M, K, qtypes[i], acts[i]);
    else
      quantize(x.data_ptr<c10::BFloat16>(), M, K, qtypes[i], acts[i]);
  }
  at::Tensor y32 = at::empty({M, N}, x.options().dtype(at::kFloat));
  at::Tensor y = x_in.scalar_type() == at::kFloat ? y32 : at::empty({M, N}, x_in.options());
  float* yp = y32.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const bool amx = M > 0 && use_amx(M);
  // Thread split over groups of output rows only: it never changes what one output computes.
  at::parallel_for(0, first_group.back(), 1, [&](int64_t begin, int64_t end) {
    int64_t part = 0, n_begin = -1, n_end = 0;
    int tiles_for = -1;  // this thread's tile configuration (set on first use, released at the end)
    for (int64_t gi = begin; gi < end; ++gi) {
      while (gi >= first_group[part + 1]) ++part;
      const int64_t t = qtypes[part], local = gi - first_group[part];
      const int64_t n0 = col[part] + LANES * local, live = std::min<int64_t>(LANES, col[part + 1] - n0);
      if (n_begin < 0) n_begin = n0;
      n_end = n0 + live;
      const uint8_t* g = weights[part].data_ptr<uint8_t>() + local * weights[part].size(1);
      group_all_rows(t, g, K / block_elems(t), acts[acts_of[part]], M, yp + n0, N, lane_mask(live), amx, tiles_for);
    }
#if OUTRIDER_AMX
    if (tiles_for >= 0) _tile_release();
#endif
    if (n_begin < 0) return;
    // this thread's outputs: the bias, then the one rounding to x's dtype
    for (int64_t m = 0; m < M; ++m) {
      float* row = yp + m * N;
      if (bp)
        for (int64_t n = n_begin; n < n_end; ++n) row[n] += bp[n];
      if (x_in.scalar_type() == at::kBFloat16)
        store_bf16(row + n_begin, y.data_ptr<c10::BFloat16>() + m * N + n_begin, n_end - n_begin);
    }
  });
  return y;
}

// Sets the row counts the AMX path serves (min 0: never; a bound below 0 stays) and returns the window before.
std::vector<int64_t> gguf_amx_rows(int64_t min_rows, int64_t max_rows) {
  return {min_rows < 0 ? amx_min_rows.load() : amx_min_rows.exchange(min_rows),
          max_rows < 0 ? amx_max_rows.load() : amx_max_rows.exchange(max_rows)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(outrider, m) {
  m.def("gguf_mm(Tensor x, Tensor[] weights, int[] qtypes, int[] rows, Tensor? bias=None) -> Tensor");
  m.def("gguf_amx_available() -> bool", amx_available);
  m.def("gguf_amx_rows(int min_rows, int max_rows) -> int[]", gguf_amx_rows);
}
TORCH_LIBRARY_IMPL(outrider, CPU, m) { m.impl("gguf_mm", gguf_mm); }
