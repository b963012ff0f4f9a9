// A whole GPT-2 block for the few rows of a decode step, in one call, on weights streamed as bf16:
//   gpt2_decode_block(h [M,E] float32, weights, key_cache, value_cache, slots [M], blocks [M,B], context_lens [M],
//                     block_size, num_heads, eps) -> h' [M,E]
// with weights = [ln_1 weight, ln_1 bias, c_attn packed, c_attn bias, attn.c_proj packed, its bias,
//                 ln_2 weight, ln_2 bias, c_fc packed, c_fc bias, mlp.c_proj packed, its bias]
// (packed: models/bf16_weight_linear.py's layout, read by the bf16_linear kernel). Row i is the one new token of
// sequence i; its key and value go to cache slot slots[i] (rounded to the pool's dtype as torch rounds), then it
// attends over its sequence's keys in place (paged_decode_attention.h).
// The block is the same arithmetic as the torch modules' (fp32 throughout, weights' bf16 values exact); what
// the call saves is the twenty-odd torch ops between the four matrix products, each a dispatch, an allocation
// and, from Python, an interpreter round trip, which cost a batch-1 step a quarter of its time.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16_linear.h"
#include "paged_decode_attention.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias) {
  return gptserve::bf16_linear_best(x, packed, bias, bias.numel());
}

// LayerNorm of each row: mean and variance in fp32 over the row, then (x - mean) / sqrt(var + eps) * w + b.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, float eps) {
  const int64_t M = x.size(0), E = x.size(1);
  at::Tensor out = at::empty({M, E}, x.options());
  const float *in = x.data_ptr<float>(), *w = weight.data_ptr<float>(), *b = bias.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < M; ++r) {
    const float* row = in + r * E;
    float sum = 0.0f;
    for (int64_t i = 0; i < E; ++i) sum += row[i];
    const float mean = sum / static_cast<float>(E);
    float squares = 0.0f;
    for (int64_t i = 0; i < E; ++i) squares += (row[i] - mean) * (row[i] - mean);
    const float rstd = 1.0f / std::sqrt(squares / static_cast<float>(E) + eps);
    for (int64_t i = 0; i < E; ++i) o[r * E + i] = (row[i] - mean) * rstd * w[i] + b[i];
  }
  return out;
}

void add_(at::Tensor& x, const at::Tensor& residual) {
  float* p = x.data_ptr<float>();
  const float* r = residual.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) p[i] += r[i];
}

// Row i's key and value, the middle and last thirds of its fused QKV row, into pool slot slots[i].
template <typename T>
void write_kv(const float* qkv, int64_t M, int64_t E, const int64_t* slots, T* keys, T* values) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < E; ++i) {
      keys[slots[r] * E + i] = static_cast<T>(qkv[r * 3 * E + E + i]);  // c10::BFloat16 rounds to nearest even
      values[slots[r] * E + i] = static_cast<T>(qkv[r * 3 * E + 2 * E + i]);
    }
}

at::Tensor gpt2_decode_block(const at::Tensor& h, at::TensorList weights, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& blocks,
                             const at::Tensor& context_lens, int64_t block_size, int64_t num_heads, double eps) {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && h.is_contiguous(), "h: contiguous float32 [M,E]");
  TORCH_CHECK(weights.size() == 12, "twelve block weights expected");
  constexpr bool kPacked[12] = {false, false, true, false, true, false, false, false, true, false, true, false};
  for (size_t i = 0; i < weights.size(); ++i)
    TORCH_CHECK(weights[i].is_contiguous() && weights[i].scalar_type() == (kPacked[i] ? at::kShort : at::kFloat),
                "block weight ", i, " has the wrong dtype or layout");
  const int64_t M = h.size(0), E = h.size(1);
  for (size_t i : {0, 1, 6, 7}) TORCH_CHECK(weights[i].numel() == E, "a LayerNorm weight does not match h");
  TORCH_CHECK(E % num_heads == 0 && key_cache.dim() == 3 && key_cache.size(1) * key_cache.size(2) == E &&
                  key_cache.size(1) == num_heads && value_cache.sizes() == key_cache.sizes() &&
                  value_cache.scalar_type() == key_cache.scalar_type() && key_cache.is_contiguous() &&
                  value_cache.is_contiguous(),
              "the KV pool does not match the block");
  TORCH_CHECK(key_cache.scalar_type() == at::kFloat || key_cache.scalar_type() == at::kBFloat16,
              "a float32 or bfloat16 KV pool expected");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == M, "slots: int64 [M]");
  TORCH_CHECK(blocks.dim() == 2 && blocks.size(0) == M, "one decode token per sequence expected");
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r)
    TORCH_CHECK(slot[r] >= 0 && slot[r] < key_cache.size(0), "a slot is outside the pool");
  const float epsilon = static_cast<float>(eps);

  at::Tensor qkv = bf16_linear(layer_norm(h, weights[0], weights[1], epsilon), weights[2], weights[3]);
  if (key_cache.scalar_type() == at::kBFloat16)
    write_kv(qkv.data_ptr<float>(), M, E, slot, key_cache.data_ptr<at::BFloat16>(),
             value_cache.data_ptr<at::BFloat16>());
  else
    write_kv(qkv.data_ptr<float>(), M, E, slot, key_cache.data_ptr<float>(), value_cache.data_ptr<float>());
  at::Tensor attended = at::empty({M, E}, h.options());
  const float scale = 1.0f / std::sqrt(static_cast<float>(E / num_heads));
  gptserve::paged_decode_attention_into(qkv.data_ptr<float>(), 3 * E, key_cache, value_cache, blocks, context_lens,
                                        num_heads, block_size, 0, scale, nullptr, attended.data_ptr<float>());
  at::Tensor mid = bf16_linear(attended, weights[4], weights[5]);
  add_(mid, h);
  at::Tensor inner = bf16_linear(layer_norm(mid, weights[6], weights[7], epsilon), weights[8], weights[9]);
  at::gelu_(inner, "tanh");  // ATen's vectorized GELU, as the modules run it: a scalar tanh took ~80 us a layer
  at::Tensor out = bf16_linear(inner, weights[10], weights[11]);
  add_(out, mid);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("gpt2_decode_block(Tensor h, Tensor[] weights, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots, "
        "Tensor blocks, Tensor context_lens, int block_size, int num_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("gpt2_decode_block", gpt2_decode_block);
}
