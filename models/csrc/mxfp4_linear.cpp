// A linear layer on MXFP4 weights for the few tokens an expert gets in a decode step. Each 32-value block is
// decoded in registers and dotted with up to eight tokens at once, so no dequantized weight is ever written:
// dequantizing through torch ops costs ~25-55 ms an expert run (24.9M values through several passes over
// memory), where reading its 13.2 MB of packed bytes takes under a millisecond.
//   mxfp4_linear(x [M,I] float32, blocks [O,I/32,16] uint8, scales [O,I/32] uint8, bias [O] float32 or None,
//                isa) -> [M,O] float32
//   mxfp4_grouped_linear(x [N,I], counts [E] int64, blocks [E,O,I/32,16], scales [E,O,I/32], bias [E,O] or
//                        None, isa) -> [N,O]: a MoE layer's expert runs at once, x's rows grouped by expert
// Byte j of a block holds value 2j in its low nibble and 2j+1 in its high one (E2M1 codes); the block's
// values are multiplied by 2^(scale - 127). ``isa`` is "best" (the widest path the CPU runs), or "avx512",
// "avx2" or "portable" to force one, so that tests check every path the machine can run.
//
// AVX2 and portable: per block and token the kernel sums the unscaled products, then multiplies that partial
// dot by the block's power of two (exact, barring under- and overflow) into the token's accumulator. AVX-512:
// the block's sixteen E2M1 values are scaled once (one multiply, the values dequantize_mxfp4 gives) and the
// products summed unscaled, per line of four blocks (see row_group_avx512). On every path each token sees the
// same operations in the same order whatever M, its position in the batch, the rows decoded together or the
// thread count, so a token's result does not depend on what else is in the batch. (Between paths it may differ
// in the last bits: the sums are ordered differently, and AVX-512 adds sixteen lanes where the others add eight.)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "mxfp4_linear.h"
#include "cpu_features.h"
#include "mxfp4_decode.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using gptserve::mxfp4::kBytesPerBlock, gptserve::mxfp4::kFp4, gptserve::mxfp4::kValuesPerBlock;

// Tokens per pass over the weights: one accumulator register each. More tokens take more passes, whose
// re-reads of the packed rows come from cache (a pass over all of a thread's rows measured the same as
// passes over 32 rows at a time).
constexpr int kMaxTokens = 8;
// From this scale byte on, 4 x 2^(s - 127) >= 2^128: dequantized values overflow to inf (s = 255 is inf
// itself). On the AVX2 and portable paths such blocks scale their values before the dot, as dequantize_mxfp4
// does, to give the same inf/NaN (the AVX-512 path always does).
constexpr int kOverflowingScale = 253;
// The vector paths ask for the packed bytes this far ahead, one 64-byte line (four blocks) at a time: with the
// hardware's prefetch alone a 5760x2880 matrix at two tokens took 15-20% longer (bench/NOTES.md, MoE section).
constexpr int64_t kPrefetchBytes = 2048, kBlocksPerLine = 4;

// 2^(s - 127) for every scale byte, as torch.exp2 gives it in float32 (s = 0 is subnormal, 255 is inf).
const std::array<float, 256>& scale_values() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int s = 0; s < 256; ++s) t[s] = std::ldexp(1.0f, s - 127);
    return t;
  }();
  return table;
}

// Where the decodes put each value, so that x is permuted to that order once per call and no decoded value is
// shuffled. AVX2 and portable (see decode_avx2): vector k (0-3) of a block, lane l (0-7) holds value
// 16 * (k / 2) + 4 * (l % 4) + 2 * (k % 2) + l / 4, i.e. that of nibble l / 4 of byte 8 * (k / 2) +
// 2 * (l % 4) + k % 2. AVX-512 (see decode_avx512): lane l of the first vector holds value 2l (the low nibble
// of byte l), of the second 2l + 1.
at::Tensor permute_to_lanes(const at::Tensor& x, Isa isa) {
  const int64_t M = x.size(0), I = x.size(1), groups = I / kValuesPerBlock;
  if (isa == Isa::kAvx512) return x.view({M, groups, 16, 2}).transpose(2, 3).contiguous().view({M, I});
  return x.view({M, groups, 2, 4, 2, 2}).permute({0, 1, 2, 4, 5, 3}).contiguous().view({M, I});
}

