// A linear layer on MXFP4 weights for the few tokens an expert gets in a decode step, decoding each weight row
// into a small float buffer and multiplying it there, so no dequantized matrix is ever written to memory.
// Dequantizing through torch ops costs ~25-55 ms an expert run (24.9M values through several full passes
// over memory); reading the 13.2 MB of packed bytes takes under a millisecond.
//   mxfp4_linear(x [M,I] float32, blocks [O,I/32,16] uint8, scales [O,I/32] uint8, bias [O] float32 or None,
//                vectorized) -> [M,O] float32
// Byte j of a block holds value 2j in its low nibble and 2j+1 in its high one (E2M1 codes); the block's
// values are multiplied by 2^(scale - 127). Every product of an E2M1 value and a power of two is exact in
// float32, so the decoded rows equal models.mxfp4.dequantize_mxfp4's bit for bit; only the order of the
// float32 sums differs from a matmul. ``vectorized`` False forces the portable path (tests run it on AVX2
// machines too).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_features.h"

#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kValuesPerBlock = 32, kBytesPerBlock = 16;
constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// 2^(s - 127) for every scale byte, as torch.exp2 gives it in float32 (s = 0 is subnormal, 255 is inf).
const std::array<float, 256>& scale_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int s = 0; s < 256; ++s) t[s] = std::ldexp(1.0f, s - 127);
    return t;
  }();
  return table;
}

// Within each 32-value block the decoded row holds the 16 low-nibble values, then the 16 high-nibble ones
// (values 0,2,..,30 then 1,3,..,31): x is permuted the same way once per call, and no shuffle is needed.
void decode_row(const uint8_t* blocks, const uint8_t* scales, int64_t groups, float* w) {
  const auto& scale = scale_values();
  for (int64_t g = 0; g < groups; ++g) {
    const float s = scale[scales[g]];
    for (int64_t j = 0; j < kBytesPerBlock; ++j) {
      const uint8_t byte = blocks[g * kBytesPerBlock + j];
      w[g * kValuesPerBlock + j] = kFp4[byte & 0xF] * s;
      w[g * kValuesPerBlock + kBytesPerBlock + j] = kFp4[byte >> 4] * s;
    }
  }
}

float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {};
  for (int64_t i = 0; i < n; i += 8)  // n is a multiple of 32
    for (int j = 0; j < 8; ++j) part[j] += a[i + j] * b[i + j];
  return ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

#if defined(__x86_64__)
// Eight codes -> eight floats: the magnitude from a register table indexed by the low three bits, the sign
// bit (bit 3) moved to bit 31.
__attribute__((target("avx2,fma"))) inline __m256 decode8(__m128i codes8, __m256 magnitudes, __m256 s) {
  const __m256i codes = _mm256_cvtepu8_epi32(codes8);
  const __m256 value = _mm256_permutevar8x32_ps(magnitudes, codes);
  const __m256i sign = _mm256_slli_epi32(_mm256_srli_epi32(codes, 3), 31);
  return _mm256_mul_ps(_mm256_xor_ps(value, _mm256_castsi256_ps(sign)), s);
}

__attribute__((target("avx2,fma"))) void decode_row_avx2(const uint8_t* blocks, const uint8_t* scales,
                                                          int64_t groups, float* w) {
  const auto& scale = scale_values();
  const __m256 magnitudes = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m128i low_bits = _mm_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scale[scales[g]]);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + g * kBytesPerBlock));
    const __m128i low = _mm_and_si128(bytes, low_bits), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_bits);
    float* out = w + g * kValuesPerBlock;
    _mm256_storeu_ps(out, decode8(low, magnitudes, s));
    _mm256_storeu_ps(out + 8, decode8(_mm_srli_si128(low, 8), magnitudes, s));
    _mm256_storeu_ps(out + 16, decode8(high, magnitudes, s));
    _mm256_storeu_ps(out + 24, decode8(_mm_srli_si128(high, 8), magnitudes, s));
  }
}

// The four accumulators of a dot, summed in a fixed order (the same whichever way the products were made).
__attribute__((target("avx2,fma"))) inline float sum4(const __m256 acc[4]) {
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  float lanes[8];
  _mm256_storeu_ps(lanes, sum);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
}

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t i = 0; i < n; i += 32)  // four independent FMA chains
    for (int k = 0; k < 4; ++k)
      acc[k] = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8 * k), _mm256_loadu_ps(b + i + 8 * k), acc[k]);
  return sum4(acc);
}

