// A linear layer for the few rows of a decode step, on weights stored in bfloat16 and widened to float32 in
// registers: a decode step streams every weight once, so half the bytes is half the time where memory
// bandwidth is the bound. Products and sums are float32.
//   bf16_linear(x [M,K] float32, packed, bias [N] float32 or None, N) -> [M,N] float32
// where packed [ceil(N/32), ceil(K/2), 32, 2] int16 holds the weight's bf16 bits: 32 outputs side by side, and
// for each output two consecutive inputs in one 32-bit word (models/bf16_weight_linear.py packs it). A 64-byte
// load then widens to two vectors of 16 floats with a shift and a mask (inputs 2k and 2k+1), where eight
// outputs a 16-byte row needed a widening conversion per eight weights: three instructions a 32 weights instead
// of eight, which is what bounded two to eight rows. A group of 32 outputs is one stream of 128 bytes an input
// pair (two groups read side by side were 4 KiB-aliased streams at K = 768, and 10-25% slower).
//   bf16_linear_tiles(x, packed, bias, N): the same product for inputs of many rows, where a GEMM's blocking
// beats dots: each task widens a tile of output columns to float32 [K, cols] in its own buffer and runs the
// BLAS GEMM on it. The weight is held once, as bf16; the products are exact and the sums float32 either way.
// Every vector path adds each output's products in the order of k, one FMA each, so the AVX2 and AVX-512 dots
// give the same bits for any number of rows, and a row's result does not depend on the rows beside it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include "bf16_linear.h"
#include "cpu_features.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 32;      // outputs per packed group
constexpr int64_t kGroupPair = 64;  // int16 words of one input pair of a group: 32 outputs x 2 inputs
constexpr int64_t kTileFloats = int64_t{1} << 22;  // bf16_linear_tiles' widened tile: at most 16 MiB
constexpr int kRowsAvx2 = 2;     // rows a pass of the AVX2 dots: 8 accumulators of its 16 registers
constexpr int kRowsAvx512 = 12;  // rows a pass of the AVX-512 dots: 24 accumulators of its 32 registers
// The AVX-512 dots ask for the weights this many words (4 KiB) ahead, hinted as the CPU streams best
// (cpu_features.h). With the non-temporal hint a GPT-2-124M C=1 step took 4-5% less CPU on one Zen 4 thread
// and C=4 steps 3-4% less time on two; 2 KiB and 8 KiB ahead measured worse than no hint (bench/NOTES.md,
// session 12).
constexpr int64_t kStreamAhead = 2048;

inline float widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Weight (k, lane) of a group at w: word 2 * lane (k even) or 2 * lane + 1 (k odd) of input pair k / 2.
inline uint16_t weight_bits(const uint16_t* w, int64_t k, int64_t lane) {
  return w[(k / 2) * kGroupPair + 2 * lane + k % 2];
}

// Rows [0, ROWS) of x against one group: out[r][lane] = sum_k x[r,k] * w[k,lane] (+ bias), in plain C++.
template <int ROWS>
void group_portable(const float* x, int64_t K, const uint16_t* w, float* out, int64_t ldo, int64_t lanes,
                    const float* bias) {
  float acc[ROWS][kLanes] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < ROWS; ++r)
      for (int64_t j = 0; j < kLanes; ++j) acc[r][j] += x[r * K + k] * widen(weight_bits(w, k, j));
  for (int r = 0; r < ROWS; ++r)
    for (int64_t j = 0; j < lanes; ++j) out[r * ldo + j] = acc[r][j] + (bias ? bias[j] : 0.0f);
}