inline int lane_byte(int k, int l) { return 8 * (k / 2) + 2 * (l % 4) + k % 2; }

struct Problem {
  const float* x;  // [M, I], in permute_to_lanes order
  const uint8_t* blocks;
  const uint8_t* scales;
  const float* bias;  // or nullptr
  float* out;
  int64_t I, O, groups;
  int64_t tokens;  // rows of x and out
};

// The lanes of an accumulator summed in one fixed order, the same on both paths.
inline float lanes_sum(const float v[8]) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// Rows [row_begin, row_end) against tokens [first, first + tokens), in plain C++.
void rows_portable(const Problem& p, int64_t first, int tokens, int64_t row_begin, int64_t row_end) {
  const auto& scale = scale_values();
  for (int64_t o = row_begin; o < row_end; ++o) {
    float acc[kMaxTokens][8] = {};
    for (int64_t g = 0; g < p.groups; ++g) {
      const uint8_t* bytes = p.blocks + (o * p.groups + g) * kBytesPerBlock;
      const int s = p.scales[o * p.groups + g];
      float w[4][8];
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 8; ++l) {
          const float value = kFp4[(bytes[lane_byte(k, l)] >> (4 * (l / 4))) & 0xF];
          w[k][l] = s < kOverflowingScale ? value : value * scale[s];
        }
      const float factor = s < kOverflowingScale ? scale[s] : 1.0f;
      for (int t = 0; t < tokens; ++t) {
        const float* xt = p.x + (first + t) * p.I + g * kValuesPerBlock;
        for (int l = 0; l < 8; ++l) {
          const float dot = ((w[0][l] * xt[l] + w[1][l] * xt[8 + l]) + w[2][l] * xt[16 + l]) + w[3][l] * xt[24 + l];
          acc[t][l] += dot * factor;
        }
      }
    }
    for (int t = 0; t < tokens; ++t)
      p.out[(first + t) * p.O + o] = lanes_sum(acc[t]) + (p.bias ? p.bias[o] : 0.0f);
  }
}

#if defined(__x86_64__)
// A row's blocks [g, end of g's line): asks for the line kPrefetchBytes ahead, once. (A prefetch under an
// ``if (g % kBlocksPerLine == 0)`` in the block loop was dropped by the compiler, and one every block made
// one token 40% slower.)
inline int64_t line_end(const uint8_t* row_blocks, int64_t g, int64_t groups) {
  _mm_prefetch(reinterpret_cast<const char*>(row_blocks + g * kBytesPerBlock + kPrefetchBytes), _MM_HINT_T0);
  return std::min(g + kBlocksPerLine, groups);
}

// Whether row o has a block whose dequantized values can overflow (scale kOverflowingScale or more).
inline bool row_may_overflow(const Problem& p, int64_t o) {
  const uint8_t* row_scales = p.scales + o * p.groups;
  uint8_t largest = 0;
  for (int64_t g = 0; g < p.groups; ++g) largest = std::max(largest, row_scales[g]);
  return largest >= kOverflowingScale;
}

// Every E2M1 value is a bfloat16: a float32 whose low 16 bits are zero. These are the two other bytes of each
// value's float32, for byte shuffles to look up.
struct Bf16Bytes {
  alignas(16) uint8_t low[16];
  alignas(16) uint8_t high[16];
};

const Bf16Bytes& fp4_bf16_bytes() {
  static const Bf16Bytes table = [] {
    Bf16Bytes t{};
    for (int c = 0; c < 16; ++c) {
      uint32_t bits;
      std::memcpy(&bits, &kFp4[c], sizeof bits);
      t.low[c] = static_cast<uint8_t>(bits >> 16);
      t.high[c] = static_cast<uint8_t>(bits >> 24);
    }
    return t;
  }();
  return table;
}

