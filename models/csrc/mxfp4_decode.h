// One 16-byte MXFP4 block (32 E2M1 values sharing one power-of-two scale) decoded in registers, for the kernels
// that turn MXFP4 weights into bf16 or float32 ones (mxfp4_dequantize.cpp, mxfp4_dot_linear.cpp).
// Byte j of a block holds value 2j in its low nibble and 2j+1 in its high one; the block's values are
// multiplied by 2^(scale - 127). Every E2M1 value times a power of two is exact in float32 and in bfloat16 (one
// mantissa bit, and bf16 has float32's exponent range), so the bf16 bits are the float32's upper half.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace gptserve::mxfp4 {

constexpr int64_t kValuesPerBlock = 32, kBytesPerBlock = 16;

constexpr float kFp4[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                            -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// kFp4's values as bf16 bits, twice (a 32-word table for vpermw, which reads five bits of an index).
constexpr uint16_t kFp4Bf16[32] = {0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                   0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0,
                                   0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040, 0x4080, 0x40C0,
                                   0x8000, 0xBF00, 0xBF80, 0xBFC0, 0xC000, 0xC040, 0xC080, 0xC0C0};
// Scales whose powers of two keep every nonzero E2M1 value (exponents 126..129 as bf16) a normal bf16 number,
// so that scaling is an add to the exponent field.
constexpr uint8_t kExponentAddMin = 2, kExponentAddMax = 252;

// 2^(scale - 127) in float32, as torch.exp2 gives it.
inline float scale_value(uint8_t scale) {
  static const auto table = [] {
    struct Table {
      float values[256];
    } t{};
    for (int s = 0; s < 256; ++s) t.values[s] = std::ldexp(1.0f, s - 127);
    return t;
  }();
  return table.values[scale];
}

#if defined(__x86_64__)
// The 16 bytes widened to one per 32-bit lane and the E2M1 table looked up by each lane's low four bits
// (vpermps reads no others), once as they are (even values) and once shifted by a nibble (odd values).
__attribute__((target("avx512f"))) inline void decode(const uint8_t* bytes, float scale, __m512& even,
                                                      __m512& odd) {
  const __m512 table = _mm512_loadu_ps(kFp4);
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512 s = _mm512_set1_ps(scale);
  even = _mm512_mul_ps(_mm512_permutexvar_ps(codes, table), s);
  odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(codes, 4), table), s);
}

// The block as sixteen bf16 pairs, one per 32-bit lane: lane j = value 2j+1's bits << 16 | value 2j's bits.
__attribute__((target("avx512f"))) inline __m512i bf16_pairs(const uint8_t* bytes, float scale) {
  __m512 even, odd;
  decode(bytes, scale, even, odd);
  const __m512i high = _mm512_and_si512(_mm512_castps_si512(odd), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
  return _mm512_or_si512(high, _mm512_srli_epi32(_mm512_castps_si512(even), 16));
}

// bf16_pairs for a scale in [kExponentAddMin, kExponentAddMax], in integer ops: each nibble's bf16 bits looked
// up as one word (vpermw), and scale - 127 added to the exponent of each nonzero one. The same bits as
// bf16_pairs, at about half its cost where 512-bit float ops issue as two halves.
__attribute__((target("avx512f,avx512bw"))) inline __m512i bf16_pairs_exponent_add(const uint8_t* bytes,
                                                                                  uint8_t scale) {
  const __m512i table = _mm512_loadu_si512(kFp4Bf16);
  const __m512i codes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  // word 2j: byte j whole (vpermw reads its low five bits, the low nibble and one bit the doubled table
  // ignores); word 2j+1: its high nibble, shifted into place.
  const __m512i nibbles = _mm512_or_si512(codes, _mm512_slli_epi32(codes, 12));
  const __m512i bits = _mm512_permutexvar_epi16(nibbles, table);
  const __mmask32 nonzero = _mm512_test_epi16_mask(bits, _mm512_set1_epi16(0x7FFF));
  return _mm512_mask_add_epi16(bits, nonzero, bits, _mm512_set1_epi16(static_cast<int16_t>((scale - 127) * 128)));
}
#endif

}  // namespace gptserve::mxfp4
