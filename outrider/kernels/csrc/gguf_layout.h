// The repacked GGUF layout both instruction-set builds of `gguf_mm` read (`outrider/kernels/gguf.py` `pack` writes
// it): output rows in groups of 16, one 32-bit lane per output row, a group's row one ascending stream of records.
// Only sizes and the prefetch schedule live here; the arithmetic is per instruction set (gguf_avx512.h, gguf_avx2.h).
// Included by gguf_mm.cpp only.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace {

constexpr int64_t Q4_0 = 2, Q5_0 = 6, Q8_0 = 8, Q4_K = 12, Q6_K = 14;  // GGML type ids
constexpr int LANES = 16;  // output rows per group

constexpr int64_t block_elems(int64_t t) { return (t == Q4_K || t == Q6_K) ? 256 : 32; }
constexpr int64_t block_bytes(int64_t t) {  // per block of one row, as in the file
  switch (t) {
    case Q4_K: return 144;
    case Q6_K: return 210;
    case Q4_0: return 18;
    case Q5_0: return 22;
    case Q8_0: return 34;
  }
  return 0;  // unreachable: gguf_mm checks every type id first
}
constexpr int64_t code_bytes(int64_t t) {  // per group of 16 rows and block; the rest of the group's bytes are parameters
  switch (t) {
    case Q4_K: return 2048;
    case Q6_K: return 3072;
    case Q5_0: return 320;
    case Q8_0: return 512;
  }
  return 256;  // Q4_0
}
constexpr int64_t param_bytes(int64_t t) { return LANES * block_bytes(t) - code_bytes(t); }
// A group's row is records of blocks, [parameters of each][codes of each]: one ascending stream of 64-byte lines.
constexpr int64_t record_blocks(int64_t t) { return t == Q4_K ? 1 : 2; }
constexpr int64_t group_bytes(int64_t t, int64_t K) { return (K / block_elems(t) * LANES * block_bytes(t) + 63) / 64 * 64; }
// Each block asks for its share of the lines this far ahead of it (a thread's groups are one ascending stream, so
// that is its own next data) into L2. The hardware prefetcher alone left the loop waiting on memory between bursts
// of arithmetic. In-process A/B over all linears of the 1.5B target (ms per pass): 44.4 -> 33.5 at M = 1 and
// 61.6 -> 48.6 at M = 4 for the whole record's lines at its start; spreading them over the block's sub-blocks then
// took M = 1 from 37.2 to 34.6 and M = 5 from 44.5 to 37.8 (a plain read of the same bytes: 30.2). The T0 and NTA
// hints did worse, 4 KiB ahead less, 12-32 KiB the same.
constexpr int64_t PREFETCH_AHEAD = 8192;
// Step `step` of a block's STEPS asks for its share of the lines [pf, pf + BYTES): spread over the block's
// arithmetic rather than all at its start, where a burst of misses held up the loads the arithmetic waited on.
// An address, not a pointer: past a thread's last group it points into another thread's groups or beyond the
// tensor, which a prefetch may do (it never faults) but pointer arithmetic may not.
template <int64_t BYTES, int STEPS>
[[gnu::always_inline]] inline void prefetch_share(uintptr_t pf, int step) {
  constexpr int64_t LINES = (BYTES + 63) / 64, PER = (LINES + STEPS - 1) / STEPS;
  for (int64_t i = 0; i < PER; ++i) {
    const int64_t line = step * PER + i;
    if (line < LINES) _mm_prefetch(reinterpret_cast<const char*>(pf + 64 * line), _MM_HINT_T2);
  }
}

inline int32_t sum_codes(const int8_t* q, int n) {
  int32_t s = 0;
  for (int i = 0; i < n; ++i) s += q[i];
  return s;
}

}  // namespace
