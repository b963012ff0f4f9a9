// What the CPU can run, asked once at run time: the kernels are compiled for any x86-64 and pick their AVX2
// or AVX-512 paths only where the machine (and its OS, which must save the wider registers) has them.
#pragma once

#include <c10/util/Exception.h>

#include <string>

#if defined(__x86_64__)
#include <immintrin.h>

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
// The AVX-512 word shuffles (vpermw) that look MXFP4 codes up as bf16 words.
inline bool has_avx512bw() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return has_avx512f() && __builtin_cpu_supports("avx512bw");
  }();
  return yes;
}
// vdpbf16ps (AVX512-BF16) and the AVX512-BW word shuffles the bf16 kernels use beside it.
inline bool has_avx512_bf16() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return has_avx512bw() && __builtin_cpu_supports("avx512bf16");
  }();
  return yes;
}

// How the bf16 dots ask for the weights they stream, read once a step. On Intel into L2 (T1): there the
// non-temporal hint bypasses L2, so a core's stream is only as deep as its L1 fill buffers, and the dots read
// 10-19 GB/s where T1 reads 25-31 on a two-core Xeon whose plain read ran at 24-27 (bench/NOTES.md, session
// 15). Elsewhere (AMD) with the non-temporal hint: so hinted the weights stop evicting what the step reads
// again, and GPT-2-124M steps took 3-5% less time on a Zen 4 (session 12).
enum class StreamHint { kNonTemporal, kIntoL2 };

inline StreamHint stream_hint() {
  static const StreamHint hint = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? StreamHint::kIntoL2 : StreamHint::kNonTemporal;
  }();
  return hint;
}

template <StreamHint HINT>
inline void prefetch_streamed(const void* p) {
  if constexpr (HINT == StreamHint::kIntoL2)
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
  else
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA);
}
#else
inline bool has_avx2_fma() { return false; }
inline bool has_avx512f() { return false; }
inline bool has_avx512bw() { return false; }
inline bool has_avx512_bf16() { return false; }
#endif

enum class Isa { kPortable, kAvx2, kAvx512 };

// The kernels' isa argument: "best" is the widest path this CPU runs; the others are asked for by name (tests),
// and refused where the CPU lacks them.
inline Isa choose_isa(const std::string& requested) {
  if (requested == "best") return has_avx512f() ? Isa::kAvx512 : has_avx2_fma() ? Isa::kAvx2 : Isa::kPortable;
  if (requested == "portable") return Isa::kPortable;
  TORCH_CHECK(requested == "avx2" || requested == "avx512", "isa: best, avx512, avx2 or portable, not ", requested);
  const bool avx512 = requested == "avx512";
  TORCH_CHECK(avx512 ? has_avx512f() : has_avx2_fma(), "isa: this CPU does not run ", requested);
  return avx512 ? Isa::kAvx512 : Isa::kAvx2;
}
