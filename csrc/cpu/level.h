// The SIMD level this translation unit is compiled for, from the macros that also
// select ATen's Vectorized<T> implementation (setup.py sets them per level), and a
// check that the compiler flags really enable every instruction set the level uses.
#pragma once

#if defined(CPU_CAPABILITY_AVX512)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__) || !defined(__F16C__)
#error "the avx512 level needs -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c"
#endif
#define STABLE_DFL_CPU_LEVEL "avx512"
#elif defined(CPU_CAPABILITY_AVX2)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the avx2 level needs -mavx2 -mfma -mf16c"
#endif
#define STABLE_DFL_CPU_LEVEL "avx2"
#else
#if defined(__AVX__) || defined(__AVX2__) || defined(__AVX512F__)
#error "the default level must be compiled without AVX flags"
#endif
#define STABLE_DFL_CPU_LEVEL "default"
#endif
