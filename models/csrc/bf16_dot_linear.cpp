// A bf16 model's linear layer on CPUs with AVX512-BF16 (and no AMX, where oneDNN's tiles win): bf16 inputs
// times the packed bf16 weight of bf16_linear.cpp, dotted in pairs by vdpbf16ps, nothing widened.
//   bf16_dot_linear(x [M,K] bfloat16, packed, bias [N] float32 or None, N) -> [M,N] bfloat16
// packed [ceil(N/32), ceil(K/2), 32, 2] int16 holds weight (n, k) as word 2 * (n % 32) + k % 2 of input pair
// k / 2 of group n / 32: a 64-byte load is the pairs (2p, 2p+1) of sixteen outputs, exactly the operand
// vdpbf16ps multiplies with a broadcast pair of x, adding both products into each output's float32 lane.
//
// At one row oneDNN's inner product on its prepacked bf16 weight streamed 20-30 GB/s of GPT-OSS's attention
// projections on two Zen 4 cores where a plain read of the same bytes ran at 29-46 (bench/NOTES.md, session
// 14); these dots run at the read's rate. For prompts, the same loop at twelve rows a pass keeps 24
// accumulators busy: the products are vdpbf16ps's, which on that CPU do the work of two float32 FMAs each.
//
// Products of two bf16 values are exact in float32; vdpbf16ps adds them into float32 sums with its own
// rounding (subnormal inputs and results are taken as zero, as in oneDNN's bf16 kernels on the same
// instruction). Each output gets its bias in float32 and is rounded to bf16 once. A row's sums see the same
// operations in the same order whatever other rows share the call, and whatever the thread count.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16_dot_linear.h"
#include "cpu_features.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kLanes = 32;      // outputs per packed group
constexpr int64_t kGroupPair = 64;  // int16 words of one input pair of a group
constexpr int kRowsPerPass = 12;    // 24 accumulators of the 32 registers
// Rows of x transposed together: a pass broadcasts its rows' pairs from one short stretch of a block
// ([pairs, kBlockRows] words), not from rows a whole input apart, which at K = 4096 alias every 4 KiB.
constexpr int64_t kBlockRows = 96;
// The weights are asked for this many words (4 KiB) ahead, hinted as the CPU streams best (cpu_features.h).
constexpr int64_t kAhead = 2048;

// x [M, K] -> [blocks, pairs, rows] 32-bit words, word (b, p, r) the pair (2p, 2p+1) of row b * rows + r,
// zero past K and past M.
at::Tensor pairs_by_block(const at::Tensor& x, int64_t block_rows) {
  const int64_t M = x.size(0), K = x.size(1), pairs = (K + 1) / 2, blocks = (M + block_rows - 1) / block_rows;
  at::Tensor padded = x;
  if (K % 2 || M % block_rows) {
    padded = at::zeros({blocks * block_rows, 2 * pairs}, x.options());
    padded.narrow(0, 0, M).narrow(1, 0, K).copy_(x);
  }
  return padded.view(at::kInt).view({blocks, block_rows, pairs}).transpose(1, 2).contiguous();
}

struct Call {
  const uint32_t* xt;  // pairs_by_block(x)
  const float* bias;   // or nullptr
  c10::BFloat16* out;
  int64_t N, pairs, block_rows;
};

#if defined(__x86_64__)
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

// ROWS rows from `first` (within one block) against group g, whose packed weights are w: out[r][32 g + lane]
// for the group's valid lanes.
template <int ROWS, StreamHint HINT>
TARGET_BF16 void group_pass(const Call& c, const uint16_t* w, int64_t g, int64_t first) {
  const int64_t block = first / c.block_rows, in_block = first % c.block_rows;
  const uint32_t* x = c.xt + block * c.pairs * c.block_rows + in_block;
  __m512 acc[ROWS][2];
  for (int r = 0; r < ROWS; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < c.pairs; ++p, w += kGroupPair, x += c.block_rows) {
    prefetch_streamed<HINT>(w + kAhead);
    prefetch_streamed<HINT>(w + kAhead + 32);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w), w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    for (int r = 0; r < ROWS; ++r) {
      const __m512bh pair = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], pair, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], pair, w1);
    }
  }
  const int64_t valid = std::min<int64_t>(kLanes, c.N - g * kLanes);
  for (int r = 0; r < ROWS; ++r) {
    alignas(64) float sums[kLanes];
    _mm512_store_ps(sums, acc[r][0]);
    _mm512_store_ps(sums + 16, acc[r][1]);
    c10::BFloat16* out = c.out + (first + r) * c.N + g * kLanes;
    for (int64_t j = 0; j < valid; ++j) out[j] = c10::BFloat16(sums[j] + (c.bias ? c.bias[g * kLanes + j] : 0.0f));
  }
}

using Pass = void (*)(const Call&, const uint16_t*, int64_t, int64_t);

template <StreamHint HINT, size_t... R>
constexpr std::array<Pass, sizeof...(R)> passes(std::index_sequence<R...>) {
  return {&group_pass<static_cast<int>(R) + 1, HINT>...};
}

