// The vdpbf16ps linear layer (bf16_dot_linear.cpp), callable from the other kernels without a trip through the
// dispatcher: x [M,K] bfloat16 times the packed bf16 weight, plus a float32 bias, -> [M,N] bfloat16.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace gptserve {

at::Tensor bf16_dot_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                           int64_t N);

}  // namespace gptserve
