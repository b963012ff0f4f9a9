// The MXFP4 expert kernel for bf16 tokens (a ``--dtype bfloat16`` model's decode steps) on CPUs with
// AVX512-BF16: the E2M1 codes are looked up straight into bf16 words and dotted with the tokens in bf16 pairs
// by vdpbf16ps, so no weight is widened to float32 and the tokens are never widened at all.
//   mxfp4_grouped_linear_bf16(x [N,I] bfloat16, counts [E] int64, blocks [E,O,I/32,16] uint8,
//                             scales [E,O,I/32] uint8, bias [E,O] float32 or None) -> [N,O] bfloat16
// x's rows are grouped by expert, counts[e] of them for expert e, as for mxfp4_grouped_linear (the float32
// kernel, models/csrc/mxfp4_linear.cpp, which bf16 tokens otherwise take widened). Products of a bf16 token
// value and an E2M1 value are exact in float32 and are summed in float32; each output is rounded to bf16 once.
//
// A 64-byte line of a weight row holds four blocks (128 values). Read as 32 words, word i holds values 4i to
// 4i+3 in its four nibbles; vpermw looks each word's low five bits up in a table of the 16 codes' bf16 bits
// (written twice, so the fifth bit is ignored), so the line shifted by 0, 4, 8 and 12 bits gives four vectors
// with value 4i+q in word i of vector q. vdpbf16ps adds the products of word pairs (2m, 2m+1) into float32
// lane m, so the token is permuted once per call to the same order (pair m of vector q: values 8m+q and
// 8m+4+q). Lanes 4k..4k+3 then hold block k's sums only, and one multiply by a vector of the four blocks'
// powers of two (each scale byte shifted into a float32 exponent) scales the line. Every token sees the same
// operations in the same order whatever else is in the batch, and whatever the thread count.
//
// Scaling a block's sum rather than each value is exact unless a scaled value leaves float32's normal range:
// scale bytes 0 (2^-127, a subnormal) and 253 or more (where 4 x 2^(s - 127) overflows). A row holding either
// is computed again value by value, dequantized as dequantize_mxfp4 gives it (inf and NaN included), so the
// result is always that of the dequantized weight. Real checkpoints' scales lie far from both ends.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "mxfp4_bf16_linear.h"
#include "cpu_features.h"
#include "mxfp4_decode.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using gptserve::mxfp4::kBytesPerBlock, gptserve::mxfp4::kFp4, gptserve::mxfp4::kValuesPerBlock;

constexpr int64_t kBlocksPerLine = 4;
constexpr int64_t kLineValues = kValuesPerBlock * kBlocksPerLine, kLineBytes = kBytesPerBlock * kBlocksPerLine;
constexpr int kMaxTokens = 8;  // tokens per pass over a row: one accumulator register each
// The packed bytes are asked for this far ahead (32 lines): 4 KiB and 8 KiB, and the non-temporal hint,
// measured the same or slower; no prefetch 15-40% slower (two threads, 5760x2880, one to four tokens).
constexpr int64_t kPrefetchBytes = 2048;
constexpr uint8_t kNeutralScale = 127;  // scale byte of the blocks past a row's end in its last line: 2^0

// x [M, I] -> [M, lines, 4, 32] bf16 words in the order the line's four weight vectors hold their values
// (vector q, word 2m + h: value 8m + 4h + q), zero past I.
at::Tensor permute_to_lines(const at::Tensor& x, int64_t lines) {
  const int64_t M = x.size(0), I = x.size(1);
  at::Tensor padded = I == lines * kLineValues ? x : at::zeros({M, lines * kLineValues}, x.options());
  if (I != lines * kLineValues) padded.narrow(1, 0, I).copy_(x);
  return padded.view({M, lines, 16, 2, 4}).permute({0, 1, 4, 2, 3}).contiguous();
}

// Whether any of the four scale bytes in `four` is 0 or 253 and over (the bit tricks for "has a byte less
// than n", on the bytes and on their complements): integer work, off the vector units this kernel fills.
inline bool needs_exact_scaling(uint32_t four) {
  const auto has_byte_below = [](uint32_t v, uint32_t n) { return ((v - 0x01010101u * n) & ~v & 0x80808080u) != 0; };
  return has_byte_below(four, 1) || has_byte_below(~four, 3);
}

struct Expert {
  const uint16_t* x;           // this expert's rows of the permuted x, Shape::x_stride() words apart
  const c10::BFloat16* rows;   // the same rows as given, I values apart (for row_exact)
  const uint8_t* blocks;
  const uint8_t* scales;
  const float* bias;  // or nullptr
  c10::BFloat16* out;
  int64_t tokens;
};

struct Shape {
  int64_t I, O, groups;
  int64_t lines() const { return (groups + kBlocksPerLine - 1) / kBlocksPerLine; }
  int64_t x_stride() const { return lines() * kLineValues; }  // words between rows of the permuted x
};

