/* The compiled kernels (_native.c) built for CPUs with AVX2, FMA and F16C but no AVX-512 (most laptops, AMD
   before Zen 4): the whole file compiled with -mavx2 -mfma -mf16c -mbmi2, its AVX-512 intrinsics emulated on
   pairs of 256-bit registers by SIMDe (_avx2_compat.h). native.py imports it only where the CPU has those. */
#define WREN_AVX2 1
#include "_native.c"