// One block's 32 values as four vectors of floats, in the lane order of permute_to_lanes. Both 128-bit halves
// load the same 16 bytes and the upper one is shifted by a nibble, so that two byte shuffles look up the
// float32 bytes 2 and 3 of all 32 values (low nibbles in the lower half, high ones in the upper half); an
// interleave pairs them into bfloat16 words, and a shift or a mask places each word in the high half of a
// 32-bit lane. Ten instructions and no int-to-float conversion: the earlier shift-and-convert decode took 14
// and made a 5760x2880 matrix at one token 1.33 ms against 1.14 ms (one thread).
__attribute__((target("avx2,fma"))) inline void decode_avx2(const uint8_t* bytes, __m256i low_table,
                                                             __m256i high_table, __m256 w[4]) {
  const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m256i codes = _mm256_and_si256(_mm256_srlv_epi64(both, _mm256_setr_epi64x(0, 0, 4, 4)),
                                         _mm256_set1_epi8(0x0F));
  const __m256i low = _mm256_shuffle_epi8(low_table, codes), high = _mm256_shuffle_epi8(high_table, codes);
  const __m256i words0_7 = _mm256_unpacklo_epi8(low, high), words8_15 = _mm256_unpackhi_epi8(low, high);
  const __m256i upper = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(words0_7, 16));
  w[1] = _mm256_castsi256_ps(_mm256_and_si256(words0_7, upper));
  w[2] = _mm256_castsi256_ps(_mm256_slli_epi32(words8_15, 16));
  w[3] = _mm256_castsi256_ps(_mm256_and_si256(words8_15, upper));
}

__attribute__((target("avx2,fma"))) inline __m256 block_dot(const __m256 w[4], const float* x) {
  __m256 dot = _mm256_mul_ps(w[0], _mm256_loadu_ps(x));
  dot = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(x + 8), dot);
  dot = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(x + 16), dot);
  return _mm256_fmadd_ps(w[3], _mm256_loadu_ps(x + 24), dot);
}

// One row of rows_portable with AVX2, TOKENS fixed so that the accumulators stay in registers. Rows with no
// block that can overflow (all rows of any real checkpoint) skip the test for it: on an earlier AVX-512 path
// that branch in the block loop cost about 10% at one token.
template <int TOKENS, bool kMayOverflow>
__attribute__((target("avx2,fma"))) void row_avx2(const Problem& p, int64_t first, int64_t o, __m256i low_table,
                                                   __m256i high_table) {
  const auto& scale = scale_values();
  const float* x = p.x + first * p.I;
  const uint8_t *row_blocks = p.blocks + o * p.groups * kBytesPerBlock, *row_scales = p.scales + o * p.groups;
  __m256 acc[TOKENS];
  for (int t = 0; t < TOKENS; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t line = 0; line < p.groups; line += kBlocksPerLine)
    for (int64_t g = line, end = line_end(row_blocks, line, p.groups); g < end; ++g) {
      __m256 w[4];
      decode_avx2(row_blocks + g * kBytesPerBlock, low_table, high_table, w);
      const int s = row_scales[g];
      const __m256 factor = _mm256_set1_ps(scale[s]);
      if (!kMayOverflow || s < kOverflowingScale) {
        for (int t = 0; t < TOKENS; ++t)
          acc[t] = _mm256_fmadd_ps(block_dot(w, x + t * p.I + g * kValuesPerBlock), factor, acc[t]);
      } else {
        for (int k = 0; k < 4; ++k) w[k] = _mm256_mul_ps(w[k], factor);
        for (int t = 0; t < TOKENS; ++t)
          acc[t] = _mm256_add_ps(acc[t], block_dot(w, x + t * p.I + g * kValuesPerBlock));
      }
    }
  for (int t = 0; t < TOKENS; ++t) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc[t]);
    p.out[(first + t) * p.O + o] = lanes_sum(lanes) + (p.bias ? p.bias[o] : 0.0f);
  }
}

