// MXFP4 weights dequantized in one pass, for inputs of many rows that multiply a whole expert through a GEMM.
// Through torch ops (a byte-table lookup, a scale multiply, a cast) an expert's 24.9M values take ~45 ms on
// one thread, as long as a bf16 GEMM of ~200 rows against them; here each 16-byte block is decoded in
// registers and its 32 values written once.
//   mxfp4_dequantize(blocks [..., G, 16] uint8, scales [..., G] uint8, dtype float32|bfloat16) -> [..., G * 32]
// The block format and its decoding are mxfp4_decode.h's. The result equals models/mxfp4.py's dequantize_mxfp4
// bit for bit. Only NaN (a zero code times the scale 255, which is inf) may come out with other bits than
// torch's conversion gives it: still a NaN.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_features.h"
#include "mxfp4_decode.h"

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

using namespace gptserve::mxfp4;

// Blocks per parallel chunk: 2,048 blocks write 256 KiB of bf16, enough to pay for a thread's start.
constexpr int64_t kGrainBlocks = 2048;

// Each way writes blocks [begin, end) of a chunk, its loop inside the function so the per-block decode inlines
// into it (a call per 32 values, with the stack set up for 512-bit registers, cost more than the decode).
template <typename Out>
void blocks_portable(const uint8_t* blocks, const uint8_t* scales, Out* out, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const float scale = scale_value(scales[b]);
    for (int64_t j = 0; j < kBytesPerBlock; ++j) {
      const uint8_t byte = blocks[b * kBytesPerBlock + j];
      out[b * kValuesPerBlock + 2 * j] = static_cast<Out>(kFp4[byte & 15] * scale);
      out[b * kValuesPerBlock + 2 * j + 1] = static_cast<Out>(kFp4[byte >> 4] * scale);
    }
  }
}

#if defined(__x86_64__)
// 32 bf16 values in one 64-byte store.
__attribute__((target("avx512f"))) void blocks_avx512(const uint8_t* blocks, const uint8_t* scales,
                                                      c10::BFloat16* out, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b)
    _mm512_storeu_si512(out + b * kValuesPerBlock, bf16_pairs(blocks + b * kBytesPerBlock, scale_value(scales[b])));
}

// The same with AVX512-BW (every CPU with AMX has it): the codes looked up as bf16 words and scaled by an add
// to their exponents where the scale keeps them normal, cheaper than the float decode. The bf16
// dequantization is what a prompt's experts wait on before oneDNN's GEMM on AMX CPUs.
__attribute__((target("avx512f,avx512bw"))) void blocks_avx512_words(const uint8_t* blocks, const uint8_t* scales,
                                                                    c10::BFloat16* out, int64_t begin,
                                                                    int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const uint8_t* bytes = blocks + b * kBytesPerBlock;
    const uint8_t scale = scales[b];
    _mm512_storeu_si512(out + b * kValuesPerBlock, scale >= kExponentAddMin && scale <= kExponentAddMax
                                                       ? bf16_pairs_exponent_add(bytes, scale)
                                                       : bf16_pairs(bytes, scale_value(scale)));
  }
}

__attribute__((target("avx512f"))) void blocks_avx512(const uint8_t* blocks, const uint8_t* scales, float* out,
                                                      int64_t begin, int64_t end) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t b = begin; b < end; ++b) {
    __m512 even, odd;
    decode(blocks + b * kBytesPerBlock, scale_value(scales[b]), even, odd);
    _mm512_storeu_ps(out + b * kValuesPerBlock, _mm512_permutex2var_ps(even, first, odd));
    _mm512_storeu_ps(out + b * kValuesPerBlock + 16, _mm512_permutex2var_ps(even, second, odd));
  }
}
#endif

template <typename Out>
void dequantize_blocks(const uint8_t* blocks, const uint8_t* scales, Out* out, int64_t count, bool avx512) {
  [[maybe_unused]] const bool words = avx512 && has_avx512bw();
  at::parallel_for(0, count, kGrainBlocks, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if constexpr (std::is_same_v<Out, c10::BFloat16>)
      if (words) return blocks_avx512_words(blocks, scales, out, begin, end);
    if (avx512) return blocks_avx512(blocks, scales, out, begin, end);
#endif
    blocks_portable(blocks, scales, out, begin, end);
  });
}

// Into ``out`` (float32 or bfloat16, contiguous, blocks' values): a caller that dequantizes many matrices of one
// size reuses one buffer, where a fresh 33 MB tensor a call costs more in page faults (the OS zeroing the new
// pages) than the decode itself.
void mxfp4_dequantize_into(const at::Tensor& blocks, const at::Tensor& scales, const at::Tensor& out,
                           const std::string& isa_name) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() >= 2 &&
                  blocks.size(-1) == kBytesPerBlock,
              "blocks: contiguous uint8 [..., G, 16]");
  TORCH_CHECK(scales.scalar_type() == at::kByte && scales.is_contiguous() &&
                  scales.sizes() == blocks.sizes().slice(0, blocks.dim() - 1),
              "scales: contiguous uint8 [..., G] matching blocks");
  TORCH_CHECK(out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16, "out: float32 or bfloat16");
  TORCH_CHECK(out.is_contiguous() && out.numel() == scales.numel() * kValuesPerBlock,
              "out: contiguous, as many values as the blocks hold");
  const bool avx512 = choose_isa(isa_name) == Isa::kAvx512;
  const uint8_t* b = blocks.data_ptr<uint8_t>();
  const uint8_t* s = scales.data_ptr<uint8_t>();
  if (out.scalar_type() == at::kFloat)
    dequantize_blocks(b, s, out.data_ptr<float>(), scales.numel(), avx512);
  else
    dequantize_blocks(b, s, out.data_ptr<c10::BFloat16>(), scales.numel(), avx512);
}

at::Tensor mxfp4_dequantize(const at::Tensor& blocks, const at::Tensor& scales, at::ScalarType dtype,
                            const std::string& isa_name) {
  std::vector<int64_t> shape(blocks.sizes().begin(), blocks.sizes().end() - 1);
  TORCH_CHECK(!shape.empty(), "blocks: contiguous uint8 [..., G, 16]");
  shape.back() *= kValuesPerBlock;
  at::Tensor out = at::empty(shape, blocks.options().dtype(dtype));
  mxfp4_dequantize_into(blocks, scales, out, isa_name);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("mxfp4_dequantize(Tensor blocks, Tensor scales, ScalarType dtype, str isa=\"best\") -> Tensor");
  m.def("mxfp4_dequantize_into(Tensor blocks, Tensor scales, Tensor(a!) out, str isa=\"best\") -> ()");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("mxfp4_dequantize", mxfp4_dequantize);
  m.impl("mxfp4_dequantize_into", mxfp4_dequantize_into);
}