// Row o of one expert for `tokens` tokens from `first`, value by value from the dequantized weight: rows
// whose scales the vector path cannot apply to block sums (see the top of this file).
void row_exact(const Expert& e, const Shape& s, int64_t first, int tokens, int64_t o) {
  const uint8_t* blocks = e.blocks + o * s.groups * kBytesPerBlock;
  const uint8_t* scales = e.scales + o * s.groups;
  const c10::BFloat16* xs = e.rows + first * s.I;
  for (int t = 0; t < tokens; ++t) {
    float sum = 0.0f;
    for (int64_t v = 0; v < s.I; ++v) {
      const uint8_t byte = blocks[v / 2];
      const float w = kFp4[v % 2 ? byte >> 4 : byte & 0xF] * std::ldexp(1.0f, scales[v / kValuesPerBlock] - 127);
      sum += w * static_cast<float>(xs[t * s.I + v]);
    }
    e.out[(first + t) * s.O + o] = c10::BFloat16(sum + (e.bias ? e.bias[o] : 0.0f));
  }
}

// The byte shuffle that moves scale byte k of a line to the top byte of lanes 4k..4k+3 (0x80 writes a zero byte).
alignas(64) constexpr uint8_t kScaleLanes[64] = {
    0x80, 0x80, 0x80, 0, 0x80, 0x80, 0x80, 0, 0x80, 0x80, 0x80, 0, 0x80, 0x80, 0x80, 0,
    0x80, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 1, 0x80, 0x80, 0x80, 1,
    0x80, 0x80, 0x80, 2, 0x80, 0x80, 0x80, 2, 0x80, 0x80, 0x80, 2, 0x80, 0x80, 0x80, 2,
    0x80, 0x80, 0x80, 3, 0x80, 0x80, 0x80, 3, 0x80, 0x80, 0x80, 3, 0x80, 0x80, 0x80, 3};

// The scale bytes of a last line of `rest` (1 to 3) blocks, the missing ones 2^0: built in a register, since
// writing the bytes to memory and reading them back as one word stalled the load (a row's last line cost four
// full ones, 15% of a 2880-wide row at one token).
inline uint32_t last_line_scales(const uint8_t* scales, int64_t rest) {
  uint32_t four = 0x01010101u * kNeutralScale;
  for (int64_t k = 0; k < rest; ++k) four = (four & ~(0xFFu << 8 * k)) | static_cast<uint32_t>(scales[k]) << 8 * k;
  return four;
}

#if defined(__x86_64__)
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// One line of four blocks against TOKENS tokens: `line` the 64 packed bytes, `four` the blocks' scale bytes.
template <int TOKENS>
TARGET_BF16 inline void line_dots(__m512i line, uint32_t four, __m512i table, __m512i scale_lanes,
                                  const uint16_t* x, int64_t x_stride, __m512 (&acc)[TOKENS]) {
  // byte k of `four` into the top byte of lanes 4k..4k+3, then one bit down: the float32 2^(s_k - 127)
  const __m512 scale = _mm512_castsi512_ps(
      _mm512_srli_epi32(_mm512_shuffle_epi8(_mm512_set1_epi32(static_cast<int>(four)), scale_lanes), 1));
  const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(line, table);
  const __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(line, 4), table);
  const __m512bh w2 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(line, 8), table);
  const __m512bh w3 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(line, 12), table);
  for (int t = 0; t < TOKENS; ++t) {
    const uint16_t* xt = x + t * x_stride;
    __m512 sums = _mm512_dpbf16_ps(_mm512_setzero_ps(), w0, (__m512bh)_mm512_loadu_si512(xt));
    sums = _mm512_dpbf16_ps(sums, w1, (__m512bh)_mm512_loadu_si512(xt + 32));
    sums = _mm512_dpbf16_ps(sums, w2, (__m512bh)_mm512_loadu_si512(xt + 64));
    sums = _mm512_dpbf16_ps(sums, w3, (__m512bh)_mm512_loadu_si512(xt + 96));
    acc[t] = _mm512_fmadd_ps(sums, scale, acc[t]);
  }
}

