// A whole GPT-OSS layer for the few rows of a decode step with packed MXFP4 experts on CPU, in one call, in
// either of the two modes whose linears stream bf16 weights through this project's kernels:
//   bf16 activations (``--dtype bfloat16`` on a CPU with AVX512-BF16 and no AMX): bf16_dot_linear and
//     mxfp4_grouped_linear_bf16;
//   float32 activations on bf16 weights (``--cpu-weight-dtype bfloat16``): bf16_linear and mxfp4_grouped_linear.
//   gpt_oss_decode_layer(x [M,H], weights, key_cache, value_cache, slots [M], blocks [M,B], context_lens [M],
//                        cos [M,D/2], sin [M,D/2], block_size, window, num_heads, head_dim, eps,
//                        experts_per_token, swiglu_alpha, swiglu_limit) -> x' [M,H]
// x, cos and sin in the activations' dtype; weights = [attn_norm weight, qkv packed, qkv bias, out packed, out
// bias, sinks, mlp_norm weight, router packed, router bias, gate_up blocks, gate_up scales, gate_up bias, down
// blocks, down scales, down bias]: norms, biases and sinks in float32, packed linears in
// models/bf16_weight_linear.py's layout, experts as MXFP4 blocks and scales. Row i is the one new token of
// sequence i; its key and value go to pool slot slots[i], then it attends over its sequence's keys in place
// (paged_decode_attention.h; window 0: all of them).
//
// The arithmetic is the torch modules' of models/gpt_oss.py and models/moe.py, op for op: with bf16
// activations every op a bf16 tensor op would round is rounded to bf16 here at the same point (c10::BFloat16
// rounds to nearest even, as torch does), norms and the routing softmax are taken in float32, and the matrix
// products are the same kernels' calls. What the call saves is the ~150 small torch ops of a layer between the
// five products (norms, rotary, the KV write, routing, grouping, SwiGLU, the weighted sum), each a dispatch, an
// allocation and an interpreter round trip: ~1.1 ms a layer at one token on two Xeon cores (bench/NOTES.md,
// session 18).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16_dot_linear.h"
#include "bf16_linear.h"
#include "mxfp4_bf16_linear.h"
#include "mxfp4_linear.h"
#include "paged_decode_attention.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace {

using c10::BFloat16;

// A value as the activations' dtype holds it: rounded to nearest even for bf16, unchanged for float32.
template <typename T>
inline float held(float value) {
  return static_cast<float>(static_cast<T>(value));
}

enum Weight {
  kAttnNorm, kQkvPacked, kQkvBias, kOutPacked, kOutBias, kSinks, kMlpNorm, kRouterPacked, kRouterBias,
  kGateUpBlocks, kGateUpScales, kGateUpBias, kDownBlocks, kDownScales, kDownBias, kWeightCount
};

// The layer's linears and experts in the activations' dtype, as the modules run them (models/bf16_dot_linear.py,
// models/bf16_weight_linear.py, models/mxfp4.py's grouped_kernel).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias, int64_t N) {
  if (x.scalar_type() == at::kBFloat16) return gptserve::bf16_dot_linear(x, packed, bias, N);
  return gptserve::bf16_linear_best(x, packed, bias, N);
}

at::Tensor experts(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& blocks, const at::Tensor& scales,
                   const at::Tensor& bias) {
  if (x.scalar_type() == at::kBFloat16) return gptserve::mxfp4_grouped_linear_bf16(x, counts, blocks, scales, bias);
  return gptserve::mxfp4_grouped_linear(x, counts, blocks, scales, bias, "best");
}

