// Input validation shared by the CPU and CUDA entry points of ms_deform_attn (defined in
// ms_deform_attn_cpu.cpp, which is compiled in every build).
#pragma once

#include <ATen/ATen.h>

namespace cropformer {
namespace msda {

struct Sizes {
  int64_t B, S, H, D, Q, L, P;
};

// Checks ranks, sizes, dtypes, devices and contiguity, and for CPU tensors that spatial_shapes (L x 2
// int64, h and w >= 1) sums to S with level_start_index its exclusive prefix sum, so no kernel can read
// out of bounds. CUDA level integers stay on the device (no sync): the CUDA kernels skip any level that
// does not lie inside value. Raises c10::Error with a plain message on the first violation.
Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   c10::DeviceType device_type);

// grad_output must be B x Q x (H * D), contiguous, with value's dtype and device.
void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Sizes& s);

}  // namespace msda
}  // namespace cropformer