template <int TOKENS>
__attribute__((target("avx2,fma"))) void rows_avx2(const Problem& p, int64_t first, int64_t row_begin,
                                                    int64_t row_end) {
  const Bf16Bytes& bytes = fp4_bf16_bytes();
  const __m256i low_table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes.low)));
  const __m256i high_table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes.high)));
  for (int64_t o = row_begin; o < row_end; ++o)
    (row_may_overflow(p, o) ? row_avx2<TOKENS, true> : row_avx2<TOKENS, false>)(p, first, o, low_table, high_table);
}

// One block's 32 values, already multiplied by the block's power of two, as two vectors of floats: the E2M1
// table is scaled first (one vmulps: value x 2^(s - 127) in float32, as dequantize_mxfp4 computes it, inf and
// NaN of overflowing scales included), then the 16 bytes are widened to one per 32-bit lane and the table
// looked up by each lane's low four bits (vpermps reads no others), once as they are and once shifted by a
// nibble. The products need no scaling afterwards, and no block needs an overflow test.
__attribute__((target("avx512f"))) inline void decode_avx512(const uint8_t* bytes, float scale, __m512 table,
                                                             __m512 w[2]) {
  const __m512 scaled = _mm512_mul_ps(table, _mm512_set1_ps(scale));
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  w[0] = _mm512_permutexvar_ps(codes, scaled);
  w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), scaled);
}

// A line's four blocks against one token's 128 values: two chains of four products (blocks 0-1, blocks 2-3),
// so that the token's accumulator waits on one add per line, not on an FMA per block.
__attribute__((target("avx512f"))) inline __m512 line_dot(const __m512 w[kBlocksPerLine][2], const __m512 x[8]) {
  __m512 low = _mm512_mul_ps(w[0][0], x[0]), high = _mm512_mul_ps(w[2][0], x[4]);
  low = _mm512_fmadd_ps(w[0][1], x[1], low);
  high = _mm512_fmadd_ps(w[2][1], x[5], high);
  low = _mm512_fmadd_ps(w[1][0], x[2], low);
  high = _mm512_fmadd_ps(w[3][0], x[6], high);
  low = _mm512_fmadd_ps(w[1][1], x[3], low);
  high = _mm512_fmadd_ps(w[3][1], x[7], high);
  return _mm512_add_ps(low, high);
}

// Rows [o, o + ROWS) against TOKENS tokens, a line of four blocks at a time. Each x vector is loaded once for
// all ROWS rows: one row at a time, the loads of x were what bounded two to eight tokens (from L2 at eight)
// and part of one. A row's sums are the same operations in the same order whatever ROWS and TOKENS are, so
// neither the batch nor the split of rows between threads changes a result.
template <int TOKENS, int ROWS>
__attribute__((target("avx512f"))) void row_group_avx512(const Problem& p, int64_t first, int64_t o, __m512 table) {
  const auto& scale = scale_values();
  const float* x = p.x + first * p.I;
  const uint8_t* blocks[ROWS];
  const uint8_t* scales[ROWS];
  for (int r = 0; r < ROWS; ++r) {
    blocks[r] = p.blocks + (o + r) * p.groups * kBytesPerBlock;
    scales[r] = p.scales + (o + r) * p.groups;
  }
  __m512 acc[ROWS][TOKENS];
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < TOKENS; ++t) acc[r][t] = _mm512_setzero_ps();
  // Ahead of each row: kPrefetchBytes, or the same row of the next group where that is further (2048 bytes
  // ahead of a 1440-byte row would ask for a row of this group, already being read).
  const int64_t ahead = std::max(kPrefetchBytes, ROWS * p.groups * kBytesPerBlock);
  int64_t g = 0;
  for (; g + kBlocksPerLine <= p.groups; g += kBlocksPerLine) {
    __m512 w[ROWS][kBlocksPerLine][2];
    for (int r = 0; r < ROWS; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(blocks[r] + g * kBytesPerBlock + ahead), _MM_HINT_T0);
      for (int b = 0; b < kBlocksPerLine; ++b)
        decode_avx512(blocks[r] + (g + b) * kBytesPerBlock, scale[scales[r][g + b]], table, w[r][b]);
    }
    for (int t = 0; t < TOKENS; ++t) {
      __m512 xv[8];
      for (int k = 0; k < 8; ++k) xv[k] = _mm512_loadu_ps(x + t * p.I + g * kValuesPerBlock + 16 * k);
      for (int r = 0; r < ROWS; ++r) acc[r][t] = _mm512_add_ps(acc[r][t], line_dot(w[r], xv));
    }
  }
  for (; g < p.groups; ++g) {  // the blocks of a last, partial line
    __m512 w[ROWS][2];
    for (int r = 0; r < ROWS; ++r) decode_avx512(blocks[r] + g * kBytesPerBlock, scale[scales[r][g]], table, w[r]);
    for (int t = 0; t < TOKENS; ++t) {
      const float* xt = x + t * p.I + g * kValuesPerBlock;
      const __m512 x0 = _mm512_loadu_ps(xt), x1 = _mm512_loadu_ps(xt + 16);
      for (int r = 0; r < ROWS; ++r)
        acc[r][t] = _mm512_add_ps(acc[r][t], _mm512_fmadd_ps(w[r][1], x1, _mm512_mul_ps(w[r][0], x0)));
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int t = 0; t < TOKENS; ++t) {
      float lanes[16];
      _mm512_storeu_ps(lanes, acc[r][t]);
      float halves[8];
      for (int l = 0; l < 8; ++l) halves[l] = lanes[l] + lanes[8 + l];
      p.out[(first + t) * p.O + o + r] = lanes_sum(halves) + (p.bias ? p.bias[o + r] : 0.0f);
    }
}

