// A whole GPT-2 block for the few rows of a decode step, in one call, on weights streamed as bf16, in either of
// the two modes whose linears stream them through this project's kernels:
//   float32 activations on bf16 weights (``--cpu-weight-dtype bfloat16``): bf16_linear, fp32 arithmetic;
//   bf16 activations (``--dtype bfloat16`` on a CPU with AVX512-BF16 and no AMX): bf16_dot_linear.
//   gpt2_decode_block(h [M,E], weights, key_cache, value_cache, slots [M], blocks [M,B], context_lens [M],
//                     block_size, num_heads, eps) -> h' [M,E]
// with weights = [ln_1 weight, ln_1 bias, c_attn packed, c_attn bias, attn.c_proj packed, its bias,
//                 ln_2 weight, ln_2 bias, c_fc packed, c_fc bias, mlp.c_proj packed, its bias]
// (packed: models/bf16_weight_linear.py's layout; LayerNorm parameters in h's dtype, linear biases in float32).
// Row i is the one new token of sequence i; its key and value go to cache slot slots[i] (rounded to the pool's
// dtype as torch rounds), then it attends over its sequence's keys in place (paged_decode_attention.h).
// The block is the torch modules' arithmetic op for op (the same LayerNorm, GELU and adds, called here through
// ATen, and the same kernels' products), so its output is theirs bit for bit; what the call saves is the
// twenty-odd torch ops between the four matrix products, each a dispatch, an allocation and, from Python, an
// interpreter round trip, which cost a batch-1 step a quarter of its time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "bf16_dot_linear.h"
#include "bf16_linear.h"
#include "paged_decode_attention.h"

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// The block's linears in the activations' dtype, as the modules run them (models/bf16_weight_linear.py,
// models/bf16_dot_linear.py).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& bias) {
  if (x.scalar_type() == at::kBFloat16) return gptserve::bf16_dot_linear(x, packed, bias, bias.numel());
  return gptserve::bf16_linear_best(x, packed, bias, bias.numel());
}

// Row i's key and value, the middle and last thirds of its fused QKV row, into pool slot slots[i].
template <typename T, typename Pool>
void write_kv(const T* qkv, int64_t M, int64_t E, const int64_t* slots, Pool* keys, Pool* values) {
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < E; ++i) {  // c10::BFloat16 rounds to nearest even, as a tensor's .to() does
      keys[slots[r] * E + i] = static_cast<Pool>(static_cast<float>(qkv[r * 3 * E + E + i]));
      values[slots[r] * E + i] = static_cast<Pool>(static_cast<float>(qkv[r * 3 * E + 2 * E + i]));
    }
}

// Each row's queries as float32 for the attention kernel: the first third of its QKV row (models/attention.py
// widens a bf16 query with .float(); float32 rows are read in place).
template <typename T>
const float* float_queries(const at::Tensor& qkv, int64_t E, std::vector<float>& widened) {
  if constexpr (std::is_same_v<T, float>) return qkv.data_ptr<float>();
  const int64_t M = qkv.size(0);
  widened.resize(M * E);
  const T* data = qkv.data_ptr<T>();
  for (int64_t r = 0; r < M; ++r)
    for (int64_t i = 0; i < E; ++i) widened[r * E + i] = static_cast<float>(data[r * 3 * E + i]);
  return widened.data();
}

template <typename T>
at::Tensor decode_block(const at::Tensor& h, at::TensorList w, const at::Tensor& key_cache,
                        const at::Tensor& value_cache, const int64_t* slot, const at::Tensor& blocks,
                        const at::Tensor& context_lens, int64_t block_size, int64_t num_heads, double eps) {
  const int64_t M = h.size(0), E = h.size(1);
  at::Tensor qkv = linear(at::layer_norm(h, {E}, w[0], w[1], eps), w[2], w[3]);
  const T* qkv_data = qkv.data_ptr<T>();
  if (key_cache.scalar_type() == at::kBFloat16)
    write_kv(qkv_data, M, E, slot, key_cache.data_ptr<at::BFloat16>(), value_cache.data_ptr<at::BFloat16>());
  else
    write_kv(qkv_data, M, E, slot, key_cache.data_ptr<float>(), value_cache.data_ptr<float>());
  std::vector<float> widened;
  const float* queries = float_queries<T>(qkv, E, widened);
  at::Tensor attended = at::empty({M, E}, h.options().dtype(at::kFloat));
  const float scale = 1.0f / std::sqrt(static_cast<float>(E / num_heads));
  gptserve::paged_decode_attention_into(queries, std::is_same_v<T, float> ? 3 * E : E, key_cache, value_cache,
                                        blocks, context_lens, num_heads, block_size, 0, scale, nullptr,
                                        attended.data_ptr<float>());
  at::Tensor mid = linear(attended.to(h.scalar_type()), w[4], w[5]);
  mid.add_(h);
  at::Tensor inner = linear(at::layer_norm(mid, {E}, w[6], w[7], eps), w[8], w[9]);
  at::gelu_(inner, "tanh");  // ATen's vectorized GELU, as the modules run it: a scalar tanh took ~80 us a layer
  at::Tensor out = linear(inner, w[10], w[11]);
  out.add_(mid);
  return out;
}

at::Tensor gpt2_decode_block(const at::Tensor& h, at::TensorList weights, const at::Tensor& key_cache,
                             const at::Tensor& value_cache, const at::Tensor& slots, const at::Tensor& blocks,
                             const at::Tensor& context_lens, int64_t block_size, int64_t num_heads, double eps) {
  TORCH_CHECK((h.scalar_type() == at::kFloat || h.scalar_type() == at::kBFloat16) && h.dim() == 2 &&
                  h.is_contiguous(),
              "h: contiguous float32 or bfloat16 [M,E]");
  TORCH_CHECK(weights.size() == 12, "twelve block weights expected");
  constexpr bool kPacked[12] = {false, false, true, false, true, false, false, false, true, false, true, false};
  constexpr bool kNorm[12] = {true, true, false, false, false, false, true, true, false, false, false, false};
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::ScalarType expected = kPacked[i] ? at::kShort : kNorm[i] ? h.scalar_type() : at::kFloat;
    TORCH_CHECK(weights[i].is_contiguous() && weights[i].scalar_type() == expected,
                "block weight ", i, " has the wrong dtype or layout");
  }
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
  if (h.scalar_type() == at::kBFloat16)
    return decode_block<at::BFloat16>(h, weights, key_cache, value_cache, slot, blocks, context_lens, block_size,
                                      num_heads, eps);
  return decode_block<float>(h, weights, key_cache, value_cache, slot, blocks, context_lens, block_size, num_heads,
                             eps);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gptserve, m) {
  m.def("gpt2_decode_block(Tensor h, Tensor[] weights, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots, "
        "Tensor blocks, Tensor context_lens, int block_size, int num_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(gptserve, CPU, m) {
  m.impl("gpt2_decode_block", gpt2_decode_block);
}
