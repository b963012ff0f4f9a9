// A whole GPT-OSS layer for the few rows of a bf16 decode step (a ``--dtype bfloat16`` model with packed MXFP4
// experts on a CPU with AVX512-BF16), in one call:
//   gpt_oss_decode_layer(x [M,H] bfloat16, weights, key_cache, value_cache, slots [M], blocks [M,B],
//                        context_lens [M], cos [M,D/2] bfloat16, sin [M,D/2] bfloat16, block_size, window,
//                        num_heads, head_dim, eps, experts_per_token, swiglu_alpha, swiglu_limit) -> x' [M,H]
// with weights = [attn_norm weight, qkv packed, qkv bias, out packed, out bias, sinks, mlp_norm weight,
//                 router packed, router bias, gate_up blocks, gate_up scales, gate_up bias, down blocks,
//                 down scales, down bias]: norms, biases and sinks in float32, packed linears in
// models/bf16_weight_linear.py's layout (read by bf16_dot_linear), experts as MXFP4 blocks and scales.
// Row i is the one new token of sequence i; its key and value go to pool slot slots[i], then it attends over
// its sequence's keys in place (paged_decode_attention.h; window 0: all of them).
//
// The arithmetic is the torch modules' of models/gpt_oss.py and models/moe.py, op for op: every op a bf16
// tensor op would round is rounded to bf16 here at the same point (c10::BFloat16 rounds to nearest even, as
// torch does), norms and the routing softmax are taken in float32, and the matrix products are the same
// kernels' calls. What the call saves is the ~150 small torch ops of a layer between the five products (norms,
// rotary, the KV write, routing, grouping, SwiGLU, the weighted sum), each a dispatch, an allocation and an
// interpreter round trip: ~1.5 ms of a ~15 ms layer at one token on two Xeon cores (bench/NOTES.md, session 18).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16_dot_linear.h"
#include "mxfp4_bf16_linear.h"
#include "paged_decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

using c10::BFloat16;

inline BFloat16 round_bf16(float value) { return BFloat16(value); }

enum Weight {
  kAttnNorm, kQkvPacked, kQkvBias, kOutPacked, kOutBias, kSinks, kMlpNorm, kRouterPacked, kRouterBias,
  kGateUpBlocks, kGateUpScales, kGateUpBias, kDownBlocks, kDownScales, kDownBias, kWeightCount
};

// RMSNorm of each row as models/gpt_oss.py's: in float32, x * rsqrt(mean(x^2) + eps), times the float32 scale,
// rounded to bf16 once. The sum of squares is taken in double, so it is the correctly rounded float32 sum.
at::Tensor rms_norm(const at::Tensor& x, const float* scale, float eps) {
  const int64_t M = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({M, H}, x.options());
  const BFloat16* in = x.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  for (int64_t r = 0; r < M; ++r) {
    double squares = 0.0;
    for (int64_t i = 0; i < H; ++i) {
      const float t = in[r * H + i];
      squares += static_cast<double>(t) * t;
    }
    const float mean = static_cast<float>(squares) / static_cast<float>(H);
    const float rstd = 1.0f / std::sqrt(mean + eps);
    for (int64_t i = 0; i < H; ++i) o[r * H + i] = round_bf16(scale[i] * (static_cast<float>(in[r * H + i]) * rstd));
  }
  return out;
}

// models/rotary.py's apply_rotary on one head's D values in place: (a*cos - b*sin, b*cos + a*sin) for its two
// halves a and b, each product, difference and sum rounded to bf16 as the bf16 tensor ops round them.
void rotate(BFloat16* head, const BFloat16* cos, const BFloat16* sin, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = head[j], b = head[half + j], c = cos[j], s = sin[j];
    const float first = round_bf16(a * c) - static_cast<float>(round_bf16(b * s));
    const float second = round_bf16(b * c) + static_cast<float>(round_bf16(a * s));
    head[j] = round_bf16(first);
    head[half + j] = round_bf16(second);
  }
}

template <typename T>
void write_kv(const BFloat16* qkv, int64_t M, int64_t row_width, int64_t key_offset, int64_t kv_width,
              const int64_t* slots, T* keys, T* values) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < kv_width; ++i) {
      keys[slots[r] * kv_width + i] = static_cast<T>(qkv[r * row_width + key_offset + i]);
      values[slots[r] * kv_width + i] = static_cast<T>(qkv[r * row_width + key_offset + kv_width + i]);
    }
}