#if defined(__x86_64__)
// Eight outputs' weights for inputs 2p and 2p+1, from the 32 bytes at w: the low word of each 32-bit lane
// shifted up, and the high word masked.
inline __attribute__((target("avx2,fma"))) void widen_pair8(const uint16_t* w, __m256& even, __m256& odd) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(bits, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// One input pair (ODD: both inputs, else the last input of an odd K) of one group against ROWS rows of x.
template <int ROWS, bool ODD>
__attribute__((target("avx2,fma"))) inline void pair_avx2(const float* x, int64_t K, const uint16_t* w,
                                                          __m256 (&acc)[ROWS][kLanes / 8]) {
  __m256 xe[ROWS], xo[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    xe[r] = _mm256_set1_ps(x[r * K]);
    if (ODD) xo[r] = _mm256_set1_ps(x[r * K + 1]);
  }
  for (int q = 0; q < kLanes / 8; ++q) {
    __m256 even, odd;
    widen_pair8(w + 16 * q, even, odd);
    for (int r = 0; r < ROWS; ++r) {
      acc[r][q] = _mm256_fmadd_ps(xe[r], even, acc[r][q]);
      if (ODD) acc[r][q] = _mm256_fmadd_ps(xo[r], odd, acc[r][q]);
    }
  }
}

// group_portable with AVX2: the group's four quarters of eight outputs, ROWS rows, accumulators in registers.
template <int ROWS>
__attribute__((target("avx2,fma"))) void group_avx2(const float* x, int64_t K, const uint16_t* w, float* out,
                                                    int64_t ldo, int64_t lanes, const float* bias) {
  constexpr int kQuarters = kLanes / 8;
  __m256 acc[ROWS][kQuarters];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < kQuarters; ++q) acc[r][q] = _mm256_setzero_ps();
  for (int64_t k = 0; k + 1 < K; k += 2) pair_avx2<ROWS, true>(x + k, K, w + (k / 2) * kGroupPair, acc);
  if (K % 2) pair_avx2<ROWS, false>(x + K - 1, K, w + (K / 2) * kGroupPair, acc);
  for (int r = 0; r < ROWS; ++r) {
    float sum[kLanes];
    for (int q = 0; q < kQuarters; ++q) _mm256_storeu_ps(sum + 8 * q, acc[r][q]);
    for (int64_t j = 0; j < lanes; ++j) out[r * ldo + j] = sum[j] + (bias ? bias[j] : 0.0f);
  }
}
#endif

template <int ROWS>
void group_rows(const float* x, int64_t K, const uint16_t* w, float* out, int64_t ldo, int64_t lanes,
                const float* bias, bool avx2) {
#if defined(__x86_64__)
  if (avx2) return group_avx2<ROWS>(x, K, w, out, ldo, lanes, bias);
#endif
  group_portable<ROWS>(x, K, w, out, ldo, lanes, bias);
}

void rows_against_group(const float* x, int64_t rows, int64_t K, const uint16_t* w, float* out, int64_t N,
                        int64_t lanes, const float* bias, bool avx2) {
  int64_t r = 0;
  for (; r + kRowsAvx2 <= rows; r += kRowsAvx2) group_rows<kRowsAvx2>(x + r * K, K, w, out + r * N, N, lanes, bias, avx2);
  if (r < rows) group_rows<1>(x + r * K, K, w, out + r * N, N, lanes, bias, avx2);
}

#if defined(__x86_64__)
// One group's K inputs of 32 weights, widened into rows of a float tile ldt apart.
inline __attribute__((target("avx2,fma"))) void widen_group_avx2(const uint16_t* w, int64_t K, float* tile,
                                                                 int64_t ldt) {
  for (int64_t k = 0; k < K; k += 2)
    for (int q = 0; q < kLanes / 8; ++q) {
      __m256 even, odd;
      widen_pair8(w + (k / 2) * kGroupPair + 16 * q, even, odd);
      _mm256_storeu_ps(tile + k * ldt + 8 * q, even);
      if (k + 1 < K) _mm256_storeu_ps(tile + (k + 1) * ldt + 8 * q, odd);
    }
}

