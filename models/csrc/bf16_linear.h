// The bf16 weight kernel (bf16_linear.cpp), callable from the other kernels without a trip through the
// dispatcher: x [M,K] float32 times the packed bf16 weight, plus bias, -> [M,N] float32, on the widest path
// this CPU runs.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace gptserve {

at::Tensor bf16_linear_best(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                            int64_t N);

}  // namespace gptserve
