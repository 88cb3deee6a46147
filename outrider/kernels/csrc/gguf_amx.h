// gguf_mm's AMX-INT8 path (Sapphire Rapids+): the integer sums of activation rows against a group's 16 weight rows
// come from tile multiplies (TDPBSUD: 16 activation rows of signed codes, one sub-block's worth a row, by the
// sub-block's unsigned weight codes for the 16 weight rows, exact int32 sums), one per sub-block and 16 rows, and then run through the very float epilogues of the
// VNNI path (gguf_avx512.h), so an output is bitwise what the VNNI path gives it, at any row count.
//
// Why per sub-block: a sub-block's scale multiplies its integer sum in float (d * sc_s * sum_s), so the sums of a
// block's sub-blocks cannot be merged in a tile. A sub-block's codes, unpacked into VPDPBUSD operands by the VNNI
// path's own `Codes<T>::sub`, are already a B tile: 16 lanes (weight rows) x 4 consecutive codes per 64-byte row.
// Included by gguf_mm.cpp only, in the build level that has AMX (outrider/kernels/native.py).
#pragma once

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

#include "gguf_avx512.h"

namespace {

constexpr int AMX_ROWS = 64;  // activation rows per pass (one unpacking of the group's codes serves them all)
constexpr int TILE_ROWS = 16;  // activation rows per tile multiply: a tile sequence costs about as much for 8
constexpr int CHUNK = 8;       // activation rows per float epilogue (2 x 8 accumulators in registers)

// Linux gives a process the AMX register state only when it asks (arch_prctl, kernel 5.16+); a refusal leaves the
// VNNI path serving every row count.
inline bool amx_permitted() {
  static const bool ok = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles, all of TILE_ROWS activation rows (a pass's last item reads rows past its own, whose sums no epilogue reads;
// `quantize` pads the codes so such reads stay in the buffer): sums 0-3 by sub-block mod 4, activation codes 4 + p
// and weight codes 6 + p by parity p, so consecutive multiplies rarely wait on each other's registers. Per thread;
// `ks` is 4 x the type's steps per sub-block (an activation tile's row, in bytes).
inline void configure_tiles(int ks) {
  TileConfig c;
  for (int t = 0; t < 4; ++t) {
    c.rows[t] = TILE_ROWS;
    c.colsb[t] = 64;
  }
  for (int p = 0; p < 2; ++p) {
    c.rows[4 + p] = TILE_ROWS;
    c.colsb[4 + p] = static_cast<uint16_t>(ks);
    c.rows[6 + p] = static_cast<uint8_t>(ks / 4);
    c.colsb[6 + p] = 64;
  }
  _tile_loadconfig(&c);
}

// One sub-block's sums for one item of TILE_ROWS rows: weight codes (`btile`) into tile WB, the item's activation codes into XA,
// their product into CS, stored to `out` ([TILE_ROWS][16] int32). The tile intrinsics take register numbers as
// literal tokens, hence the macro.
#define OUTRIDER_TILE_SUMS(CS, XA, WB)  \
  _tile_loadd(WB, btile, 64);           \
  _tile_loadd(XA, x, x_row);            \
  _tile_zero(CS);                       \
  _tile_dpbsud(CS, XA, WB);             \
  _tile_stored(CS, out, 64);

// All sub-blocks of one block for one item of TILE_ROWS rows.
template <int SUBS, int SUB_BYTES, int KS>
[[gnu::always_inline]] inline void chunk_sums(const uint8_t* codes, const int8_t* x0, int64_t x_row, int32_t* sums,
                                              int64_t per_sub) {
  for (int s = 0; s < SUBS; ++s) {
    const uint8_t* btile = codes + s * SUB_BYTES;
    const int8_t* x = x0 + KS * s;
    int32_t* out = sums + s * per_sub;
    switch (s & 3) {
      case 0: OUTRIDER_TILE_SUMS(0, 4, 6) break;
      case 1: OUTRIDER_TILE_SUMS(1, 5, 7) break;
      case 2: OUTRIDER_TILE_SUMS(2, 4, 6) break;
      default: OUTRIDER_TILE_SUMS(3, 5, 7) break;
    }
  }
}
#undef OUTRIDER_TILE_SUMS

// Integer sums read back from the tiles' store: [sub-block][row][16 lanes].
struct TileSums {
  const int32_t* sums;
  int64_t per_sub;  // rows * 16
  [[gnu::always_inline]] void sub(int) {}
  template <int R> [[gnu::always_inline]] __m512i dot(int r, int s) const {
    return _mm512_load_si512(sums + s * per_sub + 16 * r);
  }
};

template <int64_t T, int R>
[[gnu::always_inline]] inline void epilogue_rows(const uint8_t* params, const Acts& a, int64_t j, float* acc_rows,
                                                 TileSums sums) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_load_ps(acc_rows + 16 * r);
  block_epilogue<T, R>(params, a, j, acc, sums);
  for (int r = 0; r < R; ++r) _mm512_store_ps(acc_rows + 16 * r, acc[r]);
}

template <int64_t T>
void epilogue_chunk(int rows, const uint8_t* params, const Acts& a, int64_t j, float* acc_rows, TileSums sums) {
  switch (rows) {
    case 8: epilogue_rows<T, 8>(params, a, j, acc_rows, sums); break;
    case 7: epilogue_rows<T, 7>(params, a, j, acc_rows, sums); break;
    case 6: epilogue_rows<T, 6>(params, a, j, acc_rows, sums); break;
    case 5: epilogue_rows<T, 5>(params, a, j, acc_rows, sums); break;
    case 4: epilogue_rows<T, 4>(params, a, j, acc_rows, sums); break;
    case 3: epilogue_rows<T, 3>(params, a, j, acc_rows, sums); break;
    case 2: epilogue_rows<T, 2>(params, a, j, acc_rows, sums); break;
    default: epilogue_rows<T, 1>(params, a, j, acc_rows, sums); break;
  }
}

// One group against activation rows m0 .. m0 + rows - 1 (rows <= AMX_ROWS), tiles configured for the pass.
// Work goes in items of (block, TILE_ROWS rows), in a pipeline of three stages: block b's codes are unpacked
// (the VNNI path's `Codes<T>::sub`) a block before its items' tile multiplies read them, and an item's float
// epilogue runs one item after its tiles stored its sums. A load right after the stores that wrote its bytes
// (vector stores into a tile load, tile stores into vector loads) waits for them to drain; an item later they sit
// in L1, and one item's sums (at most 16 sub-blocks x 16 rows x 64 bytes) keep the working set there. An item's
// rows reach their epilogues block after block in order, so the float sums are the VNNI path's.
template <int64_t T>
void group_rows_amx(const uint8_t* g, int64_t nb, const Acts& a, int64_t m0, int rows, float* y, int64_t y_row,
                    __mmask16 lanes) {
  using C = Codes<T>;
  constexpr int KS = 4 * C::STEPS, SUB_BYTES = 64 * C::STEPS;
  constexpr int64_t per_sub = 16 * TILE_ROWS;
  alignas(64) int32_t sums[2][C::SUBS * TILE_ROWS * 16];
  alignas(64) uint8_t unpacked[2][C::SUBS * SUB_BYTES];
  alignas(64) float acc_rows[AMX_ROWS * 16];
  std::fill(acc_rows, acc_rows + rows * 16, 0.0f);
  struct Item { const uint8_t* params = nullptr; int64_t j = 0; int r0 = 0; };
  Item pending;  // tiles done, epilogue not yet
  int64_t items = 0;
  auto finish = [&](const Item& it, const int32_t* in) {  // the item's rows, CHUNK at a time
    const int end = std::min(rows, it.r0 + TILE_ROWS);
    for (int r = it.r0; r < end; r += CHUNK)
      epilogue_chunk<T>(std::min(CHUNK, end - r), it.params, a, it.j + r, acc_rows + 16 * r,
                        {in + 16 * (r - it.r0), per_sub});
  };
  auto run_block = [&](const uint8_t* params, int64_t j, const uint8_t* codes) {
    const int8_t* x = a.q.data() + j * block_elems(T);
    for (int r0 = 0; r0 < rows; r0 += TILE_ROWS) {
      chunk_sums<C::SUBS, SUB_BYTES, KS>(codes, x + r0 * C::X_ROW, C::X_ROW, sums[items & 1], per_sub);
      if (pending.params) finish(pending, sums[(items + 1) & 1]);
      pending = {params, j, r0};
      ++items;
    }
  };
  struct Block { const uint8_t* params = nullptr; int64_t j = 0; } unpacked_block;
  int cur = 0;
  for_each_block<T>(g, nb, [&](const uint8_t* params, const uint8_t* codes, int64_t b, uintptr_t ahead) {
    C src{codes, nullptr, ahead, {}};
    uint8_t* out = unpacked[cur];
    for (int s = 0; s < C::SUBS; ++s) {
      src.sub(s);
      for (int t = 0; t < C::STEPS; ++t) _mm512_store_si512(out + s * SUB_BYTES + 64 * t, src.c[t]);
    }
    if (unpacked_block.params) run_block(unpacked_block.params, unpacked_block.j, unpacked[cur ^ 1]);
    unpacked_block = {params, b * a.M + m0};
    cur ^= 1;
  });
  run_block(unpacked_block.params, unpacked_block.j, unpacked[cur ^ 1]);
  finish(pending, sums[(items + 1) & 1]);
  for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + r * y_row, lanes, _mm512_load_ps(acc_rows + 16 * r));
}

using AmxGroupFn = void (*)(const uint8_t*, int64_t, const Acts&, int64_t, int, float*, int64_t, __mmask16);

inline AmxGroupFn amx_group_fn(int64_t t) {
  switch (t) {
    case Q4_K: return group_rows_amx<Q4_K>;
    case Q6_K: return group_rows_amx<Q6_K>;
    case Q4_0: return group_rows_amx<Q4_0>;
    case Q5_0: return group_rows_amx<Q5_0>;
    case Q8_0: return group_rows_amx<Q8_0>;
  }
  return nullptr;  // unreachable: gguf_mm checks every type id first
}

// Codes per sub-block, an activation tile's row in bytes: 4 per step (Q6_K has 4 steps, the other types 8).
inline int amx_k_bytes(int64_t t) { return 4 * (t == Q6_K ? Codes<Q6_K>::STEPS : Codes<Q4_K>::STEPS); }

}  // namespace