// RMSNorm of each row as models/gpt_oss.py's: in float32, x * rsqrt(mean(x^2) + eps), times the float32 scale,
// then held as T. The sum of squares is taken in double, so it is the correctly rounded float32 sum.
template <typename T>
at::Tensor rms_norm(const at::Tensor& x, const float* scale, float eps) {
  const int64_t M = x.size(0), H = x.size(1);
  at::Tensor out = at::empty({M, H}, x.options());
  const T* in = x.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t r = 0; r < M; ++r) {
    double squares = 0.0;
    for (int64_t i = 0; i < H; ++i) {
      const float t = in[r * H + i];
      squares += static_cast<double>(t) * t;
    }
    const float mean = static_cast<float>(squares) / static_cast<float>(H);
    const float rstd = 1.0f / std::sqrt(mean + eps);
    for (int64_t i = 0; i < H; ++i) o[r * H + i] = static_cast<T>(scale[i] * (static_cast<float>(in[r * H + i]) * rstd));
  }
  return out;
}

// models/rotary.py's apply_rotary on one head's D values in place: (a*cos - b*sin, b*cos + a*sin) for its two
// halves a and b, each product, difference and sum held as T as the tensor ops hold them.
template <typename T>
void rotate(T* head, const T* cos, const T* sin, int64_t half) {
  for (int64_t j = 0; j < half; ++j) {
    const float a = head[j], b = head[half + j], c = cos[j], s = sin[j];
    head[j] = static_cast<T>(held<T>(a * c) - held<T>(b * s));
    head[half + j] = static_cast<T>(held<T>(b * c) + held<T>(a * s));
  }
}

template <typename T, typename Pool>
void write_kv(const T* qkv, int64_t M, int64_t row_width, int64_t key_offset, int64_t kv_width, const int64_t* slots,
              Pool* keys, Pool* values) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < kv_width; ++i) {
      keys[slots[r] * kv_width + i] = static_cast<Pool>(static_cast<float>(qkv[r * row_width + key_offset + i]));
      values[slots[r] * kv_width + i] =
          static_cast<Pool>(static_cast<float>(qkv[r * row_width + key_offset + kv_width + i]));
    }
}

// x + y, in float32, held as T (a tensor add).
template <typename T>
at::Tensor add(const at::Tensor& x, const at::Tensor& y) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  const T *a = x.data_ptr<T>(), *b = y.data_ptr<T>();
  T* o = out.data_ptr<T>();
  for (int64_t i = 0; i < x.numel(); ++i) o[i] = static_cast<T>(static_cast<float>(a[i]) + static_cast<float>(b[i]));
  return out;
}

// Each token's k picks, as models/moe.py's MoE.forward makes them: the k largest router logits (top_k_experts:
// ties to the lower expert, NaN first), their softmax in float32 held as T, and the picks grouped by expert,
// tokens in order.
struct Routing {
  std::vector<int64_t> tokens;  // each pick's token, grouped by expert
  std::vector<float> weights;   // each pick's routing weight
  at::Tensor counts;            // int64 [E]: picks per expert
};

template <typename T>
Routing route(const at::Tensor& logits, int64_t k) {
  const int64_t M = logits.size(0), E = logits.size(1);
  TORCH_CHECK(k >= 1 && k <= E, "experts_per_token must lie in [1, number of experts]");
  const T* l = logits.data_ptr<T>();
  std::vector<std::vector<std::pair<int64_t, float>>> by_expert(E);  // (token, weight) of each expert's picks
  std::vector<int64_t> order(E);
  std::vector<float> exps(k);
  for (int64_t t = 0; t < M; ++t) {
    const T* row = l + t * E;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [row](int64_t a, int64_t b) {
      const float va = row[a], vb = row[b];
      if (std::isnan(va) != std::isnan(vb)) return std::isnan(va);
      return (!std::isnan(va) && va != vb) ? va > vb : a < b;
    });
    const float top = row[order[0]];
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j) sum += exps[j] = std::exp(static_cast<float>(row[order[j]]) - top);
    const float inverse = 1.0f / sum;
    for (int64_t j = 0; j < k; ++j) by_expert[order[j]].emplace_back(t, held<T>(exps[j] * inverse));
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

