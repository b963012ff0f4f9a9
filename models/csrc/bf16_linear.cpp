// A linear layer for the few rows of a decode step, on weights stored in bfloat16 and widened to float32 in
// registers: a decode step streams every weight once, so half the bytes is half the time where memory
// bandwidth is the bound. Products and sums are float32.
//   bf16_linear(x [M,K] float32, packed, bias [N] float32 or None, N) -> [M,N] float32
// where packed [ceil(N/8), K, 8] int16 holds the weight's bf16 bits, eight outputs side by side so that one
// 16-byte load feeds eight accumulators (models/bf16_weight_linear.py packs it).
//   bf16_linear_tiles(x, packed, bias, N): the same product for inputs of many rows, where a GEMM's blocking
// beats dots: each task widens a tile of output columns to float32 [K, cols] in its own buffer and runs the
// BLAS GEMM on it. The weight is held once, as bf16; the products are exact and the sums float32 either way.
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

constexpr int64_t kLanes = 8;  // outputs per packed group: one AVX2 vector of floats
constexpr int64_t kTileFloats = int64_t{1} << 22;  // bf16_linear_tiles' widened tile: at most 16 MiB
constexpr int kRowsAvx512 = 12;  // rows a pass of the AVX-512 kernel: 24 accumulators of its 32 registers

inline float widen(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Rows [0, ROWS) of x against one packed group: out[r][lane] = sum_k x[r,k] * w[k,lane] (+ bias). Two
// accumulators per row, over even and odd k, keep two FMA chains in flight for every row.
template <int ROWS>
void group_dot(const float* x, int64_t K, const uint16_t* w, float* out, int64_t ldo, int64_t lanes,
               const float* bias) {
  float acc[ROWS][2][kLanes] = {};
  for (int64_t k = 0; k < K; ++k)
    for (int r = 0; r < ROWS; ++r)
      for (int64_t j = 0; j < kLanes; ++j) acc[r][k % 2][j] += x[r * K + k] * widen(w[k * kLanes + j]);
  for (int r = 0; r < ROWS; ++r)
    for (int64_t j = 0; j < lanes; ++j) out[r * ldo + j] = (acc[r][0][j] + acc[r][1][j]) + (bias ? bias[j] : 0.0f);
}

#if defined(__x86_64__)
// The same with AVX2: one 16-byte load widens eight weights (zero-extend, shift into the high half), and
// the accumulators stay in registers (compilers kept the portable version's in memory).
inline __attribute__((target("avx2,fma"))) __m256 widen8(const uint16_t* w) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

template <int ROWS>
__attribute__((target("avx2,fma"))) void group_dot_avx2(const float* x, int64_t K, const uint16_t* w, float* out,
                                                        int64_t ldo, int64_t lanes, const float* bias) {
  __m256 even[ROWS], odd[ROWS];
  for (int r = 0; r < ROWS; ++r) even[r] = odd[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    const __m256 w0 = widen8(w + k * kLanes), w1 = widen8(w + (k + 1) * kLanes);
    for (int r = 0; r < ROWS; ++r) {
      even[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * K + k]), w0, even[r]);
      odd[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * K + k + 1]), w1, odd[r]);
    }
  }
  if (k < K) {
    const __m256 w0 = widen8(w + k * kLanes);
    for (int r = 0; r < ROWS; ++r) even[r] = _mm256_fmadd_ps(_mm256_set1_ps(x[r * K + k]), w0, even[r]);
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum[kLanes];
    _mm256_storeu_ps(sum, _mm256_add_ps(even[r], odd[r]));
    for (int64_t j = 0; j < lanes; ++j) out[r * ldo + j] = sum[j] + (bias ? bias[j] : 0.0f);
  }
}

// One group's K rows of eight weights, widened into rows of a float tile ldt apart.
inline __attribute__((target("avx2,fma"))) void widen_group_avx2(const uint16_t* w, int64_t K, float* tile,
                                                                 int64_t ldt) {
  for (int64_t k = 0; k < K; ++k) _mm256_storeu_ps(tile + k * ldt, widen8(w + k * kLanes));
}