// One input pair (ODD: both inputs, else the last input of an odd K) of one group against ROWS rows of x,
// read from x transposed (xt: row r's input k at xt[k * ldx + r]).
template <int ROWS, bool ODD, StreamHint HINT>
__attribute__((target("avx512f,avx2,fma"))) inline void pair_avx512(const float* xt, int64_t ldx, const uint16_t* w,
                                                                    __m512 (&acc)[ROWS][kLanes / 16]) {
  constexpr int VECS = kLanes / 16;
  __m512 even[VECS], odd[VECS];
  for (int v = 0; v < VECS; ++v) prefetch_streamed<HINT>(w + kStreamAhead + 32 * v);
  for (int v = 0; v < VECS; ++v) {
    const __m512i bits = _mm512_loadu_si512(w + 32 * v);
    even[v] = _mm512_castsi512_ps(_mm512_slli_epi32(bits, 16));
    odd[v] = _mm512_castsi512_ps(_mm512_and_si512(bits, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  for (int r = 0; r < ROWS; ++r) {
    const __m512 xe = _mm512_set1_ps(xt[r]);
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_fmadd_ps(xe, even[v], acc[r][v]);
    if (ODD) {
      const __m512 xo = _mm512_set1_ps(xt[ldx + r]);
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_fmadd_ps(xo, odd[v], acc[r][v]);
    }
  }
}

// AVX-512: a pass keeps ROWS rows against one group's two vectors of 16 outputs in registers; each 64-byte
// load widens to the weights of two inputs, and each x value is broadcast once for both vectors. x comes
// transposed ([K, ldx], this pass's rows first): the values a step broadcasts share a cache line, where rows
// K floats apart are 4 KiB-aliased at K = 3072 or 4096 and thrashed L1 at eight rows. `valid` of the 32
// outputs are written.
template <int ROWS, StreamHint HINT>
__attribute__((target("avx512f,avx2,fma"))) void group_avx512(const float* xt, int64_t ldx, int64_t K,
                                                              const uint16_t* w, float* out, int64_t ldo,
                                                              int64_t valid, const float* bias) {
  constexpr int VECS = kLanes / 16;
  __m512 acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k + 1 < K; k += 2)
    pair_avx512<ROWS, true, HINT>(xt + k * ldx, ldx, w + (k / 2) * kGroupPair, acc);
  if (K % 2) pair_avx512<ROWS, false, HINT>(xt + (K - 1) * ldx, ldx, w + (K / 2) * kGroupPair, acc);
  for (int r = 0; r < ROWS; ++r) {
    float sum[kLanes];
    for (int v = 0; v < VECS; ++v) _mm512_storeu_ps(sum + 16 * v, acc[r][v]);
    for (int64_t j = 0; j < valid; ++j) out[r * ldo + j] = sum[j] + (bias ? bias[j] : 0.0f);
  }
}

using PassAvx512 = void (*)(const float*, int64_t, int64_t, const uint16_t*, float*, int64_t, int64_t, const float*);

template <StreamHint HINT, size_t... R>
constexpr std::array<PassAvx512, sizeof...(R)> passes_avx512(std::index_sequence<R...>) {
  return {&group_avx512<static_cast<int>(R) + 1, HINT>...};
}

// All M rows in passes of nearly equal size (64 rows: 11,11,11,11,10,10, not 12 x 5 and a pass of 4, which
// would widen the weights once for only four rows' FMAs).
void rows_avx512(const float* xt, int64_t M, int64_t K, const uint16_t* w, float* out, int64_t N, int64_t valid,
                 const float* bias) {
  static constexpr auto into_l2 = passes_avx512<StreamHint::kIntoL2>(std::make_index_sequence<kRowsAvx512>());
  static constexpr auto non_temporal =
      passes_avx512<StreamHint::kNonTemporal>(std::make_index_sequence<kRowsAvx512>());
  const auto& pass = stream_hint() == StreamHint::kIntoL2 ? into_l2 : non_temporal;
  const int64_t count = (M + kRowsAvx512 - 1) / kRowsAvx512, base = M / count, longer = M % count;
  for (int64_t p = 0, r = 0; p < count; ++p) {
    const int64_t rows = base + (p < longer ? 1 : 0);
    pass[rows - 1](xt + r, M, K, w, out + r * N, N, valid, bias);
    r += rows;
  }
}

#endif

void check_inputs(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M,K]");
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.size(2) == kLanes && packed.size(3) == 2 && packed.size(1) == (x.size(1) + 1) / 2 &&
                  packed.size(0) * kLanes >= N && (packed.size(0) - 1) * kLanes < N,
              "packed: int16 [ceil(N/32), ceil(K/2), 32, 2] for this x and N");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 [N]");
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t N, const std::string& isa_name) {
  const Isa isa = choose_isa(isa_name);
  check_inputs(x, packed, bias, N);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t M = x.size(0), K = x.size(1), groups = packed.size(0), stride = packed.size(1) * kGroupPair;
  at::Tensor out = at::empty({M, N}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const auto* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const float* b_ptr = has_bias ? bias->data_ptr<float>() : nullptr;
  float* o_ptr = out.data_ptr<float>();
  if (M == 0) return out;  // no rows (a step that samples nothing): the passes below divide by their count
#if defined(__x86_64__)
  if (isa == Isa::kAvx512) {
    const at::Tensor xt = x.t().contiguous();
    const float* xt_ptr = xt.data_ptr<float>();
    at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int64_t first = g * kLanes;
        rows_avx512(xt_ptr, M, K, w_ptr + g * stride, o_ptr + first, N, std::min<int64_t>(kLanes, N - first),
                    b_ptr ? b_ptr + first : nullptr);
      }
    });
    return out;
  }
