// AVX-512 build of the CPU kernel, chosen at run time on CPUs that have it: compiled alone with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c (see kernel_avx2.cpp).
#if defined(__x86_64__) && defined(__GNUC__)
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__AVX512DQ__) || \
    !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernel_instantiate.h"
#endif
