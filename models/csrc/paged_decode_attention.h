// Decode attention read in place from the paged KV pool (paged_decode_attention.cpp), callable from the other
// kernels without a trip through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include "cpu_features.h"

#include <cstdint>

namespace gptserve {

// One query per sequence: q rows [S] of H*D floats, q_row_stride floats apart (a slice of a fused QKV row is
// fine); out [S, H, D] contiguous float32. blocks [S, B] and context_lens [S] are int64 tensors, checked
// against the pool here; sinks is null or [H] float32 logits that join each head's softmax. isa: the widest
// path this CPU runs by default (see the .cpp's header).
void paged_decode_attention_into(const float* q, int64_t q_row_stride, const at::Tensor& keys,
                                 const at::Tensor& values, const at::Tensor& blocks, const at::Tensor& context_lens,
                                 int64_t num_heads, int64_t block_size, int64_t window, float scale,
                                 const float* sinks, float* out, Isa isa = choose_isa("best"));

}  // namespace gptserve
