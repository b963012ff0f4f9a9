// A linear layer for the few rows of a decode step, on weights stored in bfloat16 and widened to float32 in
// registers: a decode step streams every weight once, so half the bytes is half the time where memory
// bandwidth is the bound. Products and sums are float32.
//   bf16_linear(x [M,K] float32, packed, bias [N] float32 or None, N) -> [M,N] float32
// where packed [ceil(N/8), K, 8] int16 holds the weight's bf16 bits, eight outputs side by side so that one
// 16-byte load feeds eight accumulators (models/bf16_weight_linear.py packs it).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 8;  // outputs per packed group: one AVX2 vector of floats

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

#endif

template <int ROWS>
void dot_rows(const float* x, int64_t K, const uint16_t* w, float* out, int64_t ldo, int64_t lanes, const float* bias) {
#if defined(__x86_64__)
  if (has_avx2_fma()) return group_dot_avx2<ROWS>(x, K, w, out, ldo, lanes, bias);
#endif
  group_dot<ROWS>(x, K, w, out, ldo, lanes, bias);
}

void rows_against_group(const float* x, int64_t rows, int64_t K, const uint16_t* w, float* out, int64_t N,
                        int64_t lanes, const float* bias) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) dot_rows<4>(x + r * K, K, w, out + r * N, N, lanes, bias);
  switch (rows - r) {
    case 3: dot_rows<3>(x + r * K, K, w, out + r * N, N, lanes, bias); break;
    case 2: dot_rows<2>(x + r * K, K, w, out + r * N, N, lanes, bias); break;
    case 1: dot_rows<1>(x + r * K, K, w, out + r * N, N, lanes, bias); break;
    default: break;
  }
}

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                       int64_t N) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M,K]");
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.dim() == 3 && packed.is_contiguous() &&
                  packed.size(2) == kLanes && packed.size(1) == x.size(1) && packed.size(0) * kLanes >= N &&
                  (packed.size(0) - 1) * kLanes < N,
              "packed: int16 [ceil(N/8), K, 8] for this x and N");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 [N]");
  const int64_t M = x.size(0), K = x.size(1), groups = packed.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  const float* x_ptr = x.data_ptr<float>();
  const auto* w_ptr = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  const float* b_ptr = has_bias ? bias->data_ptr<float>() : nullptr;
  float* o_ptr = out.data_ptr<float>();
  // a few groups per task: each reads K * 16 contiguous bytes, and the tasks split the weight evenly
  at::parallel_for(0, groups, 16, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t first = g * kLanes, lanes = std::min<int64_t>(kLanes, N - first);
      rows_against_group(x_ptr, M, K, w_ptr + g * K * kLanes, o_ptr + first, N, lanes, b_ptr ? b_ptr + first : nullptr);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("bf16_linear(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("bf16_linear", bf16_linear);
}
