// What the CPU can run, asked once at run time: the kernels are compiled for any x86-64 and pick their AVX2
// or AVX-512 paths only where the machine (and its OS, which must save the wider registers) has them.
#pragma once

#if defined(__x86_64__)
inline bool has_avx2_fma() {
  static const bool yes = [] {
    __builtin_cpu_init();  // needed before __builtin_cpu_supports when it may run during static initialisation
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return yes;
}

inline bool has_avx512f() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
  }();
  return yes;
}
#else
inline bool has_avx2_fma() { return false; }
inline bool has_avx512f() { return false; }
#endif
