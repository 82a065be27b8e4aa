// Portable build of the CPU kernel: runs on any x86-64 or other CPU.
#define CPU_CAPABILITY DEFAULT
#include "kernel_instantiate.h"