#endif

template <int ROWS>
void dot_rows(const float* x, int64_t K, const uint16_t* w, float* out, int64_t ldo, int64_t lanes, const float* bias,
              bool avx2) {
#if defined(__x86_64__)
  if (avx2) return group_dot_avx2<ROWS>(x, K, w, out, ldo, lanes, bias);
#endif
  group_dot<ROWS>(x, K, w, out, ldo, lanes, bias);
}

void rows_against_group(const float* x, int64_t rows, int64_t K, const uint16_t* w, float* out, int64_t N,
                        int64_t lanes, const float* bias, bool avx2) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_rows<4>(x + r * K, K, w, out + r * N, N, lanes, bias, avx2);
  switch (rows - r) {
    case 3: dot_rows<3>(x + r * K, K, w, out + r * N, N, lanes, bias, avx2); break;
    case 2: dot_rows<2>(x + r * K, K, w, out + r * N, N, lanes, bias, avx2); break;
    case 1: dot_rows<1>(x + r * K, K, w, out + r * N, N, lanes, bias, avx2); break;
    default: break;
  }
}
#if defined(__x86_64__)
// AVX-512, for inputs of more than a few rows: two groups widen into one 16-float vector, and a pass keeps
// ROWS rows against VECS such vectors (32 outputs) in registers, so one widening feeds 12 FMAs per vector
// instead of the AVX2 kernel's four, and x's values are broadcast once per pair of vectors.
inline __attribute__((target("avx512f,avx2,fma"))) __m512 widen16(const uint16_t* w0, const uint16_t* w1) {
  const __m256i bits = _mm256_inserti128_si256(
      _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w0))),
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(w1)), 1);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// Rows [0, ROWS) of x against 2 * VECS groups starting at w (groups K * 8 apart); `valid` of the 16 * VECS
// outputs are written.
template <int ROWS, int VECS>
__attribute__((target("avx512f,avx2,fma"))) void groups_dot_avx512(const float* x, int64_t K, const uint16_t* w,
                                                                   float* out, int64_t ldo, int64_t valid,
                                                                   const float* bias) {
  __m512 acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_setzero_ps();
  const int64_t stride = K * kLanes;
  for (int64_t k = 0; k < K; ++k) {
    __m512 wv[VECS];
    for (int v = 0; v < VECS; ++v)
      wv[v] = widen16(w + 2 * v * stride + k * kLanes, w + (2 * v + 1) * stride + k * kLanes);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xr = _mm512_set1_ps(x[r * K + k]);
      for (int v = 0; v < VECS; ++v) acc[r][v] = _mm512_fmadd_ps(xr, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    float sum[16 * VECS];
    for (int v = 0; v < VECS; ++v) _mm512_storeu_ps(sum + 16 * v, acc[r][v]);
    for (int64_t j = 0; j < valid; ++j) out[r * ldo + j] = sum[j] + (bias ? bias[j] : 0.0f);
  }
}

using PassAvx512 = void (*)(const float*, int64_t, const uint16_t*, float*, int64_t, int64_t, const float*);

template <int VECS, size_t... R>
constexpr std::array<PassAvx512, sizeof...(R)> passes_avx512(std::index_sequence<R...>) {
  return {&groups_dot_avx512<static_cast<int>(R) + 1, VECS>...};
}

// All M rows in passes of nearly equal size (64 rows: 11,11,11,11,10,10, not 12 x 5 and a pass of 4, which
// would widen the weights once for only four rows' FMAs).
template <int VECS>
void rows_avx512(const float* x, int64_t M, int64_t K, const uint16_t* w, float* out, int64_t N, int64_t valid,
                 const float* bias) {
  static constexpr auto pass = passes_avx512<VECS>(std::make_index_sequence<kRowsAvx512>());
  const int64_t count = (M + kRowsAvx512 - 1) / kRowsAvx512, base = M / count, longer = M % count;
  for (int64_t p = 0, r = 0; p < count; ++p) {
    const int64_t rows = base + (p < longer ? 1 : 0);
    pass[rows - 1](x + r * K, K, w, out + r * N, N, valid, bias);
    r += rows;
  }
}

// Groups [g0, g1): four at a time, then two, then the last one alone through the AVX2 kernel.
void groups_avx512(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t g0, int64_t g1, float* out,
                   int64_t N, const float* bias) {
  for (int64_t g = g0; g < g1;) {
    const int64_t first = g * kLanes, left = N - first;
    const float* b = bias ? bias + first : nullptr;
    const uint16_t* wg = w + g * K * kLanes;
    if (g + 4 <= g1) {
      rows_avx512<2>(x, M, K, wg, out + first, N, std::min<int64_t>(32, left), b);
      g += 4;
    } else if (g + 2 <= g1) {
      rows_avx512<1>(x, M, K, wg, out + first, N, std::min<int64_t>(16, left), b);
      g += 2;
    } else {
      rows_against_group(x, M, K, wg, out + first, N, std::min<int64_t>(kLanes, left), b, true);
      g += 1;
    }
  }
}
#endif

void check_inputs(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M,K]");
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.dim() == 3 && packed.is_contiguous() &&
                  packed.size(2) == kLanes && packed.size(1) == x.size(1) && packed.size(0) * kLanes >= N &&
                  (packed.size(0) - 1) * kLanes < N,
              "packed: int16 [ceil(N/8), K, 8] for this x and N");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 [N]");
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t N, const std::string& isa_name) {
  const Isa isa = choose_isa(isa_name);
  check_inputs(x, packed, bias, N);
  const bool has_bias = bias.has_value() && bias->defined();
  const int64_t M = x.size(0), K = x.size(1), groups = packed.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const auto* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const float* b_ptr = has_bias ? bias->data_ptr<float>() : nullptr;
  float* o_ptr = out.data_ptr<float>();
#if defined(__x86_64__)
  // past a few rows the AVX-512 passes win: they widen each weight once per 12 rows, not per 4
  if (isa == Isa::kAvx512 && M > 4) {
    at::parallel_for(0, (groups + 3) / 4, 1, [&](int64_t begin, int64_t end) {
      groups_avx512(x_ptr, M, K, w_ptr, 4 * begin, std::min(groups, 4 * end), o_ptr, N, b_ptr);
    });
    return out;
  }
#endif
  const bool avx2 = isa != Isa::kPortable;
  // a few groups per task: each reads K * 16 contiguous bytes, and the tasks split the weight evenly
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kLanes, lanes = std::min<int64_t>(kLanes, N - first);
      rows_against_group(x_ptr, M, K, w_ptr + g * K * kLanes, o_ptr + first, N, lanes,
                         b_ptr ? b_ptr + first : nullptr, avx2);
    }
  });
  return out;
}

// Groups [g0, g1) of packed, widened to float32 rows tile[k][(g - g0) * 8 + lane] of a tile whose rows are
// `cols` apart: the [K, cols] right-hand side of x @ W.T for those columns.
void widen_tile(const uint16_t* w, int64_t K, int64_t g0, int64_t g1, float* tile, int64_t cols) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* src = w + g * K * kLanes;
    float* dst = tile + (g - g0) * kLanes;
#if defined(__x86_64__)
    if (has_avx2_fma()) {
      widen_group_avx2(src, K, dst, cols);
      continue;
    }
#endif
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < kLanes; ++j) dst[k * cols + j] = widen(src[k * kLanes + j]);
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
    at::parallel_for(g0, g1, 4, [&](int64_t begin, int64_t end) {
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

}  // namespace gptserve

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int N, str isa=\"best\") -> Tensor");
  m.def("bf16_linear_tiles(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("bf16_linear", bf16_linear);
  m.impl("bf16_linear_tiles", bf16_linear_tiles);
}
