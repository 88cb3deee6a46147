// gguf_mm's AMX-INT8 path (Sapphire Rapids+): the integer sums of up to 32 activation rows against a group's 16
// weight rows come from tile multiplies (TDPBSUD: 16 rows x 64 bytes of signed activation codes by 16 x 64 bytes of
// unsigned weight codes, exact int32 sums), one per sub-block, and then run through the very float epilogues of the
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

constexpr int AMX_ROWS = 32;  // activation rows per pass: two row tiles of 16 share each weight tile

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

// Tiles: 0 and 1 the int32 sums of activation rows 0-15 and 16-31; 2 and 3 their codes (`ks` bytes a row); 4 one
// sub-block's weight codes (ks / 4 rows of 64 bytes). Per thread; `ks` is 4 x the type's steps per sub-block.
inline void configure_tiles(int rows, int ks) {
  TileConfig c;
  const int r0 = std::min(rows, 16), r1 = rows - r0;
  c.rows[0] = c.rows[2] = static_cast<uint8_t>(r0);
  c.colsb[0] = 64;
  c.colsb[2] = static_cast<uint16_t>(ks);
  if (r1 > 0) {
    c.rows[1] = c.rows[3] = static_cast<uint8_t>(r1);
    c.colsb[1] = 64;
    c.colsb[3] = static_cast<uint16_t>(ks);
  }
  c.rows[4] = static_cast<uint8_t>(ks / 4);
  c.colsb[4] = 64;
  _tile_loadconfig(&c);
}

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

// One group against activation rows m0 .. m0 + rows - 1 (rows <= AMX_ROWS), tiles configured for `rows`.
template <int64_t T>
void group_rows_amx(const uint8_t* g, int64_t nb, const Acts& a, int64_t m0, int rows, float* y, int64_t y_row,
                    __mmask16 lanes) {
  using C = Codes<T>;
  constexpr int KS = 4 * C::STEPS;
  constexpr int CHUNK = 4;  // rows of one epilogue in registers: 2 x 4 accumulators, as the VNNI path's passes
  alignas(64) int32_t sums[C::SUBS * AMX_ROWS * 16];
  alignas(64) uint8_t btile[C::STEPS * 64];
  alignas(64) float acc_rows[AMX_ROWS * 16];
  std::fill(acc_rows, acc_rows + rows * 16, 0.0f);
  const int64_t per_sub = 16 * rows;
  for_each_block<T>(g, nb, [&](const uint8_t* params, const uint8_t* codes, int64_t b, uintptr_t ahead) {
    const int64_t j = b * a.M + m0;
    const int8_t* x = a.q.data() + j * block_elems(T);
    C src{codes, x, ahead, {}};
    for (int s = 0; s < C::SUBS; ++s) {
      src.sub(s);
      for (int t = 0; t < C::STEPS; ++t) _mm512_store_si512(btile + 64 * t, src.c[t]);
      _tile_loadd(4, btile, 64);
      const int8_t* xs = x + KS * s;
      int32_t* out = sums + s * per_sub;
      _tile_loadd(2, xs, C::X_ROW);
      _tile_zero(0);
      _tile_dpbsud(0, 2, 4);
      _tile_stored(0, out, 64);
      if (rows > 16) {
        _tile_loadd(3, xs + 16 * C::X_ROW, C::X_ROW);
        _tile_zero(1);
        _tile_dpbsud(1, 3, 4);
        _tile_stored(1, out + 256, 64);
      }
    }
    int r0 = 0;
    for (; r0 + CHUNK <= rows; r0 += CHUNK)
      epilogue_rows<T, CHUNK>(params, a, j + r0, acc_rows + 16 * r0, {sums + 16 * r0, per_sub});
    switch (rows - r0) {
      case 3: epilogue_rows<T, 3>(params, a, j + r0, acc_rows + 16 * r0, {sums + 16 * r0, per_sub}); break;
      case 2: epilogue_rows<T, 2>(params, a, j + r0, acc_rows + 16 * r0, {sums + 16 * r0, per_sub}); break;
      case 1: epilogue_rows<T, 1>(params, a, j + r0, acc_rows + 16 * r0, {sums + 16 * r0, per_sub}); break;
      default: break;
    }
  });
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

inline int amx_k_bytes(int64_t t) { return t == Q6_K ? 16 : 32; }  // codes per sub-block: an activation tile's row

}  // namespace
