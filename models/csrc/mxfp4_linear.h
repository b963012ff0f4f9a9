// The MXFP4 experts' float32 kernel (mxfp4_linear.cpp), callable from the other kernels without a trip through
// the dispatcher: x [N,I] float32 grouped by expert (counts [E] int64) -> [N,O] float32.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace gptserve {

at::Tensor mxfp4_grouped_linear(const at::Tensor& x, const at::Tensor& counts, const at::Tensor& blocks,
                                const at::Tensor& scales, const c10::optional<at::Tensor>& bias,
                                const std::string& isa_name);

}  // namespace gptserve