// One or two tokens: each block's decoded vectors go straight into the FMAs, without the round trip through
// the row buffer (at one token that store and reload cost about as much as the dot). The products and sums
// are those of decode_row_avx2 + dot_avx2, in the same order.
template <int M>
__attribute__((target("avx2,fma"))) void row_dots_avx2(const uint8_t* blocks, const uint8_t* scales, int64_t groups,
                                                        const float* x, int64_t I, float* out, int64_t ldo) {
  const auto& scale = scale_values();
  const __m256 magnitudes = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
  const __m128i low_bits = _mm_set1_epi8(0x0F);
  __m256 acc[M][4];
  for (int m = 0; m < M; ++m)
    for (int k = 0; k < 4; ++k) acc[m][k] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m256 s = _mm256_set1_ps(scale[scales[g]]);
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blocks + g * kBytesPerBlock));
    const __m128i low = _mm_and_si128(bytes, low_bits), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_bits);
    const __m256 w[4] = {decode8(low, magnitudes, s), decode8(_mm_srli_si128(low, 8), magnitudes, s),
                         decode8(high, magnitudes, s), decode8(_mm_srli_si128(high, 8), magnitudes, s)};
    for (int m = 0; m < M; ++m)
      for (int k = 0; k < 4; ++k)
        acc[m][k] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + m * I + g * kValuesPerBlock + 8 * k), acc[m][k]);
  }
  for (int m = 0; m < M; ++m) out[m * ldo] = sum4(acc[m]);
}
#endif

// x [M,I] with each 32-value block reordered as the decoded rows are (even positions, then odd ones).
at::Tensor permute_blocks(const at::Tensor& x) {
  const int64_t M = x.size(0), I = x.size(1);
  return x.view({M, I / kValuesPerBlock, kBytesPerBlock, 2}).transpose(2, 3).contiguous().view({M, I});
}

at::Tensor mxfp4_linear(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& bias, bool vectorized) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M,I]");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 3 && blocks.is_contiguous() &&
                  blocks.size(2) == kBytesPerBlock && blocks.size(1) * kValuesPerBlock == x.size(1),
              "blocks: contiguous uint8 [O, I/32, 16] for this x");
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() && scales.dim() == 2 &&
                  scales.size(0) == blocks.size(0) && scales.size(1) == blocks.size(1),
              "scales: contiguous uint8 [O, I/32] matching blocks");
  const int64_t M = x.size(0), I = x.size(1), O = blocks.size(0), groups = blocks.size(1);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == O, "bias: float32 [O]");
  const at::Tensor xp = permute_blocks(x);
  at::Tensor out = at::empty({M, O}, x.options());
  const float* x_ptr = xp.data_ptr<float>();
  const uint8_t *b_ptr = blocks.data_ptr<uint8_t>(), *s_ptr = scales.data_ptr<uint8_t>();
  const float* bias_ptr = has_bias ? bias->data_ptr<float>() : nullptr;
  float* o_ptr = out.data_ptr<float>();
  const bool avx2 = vectorized && has_avx2_fma();
  at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> w(I);  // one decoded row, reused by every token while it is in L1
    for (int64_t o = begin; o < end; ++o) {
      const uint8_t *row_blocks = b_ptr + o * groups * kBytesPerBlock, *row_scales = s_ptr + o * groups;
#if defined(__x86_64__)
      if (avx2) {
        if (M <= 2) {
          (M == 1 ? row_dots_avx2<1> : row_dots_avx2<2>)(row_blocks, row_scales, groups, x_ptr, I, o_ptr + o, O);
          for (int64_t m = 0; m < M; ++m) o_ptr[m * O + o] += bias_ptr ? bias_ptr[o] : 0.0f;
          continue;
        }
        decode_row_avx2(row_blocks, row_scales, groups, w.data());
        for (int64_t m = 0; m < M; ++m)
          o_ptr[m * O + o] = dot_avx2(w.data(), x_ptr + m * I, I) + (bias_ptr ? bias_ptr[o] : 0.0f);
        continue;
      }
#endif
      decode_row(row_blocks, row_scales, groups, w.data());
      for (int64_t m = 0; m < M; ++m)
        o_ptr[m * O + o] = dot(w.data(), x_ptr + m * I, I) + (bias_ptr ? bias_ptr[o] : 0.0f);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("mxfp4_linear(Tensor x, Tensor blocks, Tensor scales, Tensor? bias, bool vectorized=True) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("mxfp4_linear", mxfp4_linear);
}