// models/moe.py's swiglu on [P, 2I] rows (gate at even columns) -> [P, I], held as T where the tensor ops hold
// their results: gate * sigmoid(gate * alpha) * (linear + 1), gate clamped above at the limit and linear to
// [-limit, limit].
template <typename T>
at::Tensor swiglu(const at::Tensor& h, float alpha, float limit) {
  const int64_t P = h.size(0), I = h.size(1) / 2;
  at::Tensor out = at::empty({P, I}, h.options());
  const T* in = h.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const float high = held<T>(limit), low = held<T>(-limit);  // clamp's bounds take the tensor's dtype
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < I; ++i) {
      float gate = in[p * 2 * I + 2 * i], linear = in[p * 2 * I + 2 * i + 1];
      gate = std::isnan(gate) ? gate : std::min(gate, high);
      linear = std::isnan(linear) ? linear : std::min(std::max(linear, low), high);
      const float sigmoid = held<T>(1.0f / (1.0f + std::exp(-held<T>(gate * alpha))));
      o[p * I + i] = static_cast<T>(held<T>(gate * sigmoid) * held<T>(linear + 1.0f));
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

struct Step {
  const at::Tensor &key_cache, &value_cache, &slots, &blocks, &context_lens, &cos, &sin;
  int64_t block_size, window, num_heads, head_dim, experts_per_token;
  float eps, alpha, limit;
};

template <typename T>
at::Tensor decode_layer(const at::Tensor& x, at::TensorList w, const Step& step) {
  const int64_t M = x.size(0), H = x.size(1), D = step.head_dim, half = D / 2;
  const int64_t kv_width = step.key_cache.size(1) * D, q_width = step.num_heads * D;

  // Attention: norm, QKV, rotary on the query and key heads, the KV write, attention in place, out projection.
  at::Tensor qkv = linear(rms_norm<T>(x, w[kAttnNorm].data_ptr<float>(), step.eps), w[kQkvPacked], w[kQkvBias],
                          q_width + 2 * kv_width);
  const int64_t row_width = qkv.size(1);
  T* qkv_data = qkv.data_ptr<T>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t head = 0; head < (q_width + kv_width) / D; ++head)
      rotate(qkv_data + r * row_width + head * D, step.cos.data_ptr<T>() + r * half, step.sin.data_ptr<T>() + r * half,
             half);
  const int64_t* slot = step.slots.data_ptr<int64_t>();
  if (step.key_cache.scalar_type() == at::kFloat)
    write_kv(qkv_data, M, row_width, q_width, kv_width, slot, step.key_cache.data_ptr<float>(),
             step.value_cache.data_ptr<float>());
  else
    write_kv(qkv_data, M, row_width, q_width, kv_width, slot, step.key_cache.data_ptr<BFloat16>(),
             step.value_cache.data_ptr<BFloat16>());
  std::vector<float> queries(M * q_width), attended(M * q_width);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < q_width; ++i) queries[r * q_width + i] = qkv_data[r * row_width + i];
  gptserve::paged_decode_attention_into(queries.data(), q_width, step.key_cache, step.value_cache, step.blocks,
                                        step.context_lens, step.num_heads, step.block_size, step.window,
                                        static_cast<float>(std::pow(static_cast<double>(D), -0.5)),
                                        w[kSinks].data_ptr<float>(), attended.data());
  at::Tensor heads = at::empty({M, q_width}, x.options());
  std::transform(attended.begin(), attended.end(), heads.data_ptr<T>(), [](float v) { return static_cast<T>(v); });
  const at::Tensor h = add<T>(x, linear(heads, w[kOutPacked], w[kOutBias], H));

  // MoE: norm, router, each token's k picks grouped by expert, the experts' two products around SwiGLU, and
  // each pick's output weighted (held as T) and summed into its token's row in float32 in pick order, then held
  // as T (as index_add_ sums the rows).
  const at::Tensor normed = rms_norm<T>(h, w[kMlpNorm].data_ptr<float>(), step.eps);
  const int64_t E = w[kGateUpBlocks].size(0);
  const Routing routing = route<T>(linear(normed, w[kRouterPacked], w[kRouterBias], E), step.experts_per_token);
  const int64_t P = static_cast<int64_t>(routing.tokens.size());
  at::Tensor picked = at::empty({P, H}, x.options());
  for (int64_t p = 0; p < P; ++p)
    std::copy_n(normed.data_ptr<T>() + routing.tokens[p] * H, H, picked.data_ptr<T>() + p * H);
  const at::Tensor up = experts(picked, routing.counts, w[kGateUpBlocks], w[kGateUpScales], w[kGateUpBias]);
  const at::Tensor down = experts(swiglu<T>(up, step.alpha, step.limit), routing.counts, w[kDownBlocks],
                                  w[kDownScales], w[kDownBias]);
  std::vector<float> sums(M * H, 0.0f);
  const T* down_data = down.data_ptr<T>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t i = 0; i < H; ++i)
      sums[routing.tokens[p] * H + i] += held<T>(static_cast<float>(down_data[p * H + i]) * routing.weights[p]);
  at::Tensor moe = at::empty({M, H}, x.options());
  std::transform(sums.begin(), sums.end(), moe.data_ptr<T>(), [](float v) { return static_cast<T>(v); });
  return add<T>(h, moe);
}

