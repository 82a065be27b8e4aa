// AVX2+FMA build of the CPU kernel, chosen at run time on CPUs that have it. The build compiles this file alone with
// -mavx2 -mfma -mf16c (setup.py, CMakeLists.txt), which also define the ISA macros that ATen's and Sleef's headers
// test; CPU_CAPABILITY selects ATen's AVX2 Vectorized<T>. Elsewhere than x86-64 with GCC or Clang it is empty.
#if defined(__x86_64__) && defined(__GNUC__)
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernel_instantiate.h"
#endif