// Row o of one expert against TOKENS tokens from `first`. Returns false, writing nothing, where a scale byte
// needs the exact path.
template <int TOKENS>
TARGET_BF16 bool row_bf16(const Expert& e, const Shape& s, int64_t first, int64_t o) {
  const uint8_t* blocks = e.blocks + o * s.groups * kBytesPerBlock;
  const uint8_t* scales = e.scales + o * s.groups;
  const int64_t x_stride = s.x_stride();
  const uint16_t* x = e.x + first * x_stride;
  const __m512i table = _mm512_loadu_si512(gptserve::mxfp4::kFp4Bf16), scale_lanes = _mm512_load_si512(kScaleLanes);
  __m512 acc[TOKENS];
  for (int t = 0; t < TOKENS; ++t) acc[t] = _mm512_setzero_ps();
  bool exact = false;
  const int64_t full = s.groups / kBlocksPerLine;
  for (int64_t l = 0; l < full; ++l) {
    _mm_prefetch(reinterpret_cast<const char*>(blocks + l * kLineBytes + kPrefetchBytes), _MM_HINT_T0);
    uint32_t four;
    std::memcpy(&four, scales + l * kBlocksPerLine, sizeof four);
    exact |= needs_exact_scaling(four);
    line_dots<TOKENS>(_mm512_loadu_si512(blocks + l * kLineBytes), four, table, scale_lanes, x + l * kLineValues,
                      x_stride, acc);
  }
  if (const int64_t rest = s.groups - full * kBlocksPerLine) {  // a last line of one to three blocks
    const uint32_t four = last_line_scales(scales + full * kBlocksPerLine, rest);
    exact |= needs_exact_scaling(four);
    const __m512i line = _mm512_maskz_loadu_epi8((__mmask64{1} << (kBytesPerBlock * rest)) - 1,
                                                 blocks + full * kLineBytes);
    line_dots<TOKENS>(line, four, table, scale_lanes, x + full * kLineValues, x_stride, acc);
  }
  if (exact) return false;
  for (int t = 0; t < TOKENS; ++t)
    e.out[(first + t) * s.O + o] = c10::BFloat16(_mm512_reduce_add_ps(acc[t]) + (e.bias ? e.bias[o] : 0.0f));
  return true;
}

using RowFn = bool (*)(const Expert&, const Shape&, int64_t, int64_t);
constexpr RowFn kRows[kMaxTokens] = {row_bf16<1>, row_bf16<2>, row_bf16<3>, row_bf16<4>,
                                     row_bf16<5>, row_bf16<6>, row_bf16<7>, row_bf16<8>};
#endif

}  // namespace

namespace gptserve {

at::Tensor mxfp4_grouped_linear_bf16(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& blocks,
                                     const at::Tensor& scales, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(has_avx512_bf16(), "mxfp4_grouped_linear_bf16: this CPU lacks AVX512-BF16 (or AVX512-BW)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bfloat16 [N,I]");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 4 && blocks.is_contiguous() &&
                  blocks.size(3) == kBytesPerBlock && blocks.size(2) * kValuesPerBlock == x.size(1),
              "blocks: contiguous uint8 [E, O, I/32, 16] for this x");
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() && scales.sizes() == blocks.sizes().slice(0, 3),
              "scales: contiguous uint8 [E, O, I/32] matching blocks");
  const int64_t E = blocks.size(0), O = blocks.size(1), groups = blocks.size(2), I = x.size(1);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 1 && counts.size(0) == E &&
                  counts.device().is_cpu(),
              "counts: contiguous int64 [E] on the CPU");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->sizes() == at::IntArrayRef({E, O}),
                "bias: float32 [E, O]");
  const Shape s{I, O, groups};
  const at::Tensor xp = permute_to_lines(x, s.lines());
  at::Tensor out = at::empty({x.size(0), O}, x.options());
  const int64_t* count = counts.data_ptr<int64_t>();
  std::vector<Expert> experts;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(count[e] >= 0 && row + count[e] <= x.size(0), "counts: non-negative, summing to x's rows");
    if (count[e])
      experts.push_back(Expert{reinterpret_cast<const uint16_t*>(xp.data_ptr()) + row * s.x_stride(),
                               x.data_ptr<c10::BFloat16>() + row * I,
                               blocks.data_ptr<uint8_t>() + e * O * groups * kBytesPerBlock,
                               scales.data_ptr<uint8_t>() + e * O * groups,
                               has_bias ? bias->data_ptr<float>() + e * O : nullptr,
                               out.data_ptr<c10::BFloat16>() + row * O, count[e]});
    row += count[e];
  }
  TORCH_CHECK(row == x.size(0), "counts: non-negative, summing to x's rows");
  // One parallel region for all the experts, split by weight rows, as the float32 kernel's.
  at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
    for (const Expert& e : experts)
      for (int64_t first = 0; first < e.tokens; first += kMaxTokens) {
        const int tokens = static_cast<int>(std::min<int64_t>(kMaxTokens, e.tokens - first));
        for (int64_t o = begin; o < end; ++o) {
#if defined(__x86_64__)
          if (kRows[tokens - 1](e, s, first, o)) continue;
#endif
          row_exact(e, s, first, tokens, o);
        }
      }
  });
  return out;
}

}  // namespace gptserve

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("mxfp4_grouped_linear_bf16(Tensor x, Tensor counts, Tensor blocks, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("mxfp4_grouped_linear_bf16", gptserve::mxfp4_grouped_linear_bf16);
}