// Rows decoded together for TOKENS tokens. One token reads one row at a time: from memory a single stream of
// packed bytes beat sharing x's loads (5760x2880, one thread: two or four rows at once 0.89x / 0.93x the old
// kernel, one row 1.17x). From two tokens on, the fastest of 2 and 4 in L2 (bench/NOTES.md, MoE section); more
// rows do not fit the 32 registers.
constexpr int rows_at_once(int tokens) { return tokens == 1 ? 1 : tokens <= 3 ? 2 : 4; }

template <int TOKENS>
__attribute__((target("avx512f"))) void rows_avx512(const Problem& p, int64_t first, int64_t row_begin,
                                                    int64_t row_end) {
  constexpr int kRows = rows_at_once(TOKENS);
  const __m512 table = _mm512_loadu_ps(kFp4);
  int64_t o = row_begin;
  for (; o + kRows <= row_end; o += kRows) row_group_avx512<TOKENS, kRows>(p, first, o, table);
  for (; o < row_end; ++o) row_group_avx512<TOKENS, 1>(p, first, o, table);
}

using RowsFn = void (*)(const Problem&, int64_t, int64_t, int64_t);
constexpr RowsFn kRowsAvx2[kMaxTokens] = {rows_avx2<1>, rows_avx2<2>, rows_avx2<3>, rows_avx2<4>,
                                          rows_avx2<5>, rows_avx2<6>, rows_avx2<7>, rows_avx2<8>};
constexpr RowsFn kRowsAvx512[kMaxTokens] = {rows_avx512<1>, rows_avx512<2>, rows_avx512<3>, rows_avx512<4>,
                                            rows_avx512<5>, rows_avx512<6>, rows_avx512<7>, rows_avx512<8>};
#endif

// Every group's rows [begin, end) against all its tokens. One parallel region for all the groups, split by
// weight rows: each thread takes the same share of every group's rows, so uneven token counts stay balanced.
void run_groups(const std::vector<Problem>& groups, int64_t O, Isa isa) {
  at::parallel_for(0, O, 16, [&](int64_t begin, int64_t end) {
    for (const Problem& p : groups)
      for (int64_t first = 0; first < p.tokens; first += kMaxTokens) {
        const int tokens = static_cast<int>(std::min<int64_t>(kMaxTokens, p.tokens - first));
#if defined(__x86_64__)
        if (isa != Isa::kPortable) {
          (isa == Isa::kAvx512 ? kRowsAvx512 : kRowsAvx2)[tokens - 1](p, first, begin, end);
          continue;
        }
#endif
        rows_portable(p, first, tokens, begin, end);
      }
  });
}