at::Tensor gpt_oss_decode_layer(const at::Tensor& x, at::TensorList w, const at::Tensor& key_cache,
                                const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& blocks,
                                const at::Tensor& context_lens, const at::Tensor& cos, const at::Tensor& sin,
                                int64_t block_size, int64_t window, int64_t num_heads, int64_t head_dim, double eps,
                                int64_t experts_per_token, double swiglu_alpha, double swiglu_limit) {
  TORCH_CHECK((x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat) && x.dim() == 2 &&
                  x.is_contiguous(),
              "x: contiguous bfloat16 or float32 [M,H]");
  const int64_t M = x.size(0), H = x.size(1);
  check_weights(w, H, num_heads);
  TORCH_CHECK(key_cache.dim() == 3 && key_cache.size(2) == head_dim && num_heads % key_cache.size(1) == 0 &&
                  value_cache.sizes() == key_cache.sizes() && value_cache.scalar_type() == key_cache.scalar_type() &&
                  (key_cache.scalar_type() == at::kFloat || key_cache.scalar_type() == at::kBFloat16),
              "key and value pools: float32 or bfloat16 [slots, KV heads, head_dim] of one dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M, "slots: int64 [M]");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == M, "blocks: one table per row");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.sizes() == at::IntArrayRef({M, head_dim / 2}) &&
                  sin.sizes() == cos.sizes(),
              "cos, sin: contiguous [M, head_dim / 2] in x's dtype");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < key_cache.size(0), "slot ", slot[r], " is outside the pool");
  const Step step{key_cache, value_cache, slots, blocks, context_lens, cos, sin, block_size, window, num_heads,
                  head_dim, experts_per_token, static_cast<float>(eps), static_cast<float>(swiglu_alpha),
                  static_cast<float>(swiglu_limit)};
  return x.scalar_type() == at::kBFloat16 ? decode_layer<BFloat16>(x, w, step) : decode_layer<float>(x, w, step);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("gpt_oss_decode_layer(Tensor x, Tensor[] weights, Tensor(a!) key_cache, Tensor(b!) value_cache, "
        "Tensor slots, Tensor blocks, Tensor context_lens, Tensor cos, Tensor sin, int block_size, int window, "
        "int num_heads, int head_dim, float eps, int experts_per_token, float swiglu_alpha, float swiglu_limit) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) { m.impl("gpt_oss_decode_layer", gpt_oss_decode_layer); }