// Rows [first, first + rows) of one block against group g (packed weights w), in passes of nearly equal size
// (a block's 96 rows are eight passes of 12; 13 rows are 7 and 6, not 12 and a pass of one that reads the
// weights for one row). Weights streamed from memory are prefetched as this CPU streams best; a group decoded
// into a scratch tile is in cache, and is prefetched into L2 (a no-op there).
void block_against_group(const Call& c, const uint16_t* w, int64_t g, int64_t first, int64_t rows, StreamHint hint) {
  static constexpr auto into_l2 = passes<StreamHint::kIntoL2>(std::make_index_sequence<kRowsPerPass>());
  static constexpr auto non_temporal = passes<StreamHint::kNonTemporal>(std::make_index_sequence<kRowsPerPass>());
  const auto& pass = hint == StreamHint::kIntoL2 ? into_l2 : non_temporal;
  const int64_t count = (rows + kRowsPerPass - 1) / kRowsPerPass, base = rows / count, longer = rows % count;
  for (int64_t p = 0; p < count; ++p) {
    const int64_t n = base + (p < longer ? 1 : 0);
    pass[n - 1](c, w, g, first);
    first += n;
  }
}
#endif

// The checks and set-up both entry points share: out [M, N] and the Call over x's transposed blocks (kept
// alive in xt).
Call prepare(const at::Tensor& x, int64_t N, const c10::optional<at::Tensor>& bias, at::Tensor& xt, at::Tensor& out) {
  TORCH_CHECK(has_avx512_bf16(), "bf16_dot_linear: this CPU lacks AVX512-BF16 (or AVX512-BW)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bfloat16 [M,K]");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N, "bias: float32 [N]");
  const int64_t M = x.size(0), block_rows = std::max<int64_t>(1, std::min(M, kBlockRows));
  out = at::empty({M, N}, x.options());
  xt = M == 0 ? at::empty({0}, x.options().dtype(at::kInt)) : pairs_by_block(x, block_rows);
  return Call{reinterpret_cast<const uint32_t*>(xt.data_ptr<int32_t>()), has_bias ? bias->data_ptr<float>() : nullptr,
              out.data_ptr<c10::BFloat16>(), N, (x.size(1) + 1) / 2, block_rows};
}

}  // namespace

namespace gptserve {

at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                           int64_t N) {
  at::Tensor xt, out;
  const Call c = prepare(x, N, bias, xt, out);
  TORCH_CHECK(packed.scalar_type() == at::kShort && packed.dim() == 4 && packed.is_contiguous() &&
                  packed.size(2) == kLanes && packed.size(3) == 2 && packed.size(1) == c.pairs &&
                  packed.size(0) * kLanes >= N && (packed.size(0) - 1) * kLanes < N,
              "packed: int16 [ceil(N/32), ceil(K/2), 32, 2] for this x and N");
  const int64_t M = x.size(0), groups = packed.size(0);
  if (M == 0) return out;
#if defined(__x86_64__)
  const uint16_t* w = reinterpret_cast<const uint16_t*>(packed.data_ptr<int16_t>());
  // Each thread takes a run of groups and, block by block, passes its rows over them: the x block stays in
  // cache while the groups stream by, and for a decode step (one block) every weight is read once.
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    for (int64_t first = 0; first < M; first += c.block_rows)
      for (int64_t g = begin; g < end; ++g)
        block_against_group(c, w + g * c.pairs * kGroupPair, g, first, std::min(c.block_rows, M - first),
                            stream_hint());
  });
#endif
  return out;
}

at::Tensor bf16_dot_linear_filled(const at::Tensor& x, int64_t N, c10::function_ref<void(int64_t, uint16_t*)> fill,
                                  const c10::optional<at::Tensor>& bias) {
  at::Tensor xt, out;
  const Call c = prepare(x, N, bias, xt, out);
  const int64_t M = x.size(0), groups = (N + kLanes - 1) / kLanes;
  if (M == 0) return out;
#if defined(__x86_64__)
  // Each thread takes a run of groups; each group is filled into the thread's tile once and all of x's blocks
  // pass over it while it is in cache.
  at::parallel_for(0, groups, 4, [&](int64_t begin, int64_t end) {
    at::Tensor tile = at::empty({c.pairs * kGroupPair}, x.options().dtype(at::kShort));
    uint16_t* w = reinterpret_cast<uint16_t*>(tile.data_ptr<int16_t>());
    for (int64_t g = begin; g < end; ++g) {
      fill(g, w);
      for (int64_t first = 0; first < M; first += c.block_rows)
        block_against_group(c, w, g, first, std::min(c.block_rows, M - first), StreamHint::kIntoL2);
    }
  });
#endif
  return out;
}

}  // namespace gptserve

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("bf16_dot_linear(Tensor x, Tensor packed, Tensor? bias, int N) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) { m.impl("bf16_dot_linear", gptserve::bf16_dot_linear); }
