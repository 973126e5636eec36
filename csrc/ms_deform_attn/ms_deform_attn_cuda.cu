// Multi-scale deformable attention, CUDA kernels (forward and backward).
//
// One warp per output row r = (b, q, h), lanes over channels (D > 32 loops in steps of 32), so the
// location / weight loads are warp-uniform broadcasts and the per-sample channel reductions of the
// backward are warp shuffles. Inputs may be fp32, fp16, bf16 or fp64; arithmetic is in fp32 (fp64 for
// fp64). grad_value is accumulated with atomic adds into an fp32 (fp64) buffer and cast at the end.
// The bilinear math is ms_deform_attn.h, shared with the CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ms_deform_attn.h"
#include "ms_deform_attn_checks.h"

namespace cropformer {
namespace msda {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;

struct Dims {
  int64_t rows;  // B * Q * H
  int64_t QH;    // Q * H
  int64_t S, H, D, L, P;
};

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Level l lies inside value: start >= 0, h, w >= 1 and start + h * w <= S (sides bounded by S first, so
// the product cannot overflow).
__device__ __forceinline__ bool level_inside(int64_t start, int64_t h, int64_t w, int64_t S) {
  return start >= 0 && h >= 1 && w >= 1 && h <= S && w <= S && start + h * w <= S;
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const scalar_t* __restrict__ loc,
                   const scalar_t* __restrict__ attn, scalar_t* __restrict__ out, Dims n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= n.rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t b = r / n.QH;
  const int64_t h = r % n.H;
  const int64_t HD = n.H * n.D;
  const int64_t LP = n.L * n.P;
  const scalar_t* loc_r = loc + r * LP * 2;
  const scalar_t* attn_r = attn + r * LP;
  for (int64_t d0 = 0; d0 < n.D; d0 += kWarp) {
    const int64_t d = d0 + lane;
    const bool active = d < n.D;
    acc_t acc = acc_t(0);
    for (int64_t l = 0; l < n.L; ++l) {
      if (!level_inside(starts[l], shapes[2 * l], shapes[2 * l + 1], n.S)) continue;
      const int hl = static_cast<int>(shapes[2 * l]);
      const int wl = static_cast<int>(shapes[2 * l + 1]);
      // value[b, starts[l] + i, h, d] is at v_level[i * HD]
      const scalar_t* v_level = value + ((b * n.S + starts[l]) * n.H + h) * n.D + d;
      for (int64_t p = 0; p < n.P; ++p) {
        const int64_t k = l * n.P + p;
        Footprint<acc_t> f;
        if (!bilinear_footprint<acc_t>(static_cast<acc_t>(loc_r[2 * k]), static_cast<acc_t>(loc_r[2 * k + 1]), hl,
                                       wl, f)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn_r[k]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (f.valid[c] && active) {
            acc += a * f.weight[c] * static_cast<acc_t>(v_level[static_cast<int64_t>(f.offset[c]) * HD]);
          }
        }
      }
    }
    if (active) out[r * n.D + d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const scalar_t* __restrict__ loc, const scalar_t* __restrict__ attn, acc_t* __restrict__ grad_value,
                    scalar_t* __restrict__ grad_loc, scalar_t* __restrict__ grad_attn, Dims n) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (r >= n.rows) return;  // whole warps leave together: the shuffles below see all 32 lanes
  const int lane = threadIdx.x % kWarp;
  const int64_t b = r / n.QH;
  const int64_t h = r % n.H;
  const int64_t HD = n.H * n.D;
  const int64_t LP = n.L * n.P;
  const scalar_t* loc_r = loc + r * LP * 2;
  const scalar_t* attn_r = attn + r * LP;
  const scalar_t* go_r = grad_out + r * n.D;
  for (int64_t l = 0; l < n.L; ++l) {
    const bool inside = level_inside(starts[l], shapes[2 * l], shapes[2 * l + 1], n.S);
    const int hl = static_cast<int>(shapes[2 * l]);
    const int wl = static_cast<int>(shapes[2 * l + 1]);
    const int64_t level_base = ((b * n.S + starts[l]) * n.H + h) * n.D;
    for (int64_t p = 0; p < n.P; ++p) {
      const int64_t k = l * n.P + p;
      Footprint<acc_t> f;
      if (!inside || !bilinear_footprint<acc_t>(static_cast<acc_t>(loc_r[2 * k]),
                                                static_cast<acc_t>(loc_r[2 * k + 1]), hl, wl, f)) {
        if (lane == 0) {
          grad_attn[r * LP + k] = scalar_t(0);
          grad_loc[(r * LP + k) * 2] = scalar_t(0);
          grad_loc[(r * LP + k) * 2 + 1] = scalar_t(0);
        }
        continue;
      }
      const acc_t a = static_cast<acc_t>(attn_r[k]);
      // per-lane partial dot products <grad_out, value at corner c> over this lane's channels
      acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t d = lane; d < n.D; d += kWarp) {
        const acc_t go = static_cast<acc_t>(go_r[d]);
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          if (!f.valid[c]) continue;
          const int64_t idx = level_base + static_cast<int64_t>(f.offset[c]) * HD + d;
          dot[c] += go * static_cast<acc_t>(value[idx]);
          atomicAdd(grad_value + idx, a * f.weight[c] * go);
        }
      }
      // sample_gradients is linear in dot, so the lanes' partial results sum to the full ones
      acc_t ga, gx, gy;
      sample_gradients<acc_t>(f, dot, a, ga, gx, gy);
      ga = warp_sum(ga);
      gx = warp_sum(gx);
      gy = warp_sum(gy);
      if (lane == 0) {
        grad_attn[r * LP + k] = static_cast<scalar_t>(ga);
        grad_loc[(r * LP + k) * 2] = static_cast<scalar_t>(gx);
        grad_loc[(r * LP + k) * 2 + 1] = static_cast<scalar_t>(gy);
      }
    }
  }
}

Dims make_dims(const Sizes& s) { return Dims{s.B * s.Q * s.H, s.Q * s.H, s.S, s.H, s.D, s.L, s.P}; }

unsigned int num_blocks(int64_t rows) {
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  TORCH_CHECK(blocks <= 0x7fffffff, "ms_deform_attn: too many rows (", rows, ") for one launch");
  return static_cast<unsigned int>(blocks);
}

}  // namespace

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(value.device());
  at::Tensor out = at::empty({s.B, s.Q, s.H * s.D}, value.options());
  const Dims n = make_dims(s);
  if (n.rows == 0) return out;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<num_blocks(n.rows), kThreads, 0, stream>>>(
        value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(), level_start_index.data_ptr<int64_t>(),
        sampling_locations.data_ptr<scalar_t>(), attention_weights.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               c10::DeviceType::CUDA);
  check_grad_output(grad_output, value, s);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto acc_dtype = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_dtype));
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const Dims n = make_dims(s);
  if (n.rows > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, acc_t><<<num_blocks(n.rows), kThreads, 0, stream>>>(
              grad_output.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(), spatial_shapes.data_ptr<int64_t>(),
              level_start_index.data_ptr<int64_t>(), sampling_locations.data_ptr<scalar_t>(),
              attention_weights.data_ptr<scalar_t>(), grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<scalar_t>(),
              grad_attn.data_ptr<scalar_t>(), n);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value.to(value.scalar_type()), grad_loc, grad_attn};
}

}  // namespace msda
}  // namespace cropformer

TORCH_LIBRARY_IMPL(cropformer_C, CUDA, m) {
  m.impl("ms_deform_attn_forward", &cropformer::msda::ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &cropformer::msda::ms_deform_attn_backward_cuda);
}
