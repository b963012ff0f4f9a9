// The MXFP4 experts' kernel for bf16 tokens (mxfp4_bf16_linear.cpp), callable from the other kernels without a
// trip through the dispatcher: x [N,I] bfloat16 grouped by expert (counts [E] int64) -> [N,O] bfloat16.
#pragma once

#include <ATen/core/Tensor.h>

namespace gptserve {

at::Tensor mxfp4_grouped_linear_bf16(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& blocks,
                                     const at::Tensor& scales, const c10::optional<at::Tensor>& bias);

}  // namespace gptserve