void check_weights(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales, int64_t weight_dims) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(), "x: contiguous float32 [M,I]");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == weight_dims + 1 && blocks.is_contiguous() &&
                  blocks.size(-1) == kBytesPerBlock && blocks.size(-2) * kValuesPerBlock == x.size(1),
              "blocks: contiguous uint8 [", weight_dims == 3 ? "E, " : "", "O, I/32, 16] for this x");
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() && scales.dim() == weight_dims &&
                  scales.sizes() == blocks.sizes().slice(0, weight_dims),
              "scales: contiguous uint8 [", weight_dims == 3 ? "E, " : "", "O, I/32] matching blocks");
}

const float* bias_data(const c10::optional<at::Tensor>& bias, at::IntArrayRef shape, const char* shape_name) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->sizes() == shape,
              "bias: float32 ", shape_name);
  return bias->data_ptr<float>();
}

at::Tensor mxfp4_linear(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
                        const c10::optional<at::Tensor>& bias, const std::string& isa_name) {
  check_weights(x, blocks, scales, 2);
  const Isa isa = choose_isa(isa_name);
  const int64_t M = x.size(0), O = blocks.size(0);
  const float* bias_ptr = bias_data(bias, {O}, "[O]");
  const at::Tensor xp = permute_to_lanes(x, isa);
  at::Tensor out = at::empty({M, O}, x.options());
  run_groups({Problem{xp.data_ptr<float>(), blocks.data_ptr<uint8_t>(), scales.data_ptr<uint8_t>(), bias_ptr,
                      out.data_ptr<float>(), x.size(1), O, blocks.size(1), M}},
             O, isa);
  return out;
}

}  // namespace

namespace gptserve {

// A mixture-of-experts layer's expert runs in one call: x's rows grouped by expert, counts[e] of them for
// expert e, each multiplied by its expert's weights. Per expert a Python call and a parallel region were most
// of a run's cost at small widths and several at 2880 (bench/NOTES.md, MoE section).
at::Tensor mxfp4_grouped_linear(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& blocks,
                                const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                const std::string& isa_name) {
  check_weights(x, blocks, scales, 3);
  const Isa isa = choose_isa(isa_name);
  const int64_t E = blocks.size(0), O = blocks.size(1), groups = blocks.size(2), I = x.size(1);
  TORCH_CHECK(counts.scalar_type() == at::kLong && counts.is_contiguous() && counts.dim() == 1 &&
                  counts.size(0) == E && counts.device().is_cpu(),
              "counts: contiguous int64 [E] on the CPU");
  const float* bias_ptr = bias_data(bias, {E, O}, "[E, O]");
  const int64_t* count = counts.data_ptr<int64_t>();
  const at::Tensor xp = permute_to_lanes(x, isa);
  at::Tensor out = at::empty({x.size(0), O}, x.options());
  std::vector<Problem> problems;
  int64_t row = 0;
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(count[e] >= 0 && row + count[e] <= x.size(0), "counts: non-negative, summing to x's rows");
    if (count[e])
      problems.push_back(Problem{xp.data_ptr<float>() + row * I, blocks.data_ptr<uint8_t>() + e * O * groups * kBytesPerBlock,
                                 scales.data_ptr<uint8_t>() + e * O * groups, bias_ptr ? bias_ptr + e * O : nullptr,
                                 out.data_ptr<float>() + row * O, I, O, groups, count[e]});
    row += count[e];
  }
  TORCH_CHECK(row == x.size(0), "counts: non-negative, summing to x's rows");
  run_groups(problems, O, isa);
  return out;
}

}  // namespace gptserve

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("mxfp4_linear(Tensor x, Tensor blocks, Tensor scales, Tensor? bias, str isa=\"best\") -> Tensor");
  m.def("mxfp4_grouped_linear(Tensor x, Tensor counts, Tensor blocks, Tensor scales, Tensor? bias, "
        "str isa=\"best\") -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("mxfp4_linear", mxfp4_linear);
  m.impl("mxfp4_grouped_linear", gptserve::mxfp4_grouped_linear);
}
