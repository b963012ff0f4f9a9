// What the CPU can run, asked once at run time: the kernels are compiled for any x86-64 and pick their AVX2
// paths only where the machine has them.
#pragma once

#if defined(__x86_64__)
inline bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();  // needed before __builtin_cpu_supports when it may run during static initialisation
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}
#else
inline bool has_avx2_fma() { return false; }
#endif
