// A prompt's rows times an MXFP4 weight on CPUs with AVX512-BF16 (and no AMX), for a bf16 model's experts:
//   mxfp4_dot_linear(x [M,K] bfloat16, blocks [N,K/32,16] uint8, scales [N,K/32] uint8, bias [N] float32 or None)
//     -> [M,N] bfloat16
// Each group of 32 outputs is decoded from MXFP4 into bf16_dot_linear's packed layout in a scratch tile that
// stays in cache (180 KiB at K = 2880), and the vdpbf16ps passes multiply it with every row there. The weight
// is never written out whole: dequantizing a gpt-oss-20b-widths expert to bf16 for torch's GEMM wrote 50 MB a
// matrix pair, and torch's (oneDNN's) bf16 GEMM ran at ~300 GFLOP/s at the ~64 rows an expert gets in a
// 512-token prefill, where these dots run at ~400 on two Zen 4 cores (bench/NOTES.md, session 24).
// The result is bf16_dot_linear's on the dequantized weight, bit for bit: the decoded values are exact.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "bf16_dot_linear.h"
#include "cpu_features.h"
#include "mxfp4_decode.h"

#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using namespace gptserve::mxfp4;

constexpr int64_t kLanes = 32;  // outputs per packed group

#if defined(__x86_64__)
// r[i] lane j <- r[j] lane i, for sixteen rows of sixteen 32-bit words.
__attribute__((target("avx512f,avx512bw"))) inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {  // in each 128-bit lane q: pairs of rows interleaved
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // b[4i + k] lane q: column 4q + k of rows 4i..4i+3
    b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // column 4q + k gathers lane q of b[k], b[4 + k], b[8 + k], b[12 + k]
    const __m512i c0 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0x44), c1 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0xEE);
    const __m512i c2 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0x44);
    const __m512i c3 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(c0, c2, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(c0, c2, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(c1, c3, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(c1, c3, 0xDD);
  }
}

// Group g's 32 weight rows into the packed tile: block j of row 32 g + lane holds the input pairs 16 j .. 16 j + 15,
// and pair p of all 32 lanes is one 128-byte stretch of the tile. Each half of the lanes decodes its sixteen
// blocks j into sixteen registers of pairs and transposes them into sixteen registers of lanes.
__attribute__((target("avx512f,avx512bw"))) void fill_group(const uint8_t* blocks, const uint8_t* scales, int64_t N,
                                                   int64_t groups_per_row, int64_t g, uint16_t* tile) {
  __m512i r[16];
  for (int64_t half = 0; half < 2; ++half)
    for (int64_t j = 0; j < groups_per_row; ++j) {
      for (int64_t lane = 0; lane < 16; ++lane) {
        const int64_t row = g * kLanes + half * 16 + lane;
        const int64_t block = row * groups_per_row + j;
        const uint8_t scale = row < N ? scales[block] : 0;
        if (row >= N)
          r[lane] = _mm512_setzero_si512();
        else if (scale >= kExponentAddMin && scale <= kExponentAddMax)
          r[lane] = bf16_pairs_exponent_add(blocks + block * kBytesPerBlock, scale);
        else
          r[lane] = bf16_pairs(blocks + block * kBytesPerBlock, scale_value(scale));
      }
      transpose16(r);
      for (int64_t pair = 0; pair < 16; ++pair)
        _mm512_storeu_si512(tile + ((16 * j + pair) * kLanes + half * 16) * 2, r[pair]);
    }
}
#endif

at::Tensor mxfp4_dot_linear(const at::Tensor& x, const at::Tensor& blocks, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(has_avx512_bf16(), "mxfp4_dot_linear: this CPU lacks AVX512-BF16 (or AVX512-BW)");
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(2) == kBytesPerBlock,
              "blocks: contiguous uint8 [N, K/32, 16]");
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                  scales.sizes() == blocks.sizes().slice(0, 2),
              "scales: contiguous uint8 [N, K/32] matching blocks");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == blocks.size(1) * kValuesPerBlock, "x: [M, K] with K = 32 * blocks.size(1)");
  const int64_t N = blocks.size(0), groups_per_row = blocks.size(1);
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  return gptserve::bf16_dot_linear_filled(
      x, N,
      [&](int64_t g, uint16_t* tile) {
#if defined(__x86_64__)
        fill_group(b, s, N, groups_per_row, g, tile);
#endif
      },
      bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("mxfp4_dot_linear(Tensor x, Tensor blocks, Tensor scales, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) { m.impl("mxfp4_dot_linear", mxfp4_dot_linear); }
