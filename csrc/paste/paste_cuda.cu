// Fused multi-view paste of entity masks (cropformer.ops.paste_entities), CUDA kernel. Same algorithm as
// the CPU kernel in paste.cpp, with the per-pixel math of paste.h: one thread block per output tile
// (tile edges from cropformer/ops/paste.py::_plan) prunes the queries with the tile bounds, then its
// threads evaluate the survivors pixel by pixel in descending class score, stopping at the first that is
// on. Per-query sums go to shared memory first, then once per tile to global memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <tuple>

#include "paste/paste.h"

// Defined in paste.cpp.
void paste_entities_check(const at::Tensor& logits, const at::Tensor& row_idx, const at::Tensor& row_w,
                          const at::Tensor& col_idx, const at::Tensor& col_w, const at::Tensor& boxes,
                          const at::Tensor& row_breaks, const at::Tensor& col_breaks, const at::Tensor& order,
                          int64_t score_mode);

namespace {

constexpr int kThreads = 256;

__global__ void paste_entities_kernel(const float* __restrict__ L, const int* __restrict__ ri,
                                      const float* __restrict__ rw, const int* __restrict__ ci,
                                      const float* __restrict__ cw, const int* __restrict__ boxes,
                                      const int* __restrict__ rb, const int* __restrict__ cb,
                                      const int* __restrict__ order, int V, int Q, int h, int w, int H, int W, int C,
                                      float thr, int mode, int* __restrict__ out, double* __restrict__ prob_sum,
                                      unsigned long long* __restrict__ area, unsigned long long* __restrict__ evaluated) {
  // Dynamic shared memory (cf_paste::dynamic_smem_bytes): per-query sums (double, declared first for
  // alignment), areas (uint), survivors (int), flags (uchar). Static: cf_paste::TileShared.
  extern __shared__ double s_sum[];
  unsigned int* s_area = reinterpret_cast<unsigned int*>(s_sum + Q);
  int* s_surv = reinterpret_cast<int*>(s_area + Q);
  unsigned char* s_flag = reinterpret_cast<unsigned char*>(s_surv + Q);
  __shared__ cf_paste::TileShared sh;
  int* s_views = sh.views;

  const long long view_stride = (long long)Q * h * w, query_stride = (long long)h * w;
  const int tile = blockIdx.x;
  const int ya = rb[tile / C], yb = rb[tile / C + 1], xa = cb[tile % C], xb = cb[tile % C + 1];
  const int tid = threadIdx.x;
  if (tid == 0) {
    int nv = 0;
    for (int v = 0; v < V; ++v) {
      if (boxes[4 * v] <= xa && xb <= boxes[4 * v + 2] && boxes[4 * v + 1] <= ya && yb <= boxes[4 * v + 3]) {
        s_views[nv++] = v;
      }
    }
    sh.nv = nv;
    sh.eval = 0;
  }
  for (int q = tid; q < Q; q += blockDim.x) {
    s_sum[q] = 0.0;
    s_area[q] = 0;
  }
  __syncthreads();
  const int nv = sh.nv;
  if (nv > 0) {
    const float thr_lo = thr - cf_paste::kBoundMargin, thr_hi = thr + cf_paste::kBoundMargin;
    for (int r = tid; r < Q; r += blockDim.x) {
      float lb, ub;
      cf_paste::tile_bounds(L + order[r] * query_stride, view_stride, w, H, W, nv, s_views, ri, ci, ya, yb, xa, xb,
                            &lb, &ub);
      s_flag[r] = (unsigned char)((ub > thr_lo ? 1 : 0) | (lb > thr_hi ? 2 : 0));
    }
  }
  __syncthreads();
  if (tid == 0) {
    // Survivors in rank order, ending at the first query that is on over the whole tile.
    int ns = 0;
    for (int r = 0; nv > 0 && r < Q; ++r) {
      if (s_flag[r] & 1) s_surv[ns++] = order[r];
      if (s_flag[r] & 2) break;
    }
    sh.ns = ns;
  }
  __syncthreads();
  const int ns = sh.ns, tw = xb - xa, n = (yb - ya) * tw;
  unsigned long long eval = 0;
  for (int p = tid; p < n; p += blockDim.x) {
    const int y = ya + p / tw, x = xa + p % tw;
    int id = 0;
    for (int s = 0; s < ns; ++s) {
      const int q = s_surv[s];
      ++eval;
      const float prob =
          cf_paste::fused_prob(L + q * query_stride, view_stride, w, H, W, nv, s_views, ri, rw, ci, cw, y, x);
      if (prob > thr) {
        id = q + 1;
        atomicAdd(&s_sum[q], (double)cf_paste::score_term(prob, mode));
        atomicAdd(&s_area[q], 1u);
        break;
      }
    }
    out[(long long)y * W + x] = id;
  }
  atomicAdd(&sh.eval, eval);
  __syncthreads();
  for (int q = tid; q < Q; q += blockDim.x) {
    if (s_area[q] > 0) {
      atomicAdd(&prob_sum[q], s_sum[q]);
      atomicAdd(&area[q], (unsigned long long)s_area[q]);
    }
  }
  if (tid == 0) atomicAdd(evaluated, sh.eval);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paste_entities_cuda(
    const at::Tensor& logits, const at::Tensor& row_idx, const at::Tensor& row_w, const at::Tensor& col_idx,
    const at::Tensor& col_w, const at::Tensor& boxes, const at::Tensor& row_breaks, const at::Tensor& col_breaks,
    const at::Tensor& order, double threshold, int64_t score_mode) {
  CF_CHECK_CUDA(logits);
  paste_entities_check(logits, row_idx, row_w, col_idx, col_w, boxes, row_breaks, col_breaks, order, score_mode);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int V = logits.size(0), Q = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int H = row_idx.size(1), W = col_idx.size(1);
  const int R = row_breaks.size(0) - 1, C = col_breaks.size(0) - 1;
  TORCH_CHECK(V <= cf_paste::kMaxViews, "paste_entities (CUDA): at most ", cf_paste::kMaxViews, " views, got ", V);
  // Shared memory per block = the kernel's static part (as compiled) + Q-dependent dynamic part; past
  // the default 48 KiB the kernel opts in to the device's larger limit.
  cudaFuncAttributes attr;
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, paste_entities_kernel));
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const size_t smem = cf_paste::dynamic_smem_bytes(Q);
  const int mode = cf_paste::smem_mode(attr.sharedSizeBytes, smem, prop->sharedMemPerBlock, prop->sharedMemPerBlockOptin);
  TORCH_CHECK(mode >= 0, "paste_entities (CUDA): ", Q, " queries need ", attr.sharedSizeBytes + smem,
              " bytes of shared memory per block, this GPU allows ", prop->sharedMemPerBlockOptin);
  if (mode == 1) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(paste_entities_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  }
  TORCH_CHECK((long long)R * C < (1LL << 31), "paste_entities (CUDA): too many tiles");

  auto id_map = at::empty({H, W}, logits.options().dtype(at::kInt));
  auto prob_sum = at::zeros({Q}, logits.options().dtype(at::kDouble));
  auto area = at::zeros({Q}, logits.options().dtype(at::kLong));
  auto evaluated = at::zeros({1}, logits.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  paste_entities_kernel<<<R * C, kThreads, smem, stream>>>(
      logits.data_ptr<float>(), row_idx.data_ptr<int>(), row_w.data_ptr<float>(), col_idx.data_ptr<int>(),
      col_w.data_ptr<float>(), boxes.data_ptr<int>(), row_breaks.data_ptr<int>(), col_breaks.data_ptr<int>(),
      order.data_ptr<int>(), V, Q, h, w, H, W, C, (float)threshold, (int)score_mode, id_map.data_ptr<int>(),
      prob_sum.data_ptr<double>(), reinterpret_cast<unsigned long long*>(area.data_ptr<int64_t>()),
      reinterpret_cast<unsigned long long*>(evaluated.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {id_map, prob_sum, area, evaluated};
}

}  // namespace

TORCH_LIBRARY_IMPL(cropformer_C, CUDA, m) { m.impl("paste_entities", &paste_entities_cuda); }