// x + y for bf16 rows, in float32, rounded once (a bf16 tensor add).
at::Tensor add(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  const BFloat16 *a = x.data_ptr<BFloat16>(), *b = y.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  for (int64_t i = 0; i < x.numel(); ++i) o[i] = round_bf16(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  return out;
}

// Each token's k picks, as models/moe.py's MoE.forward makes them: the k largest router logits (top_k_experts:
// ties to the lower expert, NaN first), their softmax in float32 rounded to bf16, and the picks grouped by
// expert, tokens in order.
struct Routing {
  std::vector<int64_t> tokens;   // each pick's token, grouped by expert
  std::vector<float> weights;    // each pick's routing weight (a bf16 value)
  at::Tensor counts;             // int64 [E]: picks per expert
};

Routing route(const at::Tensor& logits, int64_t k) {
  const int64_t M = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "experts_per_token must lie in [1, number of experts]");
  const BFloat16* l = logits.data_ptr<BFloat16>();
  std::vector<std::vector<std::pair<int64_t, float>>> by_expert(E);  // (token, weight) of each expert's picks
  std::vector<int64_t> order(E);
  for (int64_t t = 0; t < M; ++t) {
    const BFloat16* row = l + t * E;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t a, int64_t b) {
      const float va = row[a], vb = row[b];
      if (std::isnan(va) != std::isnan(vb)) return std::isnan(va);
      return (!std::isnan(va) && va != vb) ? va > vb : a < b;
    });
    const float top = row[order[0]];
    std::vector<float> exps(k);
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += exps[j] = std::exp(static_cast<float>(row[order[j]]) - top);
    const float inverse = 1.0f / sum;
    for (int64_t j = 0; j < k; ++j) by_expert[order[j]].emplace_back(t, round_bf16(exps[j] * inverse));
  }
  Routing routing{{}, {}, at::empty({E}, logits.options().dtype(at::kLong))};
  int64_t* counts = routing.counts.data_ptr<int64_t>();
  for (int64_t e = 0; e < E; ++e) {
    counts[e] = static_cast<int64_t>(by_expert[e].size());
    for (const auto& [token, weight] : by_expert[e]) {
      routing.tokens.push_back(token);
      routing.weights.push_back(weight);
    }
  }
  return routing;
}

// models/moe.py's swiglu on [P, 2I] bf16 rows (gate at even columns) -> [P, I], rounded where the bf16 ops round:
// gate * sigmoid(gate * alpha) * (linear + 1), gate clamped above at the limit and linear to [-limit, limit].
at::Tensor swiglu(const at::Tensor& h, float alpha, float limit) {
  const int64_t P = h.size(0), I = h.size(1) / 2;
  at::Tensor out = at::empty({P, I}, h.options());
  const BFloat16* in = h.data_ptr<BFloat16>();
  BFloat16* o = out.data_ptr<BFloat16>();
  const float high = round_bf16(limit), low = round_bf16(-limit);  // clamp's bounds take the tensor's dtype
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < I; ++i) {
      float gate = in[p * 2 * I + 2 * i], linear = in[p * 2 * I + 2 * i + 1];
      gate = std::isnan(gate) ? gate : std::min(gate, high);
      linear = std::isnan(linear) ? linear : std::min(std::max(linear, low), high);
      const float scaled = round_bf16(gate * alpha);
      const float sigmoid = round_bf16(1.0f / (1.0f + std::exp(-scaled)));
      const float glu = round_bf16(gate * sigmoid);
      o[p * I + i] = round_bf16(glu * static_cast<float>(round_bf16(linear + 1.0f)));
    }
  return out;
}

void check_weights(at::TensorList w, int64_t H, int64_t num_heads) {
  TORCH_CHECK(w.size() == kWeightCount, "fifteen layer weights expected");
  for (size_t i = 0; i < w.size(); ++i) TORCH_CHECK(w[i].is_contiguous(), "layer weight ", i, " is not contiguous");
  for (int i : {kAttnNorm, kQkvBias, kOutBias, kSinks, kMlpNorm, kRouterBias, kGateUpBias, kDownBias})
    TORCH_CHECK(w[i].scalar_type() == at::kFloat, "layer weight ", i, " must be float32");
  TORCH_CHECK(w[kAttnNorm].numel() == H && w[kMlpNorm].numel() == H, "a norm's scale does not match x");
  TORCH_CHECK(w[kSinks].numel() == num_heads, "sinks: one per query head");
  TORCH_CHECK(w[kOutBias].numel() == H, "the output projection's bias does not match x");
  const int64_t E = w[kGateUpBlocks].size(0);
  TORCH_CHECK(w[kRouterBias].numel() == E && w[kDownBlocks].size(0) == E, "the router and the experts disagree");
  TORCH_CHECK(w[kDownBias].sizes() == at::IntArrayRef({E, H}), "down bias: float32 [E, H]");
}

