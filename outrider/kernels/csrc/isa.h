// Which instruction-set build a translation unit is: `outrider/kernels/native.py` compiles every source once per
// level, with that level's -m flags, and the compiler's own target macros pick the code paths.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define OUTRIDER_AVX512 1
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define OUTRIDER_AMX 1  // the avx512_amx level: the AVX512 build plus gguf_mm's tile path (gguf_amx.h)
#endif
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define OUTRIDER_AVX2 1
#else
#error "outrider's kernels need AVX512-VNNI or AVX2 + FMA + F16C (see outrider/kernels/native.py)"
#endif
