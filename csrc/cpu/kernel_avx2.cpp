// AVX2+FMA build of the CPU kernel, chosen at run time on CPUs that have it. setuptools cannot give one file its
// own -mavx2, so the target pragma enables the instructions and the ISA macros, which the pragma does not define
// but ATen's and Sleef's headers test, are defined by hand. Both must precede every include.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx,avx2,fma,f16c")
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "kernel_instantiate.h"
#endif
