// The vdpbf16ps linear layer (bf16_dot_linear.cpp), callable from the other kernels without a trip through the
// dispatcher: x [M,K] bfloat16 times the packed bf16 weight, plus a float32 bias, -> [M,N] bfloat16.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace gptserve {

at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                           int64_t N);

// The same product for a weight stored in another format: fill(g, tile) writes group g's packed weights (its
// ceil(K/2) x 32 pairs, bf16_dot_linear's layout, lanes past N zero) into a scratch tile just before the group
// is read, so the weight is decoded one group at a time, in cache, and never held whole.
at::Tensor bf16_dot_linear_filled(const at::Tensor& x, int64_t N, c10::function_ref<void(int64_t, uint16_t*)> fill,
                                  const c10::optional<at::Tensor>& bias);

}  // namespace gptserve