at::Tensor gpt_oss_decode_layer(const at::Tensor& x, at::TensorList w, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& blocks,
                                const at::Tensor& context_lens, const at::Tensor& cos, const at::Tensor& sin,
                                int64_t block_size, int64_t window, int64_t num_heads, int64_t head_dim, double eps,
                                int64_t experts_per_token, double swiglu_alpha, double swiglu_limit) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && x.is_contiguous(), "x: contiguous bfloat16 [M,H]");
  const int64_t M = x.size(0), H = x.size(1), half = head_dim / 2;
  check_weights(w, H, num_heads);
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.size(2) == head_dim && num_heads % key_cache.size(1) == 0 &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == key_cache.scalar_type(),
              "key and value pools: [slots, KV heads, head_dim] of one dtype");
  const int64_t kv_width = key_cache.size(1) * head_dim, q_width = num_heads * head_dim;
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M, "slots: int64 [M]");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == M, "blocks: one table per row");
  TORCH_CHECK(cos.scalar_type() == at::kBFloat16 && sin.scalar_type() == at::kBFloat16 && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == at::IntArrayRef({M, half}) && sin.sizes() == cos.sizes(),
              "cos, sin: contiguous bfloat16 [M, head_dim / 2]");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < key_cache.size(0), "slot ", slot[r], " is outside the pool");

  // Attention: norm, QKV, rotary on the query and key heads, the KV write, attention in place, out projection.
  const at::Tensor normed = rms_norm(x, w[kAttnNorm].data_ptr<float>(), static_cast<float>(eps));
  at::Tensor qkv = gptserve::bf16_dot_linear(normed, w[kQkvPacked], w[kQkvBias], q_width + 2 * kv_width);
  const int64_t row_width = qkv.size(1);
  BFloat16* qkv_data = qkv.data_ptr<BFloat16>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t head = 0; head < (q_width + kv_width) / head_dim; ++head)
      rotate(qkv_data + r * row_width + head * head_dim, cos.data_ptr<BFloat16>() + r * half,
             sin.data_ptr<BFloat16>() + r * half, half);
  if (key_cache.scalar_type() == at::kFloat)
    write_kv(qkv_data, M, row_width, q_width, kv_width, slot, key_cache.data_ptr<float>(),
             value_cache.data_ptr<float>());
  else if (key_cache.scalar_type() == at::kBFloat16)
    write_kv(qkv_data, M, row_width, q_width, kv_width, slot, key_cache.data_ptr<BFloat16>(),
             value_cache.data_ptr<BFloat16>());
  else
    TORCH_CHECK(false, "a float32 or bfloat16 KV pool expected");
  std::vector<float> queries(M * q_width), attended(M * q_width);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < q_width; ++i) queries[r * q_width + i] = qkv_data[r * row_width + i];
  gptserve::paged_decode_attention_into(queries.data(), q_width, key_cache, value_cache, blocks, context_lens,
                                        num_heads, block_size, window,
                                        static_cast<float>(std::pow(static_cast<double>(head_dim), -0.5)),
                                        w[kSinks].data_ptr<float>(), attended.data());
  at::Tensor heads = at::empty({M, q_width}, x.options());
  BFloat16* heads_data = heads.data_ptr<BFloat16>();
  for (int64_t i = 0; i < M * q_width; ++i) heads_data[i] = round_bf16(attended[i]);
  const at::Tensor h = add(x, gptserve::bf16_dot_linear(heads, w[kOutPacked], w[kOutBias], H));

  // MoE: norm, router, each token's k picks grouped by expert, the experts' two products around SwiGLU, and
  // each pick's output weighted (rounded) and summed into its token's row in float32 in pick order, rounded
  // once (as index_add_ sums bf16 rows).
  const at::Tensor normed_h = rms_norm(h, w[kMlpNorm].data_ptr<float>(), static_cast<float>(eps));
  const int64_t E = w[kGateUpBlocks].size(0);
  const Routing routing = route(gptserve::bf16_dot_linear(normed_h, w[kRouterPacked], w[kRouterBias], E),
                                experts_per_token);
  const int64_t P = static_cast<int64_t>(routing.tokens.size());
  at::Tensor picked = at::empty({P, H}, x.options());
  for (int64_t p = 0; p < P; ++p)
    std::copy_n(normed_h.data_ptr<BFloat16>() + routing.tokens[p] * H, H, picked.data_ptr<BFloat16>() + p * H);
  const at::Tensor up = gptserve::mxfp4_grouped_linear_bf16(picked, routing.counts, w[kGateUpBlocks],
                                                            w[kGateUpScales], w[kGateUpBias]);
  const at::Tensor down = gptserve::mxfp4_grouped_linear_bf16(
      swiglu(up, static_cast<float>(swiglu_alpha), static_cast<float>(swiglu_limit)), routing.counts,
      w[kDownBlocks], w[kDownScales], w[kDownBias]);
  std::vector<float> sums(M * H, 0.0f);
  const BFloat16* down_data = down.data_ptr<BFloat16>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < H; ++i)
      sums[routing.tokens[p] * H + i] += round_bf16(static_cast<float>(down_data[p * H + i]) * routing.weights[p]);
  at::Tensor moe = at::empty({M, H}, x.options());
  BFloat16* moe_data = moe.data_ptr<BFloat16>();
  for (int64_t i = 0; i < M * H; ++i) moe_data[i] = round_bf16(sums[i]);
  return add(h, moe);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("gpt_oss_decode_layer(Tensor x, Tensor[] weights, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slots, Tensor blocks, Tensor context_lens, Tensor cos, Tensor sin, int block_size, int window, "
        "int num_heads, int head_dim, float eps, int experts_per_token, float swiglu_alpha, float swiglu_limit) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) { m.impl("gpt_oss_decode_layer", gpt_oss_decode_layer); }