#endif
  const bool avx2 = isa != Isa::kPortable;
  // a few groups per task: each reads K * 64 contiguous bytes, and the tasks split the weight evenly
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kLanes, lanes = std::min<int64_t>(kLanes, N - first);
      rows_against_group(x_ptr, M, K, w_ptr + g * stride, o_ptr + first, N, lanes, b_ptr ? b_ptr + first : nullptr,
                         avx2);
    }
  });
  return out;
}

// Groups [g0, g1) of packed, widened to float32 rows tile[k][(g - g0) * 32 + lane] of a tile whose rows are
// `cols` apart: the [K, cols] right-hand side of x @ W.T for those columns.
void widen_tile(const uint16_t* w, int64_t K, int64_t g0, int64_t g1, float* tile, int64_t cols) {
  const int64_t stride = (K + 1) / 2 * kGroupPair;
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* src = w + g * stride;
    float* dst = tile + (g - g0) * kLanes;
#if defined(__x86_64__)
    if (has_avx2_fma()) {
      widen_group_avx2(src, K, dst, cols);
      continue;
    }
#endif
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kLanes; ++j) dst[k * cols + j] = widen(weight_bits(src, k, j));
  }
}

at::Tensor bf16_linear_tiles(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                             int64_t N) {
  check_inputs(x, packed, bias, N);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t M = x.size(0), K = x.size(1), groups = packed.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const auto* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  // Tiles as large as the scratch allows: a GPT-2 layer's whole weight is one tile, so a call runs one
  // widening region and one GEMM (each parallel region costs a wait for the slowest thread)
  const int64_t per_tile = std::min(groups, std::max<int64_t>(1, kTileFloats / (K * kLanes)));
  at::Tensor tile = at::empty({K, per_tile * kLanes}, x.options());
  // Tile after tile: both threads widen it (each its groups), then BLAS multiplies it on both. The GEMM runs
  // here, not in the workers: they do not carry the caller's inference mode, which ATen ops check.
  for (int64_t g0 = 0; g0 < groups; g0 += per_tile) {
    const int64_t g1 = std::min(groups, g0 + per_tile), cols = (g1 - g0) * kLanes;
    const int64_t first = g0 * kLanes, valid = std::min(cols, N - first);
    float* t_ptr = tile.data_ptr<float>();
    at::parallel_for(g0, g1, 2, [&](int64_t begin, int64_t end) {
      widen_tile(w_ptr, K, begin, end, t_ptr + (begin - g0) * kLanes, cols);
    });
    const at::Tensor rhs = tile.view(-1).narrow(0, 0, K * cols).view({K, cols}).narrow(1, 0, valid);
    at::Tensor dst = out.narrow(1, first, valid);
    if (has_bias)
      at::addmm_out(dst, bias->narrow(0, first, valid), x, rhs);
    else
      at::mm_out(dst, x, rhs);
  }
  return out;
}

}  // namespace

namespace gptserve {

at::Tensor bf16_linear_best(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                            int64_t N) {
  return bf16_linear(x, packed, bias, N, "best");
}

// How the bf16 dots prefetch the weights they stream on this CPU (cpu_features.h), for the tests.
std::string stream_hint_name() {
#if defined(__x86_64__)
  return stream_hint() == StreamHint::kIntoL2 ? "into_l2" : "non_temporal";
#else
  return "none";
#endif
}

}  // namespace gptserve

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int N, str isa=\"best\") -> Tensor");
  m.def("bf16_linear_tiles(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor");
  m.def("stream_hint() -> str", &gptserve::stream_hint_name);
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("bf16_linear", bf16_linear);
  m.impl("bf16_linear_tiles", bf16_linear_tiles);
}
