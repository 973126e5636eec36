// Per-pixel math of the fused multi-view paste (cropformer.ops.paste_entities), shared by the C++ CPU
// kernel (paste.cpp) and the CUDA kernel (paste_cuda.cu), so the CPU tests exercise the GPU arithmetic.
// The includer provides expf (<cmath> on the host; a builtin in CUDA).
//
// Geometry (prepared in Python, cropformer/ops/paste.py::_plan): each view's two bilinear resizes
// (x4 to the padded size, cut, resize to the footprint) compose, per output row, into at most 3
// consecutive low-resolution rows with weights (row_idx / row_w, 3 per row), and likewise per output
// column. A view's logit at output pixel (y, x) is sum_i sum_j row_w[y][i] col_w[x][j] L[row_idx[y][i]]
// [col_idx[x][j]]: a convex combination of at most 9 low-resolution taps, so it lies between the
// minimum and maximum of the low-resolution logits over those taps. The tile bounds use exactly that.
#pragma once

#include "common.h"

namespace cf_paste {

// Views per call of the CUDA kernel (its per-tile list of covering views lives in shared memory).
constexpr int kMaxViews = 64;

// Static shared memory of the CUDA kernel's block: the views covering its tile and three counters.
struct TileShared {
  int views[kMaxViews];
  int nv, ns;
  unsigned long long eval;
};

// Dynamic shared memory of the CUDA kernel's block for Q queries: per query a double score sum, a
// uint area, an int survivor and a uchar flag.
inline size_t dynamic_smem_bytes(long long Q) { return (size_t)Q * (sizeof(double) + 2 * sizeof(int) + 1); }

// How the CUDA kernel is launched, from its static + dynamic shared memory per block: 0 = within
// the default limit (48 KiB), 1 = needs the opt-in (cudaFuncAttributeMaxDynamicSharedMemorySize,
// up to the device's sharedMemPerBlockOptin), -1 = too much for this device.
inline int smem_mode(size_t static_bytes, size_t dynamic_bytes, size_t default_limit, size_t optin_limit) {
  const size_t total = static_bytes + dynamic_bytes;
  if (total <= default_limit) return 0;
  return total <= optin_limit ? 1 : -1;
}

// Margin (in probability) on the tile pruning tests, larger than the float32 rounding of the
// interpolation, so that pruning never changes the result of the exact per-pixel evaluation.
constexpr float kBoundMargin = 1e-4f;

CF_HOST_DEVICE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

// Interpolated logit of one view at one pixel. L: h x w logits of one query in one view (row-major);
// ri/rw: the output row's 3 low-res rows and weights; ci/cw: the output column's 3 columns and weights.
CF_HOST_DEVICE float view_logit(const float* L, int w, const int* ri, const float* rw, const int* ci,
                                const float* cw) {
  float acc = 0.f;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    const float* row = L + (long long)ri[i] * w;
    acc += rw[i] * (cw[0] * row[ci[0]] + cw[1] * row[ci[1]] + cw[2] * row[ci[2]]);
  }
  return acc;
}

// Minimum and maximum of L over the low-res rectangle rows [r0, r1] x cols [c0, c1] (inclusive).
CF_HOST_DEVICE void rect_min_max(const float* L, int w, int r0, int r1, int c0, int c1, float* mn, float* mx) {
  float lo = L[(long long)r0 * w + c0], hi = lo;
  for (int r = r0; r <= r1; ++r) {
    const float* row = L + (long long)r * w;
    for (int c = c0; c <= c1; ++c) {
      const float v = row[c];
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
  }
  *mn = lo;
  *mx = hi;
}

// Fused probability of one query at output pixel (y, x): the mean over the nv views covering it
// (view ids in views[0..nv)) of sigmoid(view logit).
//   Lq: the query's logits in view 0 (views are view_stride floats apart), each h x w with row stride w;
//   row_idx/row_w: V x H x 3; col_idx/col_w: V x W x 3 (see the file comment).
CF_HOST_DEVICE float fused_prob(const float* Lq, long long view_stride, int w, int H, int W, int nv,
                                const int* views, const int* row_idx, const float* row_w,
                                const int* col_idx, const float* col_w, int y, int x) {
  float sum = 0.f;
  for (int k = 0; k < nv; ++k) {
    const long long v = views[k];
    const long long r = (v * H + y) * 3, c = (v * W + x) * 3;
    sum += sigmoid(view_logit(Lq + v * view_stride, w, row_idx + r, row_w + r, col_idx + c, col_w + c));
  }
  return sum / (float)nv;
}

// Bounds of the fused probability of one query over the output tile rows [ya, yb) x cols [xa, xb),
// all covered by the same nv views: lb <= fused_prob <= ub at every pixel of the tile (up to float
// rounding, see kBoundMargin). Row taps are non-decreasing in y, so the tile's support in view v is
// rows row_idx[v][ya][0] .. row_idx[v][yb-1][2] (and likewise for columns).
CF_HOST_DEVICE void tile_bounds(const float* Lq, long long view_stride, int w, int H, int W, int nv,
                                const int* views, const int* row_idx, const int* col_idx, int ya, int yb,
                                int xa, int xb, float* lb, float* ub) {
  float lo = 0.f, hi = 0.f;
  for (int k = 0; k < nv; ++k) {
    const long long v = views[k];
    const int r0 = row_idx[(v * H + ya) * 3], r1 = row_idx[(v * H + yb - 1) * 3 + 2];
    const int c0 = col_idx[(v * W + xa) * 3], c1 = col_idx[(v * W + xb - 1) * 3 + 2];
    float mn, mx;
    rect_min_max(Lq + v * view_stride, w, r0, r1, c0, c1, &mn, &mx);
    lo += sigmoid(mn);
    hi += sigmoid(mx);
  }
  *lb = lo / (float)nv;
  *ub = hi / (float)nv;
}

// Quantity summed over a query's final mask for its score: the fused probability (score_mode 0,
// "mean_prob") or its sigmoid (score_mode 1, "original": the double sigmoid of the released code).
CF_HOST_DEVICE float score_term(float p, int score_mode) { return score_mode == 1 ? sigmoid(p) : p; }

}  // namespace cf_paste
