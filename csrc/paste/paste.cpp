// Fused multi-view paste of entity masks (cropformer.ops.paste_entities), C++ (OpenMP) CPU kernel and
// the op's registration. The per-pixel math is in paste.h (shared with paste_cuda.cu); the geometry
// (per-row / per-column taps, tile edges, query order) is prepared by cropformer/ops/paste.py::_plan.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "paste/paste.h"

// A value-range condition (bool scalar tensor): checked on the host for CPU tensors (a clear error);
// on the device for CUDA tensors (at::_assert_async: no host synchronisation, so the op can be
// captured in a CUDA graph; a violation is a device-side assert before the kernel runs).
static void check_values(const at::Tensor& ok, const char* what) {
  if (ok.is_cuda()) {
    at::_assert_async(ok, what);
  } else {
    TORCH_CHECK(ok.item<bool>(), "paste_entities: ", what);
  }
}

// Shape, dtype, device and value-range checks shared with the CUDA entry (declared there).
void paste_entities_check(const at::Tensor& logits, const at::Tensor& row_idx, const at::Tensor& row_w,
                          const at::Tensor& col_idx, const at::Tensor& col_w, const at::Tensor& boxes,
                          const at::Tensor& row_breaks, const at::Tensor& col_breaks, const at::Tensor& order,
                          int64_t score_mode) {
  const std::vector<at::Tensor> all{logits, row_idx, row_w, col_idx, col_w, boxes, row_breaks, col_breaks, order};
  for (const auto& t : all) {
    TORCH_CHECK(t.device() == logits.device(), "paste_entities: all tensors must be on the device of logits");
    TORCH_CHECK(t.is_contiguous(), "paste_entities: all tensors must be contiguous");
  }
  TORCH_CHECK(logits.dim() == 4 && logits.scalar_type() == at::kFloat, "logits must be a float32 V x Q x h x w tensor");
  const int64_t V = logits.size(0), Q = logits.size(1), h = logits.size(2), w = logits.size(3);
  TORCH_CHECK(V > 0 && Q > 0 && h > 0 && w > 0, "logits must not be empty");
  TORCH_CHECK(logits.numel() < (int64_t(1) << 62), "logits too large");
  TORCH_CHECK(row_idx.dim() == 3 && row_idx.size(0) == V && row_idx.size(2) == 3 && row_idx.scalar_type() == at::kInt,
              "row_idx must be int32 V x H x 3");
  TORCH_CHECK(col_idx.dim() == 3 && col_idx.size(0) == V && col_idx.size(2) == 3 && col_idx.scalar_type() == at::kInt,
              "col_idx must be int32 V x W x 3");
  TORCH_CHECK(row_w.sizes() == row_idx.sizes() && row_w.scalar_type() == at::kFloat, "row_w must be float32 V x H x 3");
  TORCH_CHECK(col_w.sizes() == col_idx.sizes() && col_w.scalar_type() == at::kFloat, "col_w must be float32 V x W x 3");
  const int64_t H = row_idx.size(1), W = col_idx.size(1);
  TORCH_CHECK(H > 0 && W > 0 && H < (1 << 30) && W < (1 << 30), "output size must be positive and below 2^30");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == V && boxes.size(1) == 4 && boxes.scalar_type() == at::kInt,
              "boxes must be int32 V x 4");
  TORCH_CHECK(order.dim() == 1 && order.size(0) == Q && order.scalar_type() == at::kInt, "order must be int32 Q");
  TORCH_CHECK(row_breaks.dim() == 1 && row_breaks.size(0) >= 2 && row_breaks.scalar_type() == at::kInt,
              "row_breaks must be int32 with at least 2 entries");
  TORCH_CHECK(col_breaks.dim() == 1 && col_breaks.size(0) >= 2 && col_breaks.scalar_type() == at::kInt,
              "col_breaks must be int32 with at least 2 entries");
  TORCH_CHECK(score_mode == 0 || score_mode == 1, "score_mode must be 0 (mean_prob) or 1 (original)");
  // Value ranges (one small reduction each): every tap index must address the low-res maps, the tile
  // edges must cover the output.
  check_values(((row_idx >= 0) & (row_idx < h)).all(), "row_idx out of range");
  check_values(((col_idx >= 0) & (col_idx < w)).all(), "col_idx out of range");
  check_values(((order >= 0) & (order < Q)).all(), "order out of range");
  check_values((row_breaks[0] == 0) & (row_breaks[-1] == H) & (row_breaks.diff() > 0).all(),
               "row_breaks must increase strictly from 0 to H");
  check_values((col_breaks[0] == 0) & (col_breaks[-1] == W) & (col_breaks.diff() > 0).all(),
               "col_breaks must increase strictly from 0 to W");
}

namespace {

// Side of the second-level tiles of the CPU kernel (see the pixel loop).
constexpr int kSubTile = 8;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> paste_entities_cpu(
    const at::Tensor& logits, const at::Tensor& row_idx, const at::Tensor& row_w, const at::Tensor& col_idx,
    const at::Tensor& col_w, const at::Tensor& boxes, const at::Tensor& row_breaks, const at::Tensor& col_breaks,
    const at::Tensor& order, double threshold, int64_t score_mode) {
  CF_CHECK_CPU(logits);
  paste_entities_check(logits, row_idx, row_w, col_idx, col_w, boxes, row_breaks, col_breaks, order, score_mode);
  const int V = logits.size(0), Q = logits.size(1), h = logits.size(2), w = logits.size(3);
  const int H = row_idx.size(1), W = col_idx.size(1);
  const int R = row_breaks.size(0) - 1, C = col_breaks.size(0) - 1;
  const long long view_stride = (long long)Q * h * w, query_stride = (long long)h * w;
  const float thr = (float)threshold, thr_lo = thr - cf_paste::kBoundMargin, thr_hi = thr + cf_paste::kBoundMargin;
  const int mode = (int)score_mode;

  auto id_map = at::empty({H, W}, logits.options().dtype(at::kInt));
  auto prob_sum = at::zeros({Q}, logits.options().dtype(at::kDouble));
  auto area = at::zeros({Q}, logits.options().dtype(at::kLong));
  auto evaluated = at::zeros({1}, logits.options().dtype(at::kLong));

  const float* L = logits.data_ptr<float>();
  const int* ri = row_idx.data_ptr<int>();
  const float* rw = row_w.data_ptr<float>();
  const int* ci = col_idx.data_ptr<int>();
  const float* cw = col_w.data_ptr<float>();
  const int* bx = boxes.data_ptr<int>();
  const int* rb = row_breaks.data_ptr<int>();
  const int* cb = col_breaks.data_ptr<int>();
  const int* ord = order.data_ptr<int>();
  int* out = id_map.data_ptr<int>();
  double* ps_out = prob_sum.data_ptr<double>();
  int64_t* ar_out = area.data_ptr<int64_t>();
  int64_t* ev_out = evaluated.data_ptr<int64_t>();
  const long long ntiles = (long long)R * C;

#pragma omp parallel
  {
    // Per-thread partial sums, reduced once at the end (no atomics in the pixel loop).
    std::vector<double> ps(Q, 0.0);
    std::vector<int64_t> ar(Q, 0);
    std::vector<int> survivors(Q), sub(Q), views(V);
    int64_t ev = 0;
#pragma omp for schedule(dynamic, 1)
    for (long long t = 0; t < ntiles; ++t) {
      const int ya = rb[t / C], yb = rb[t / C + 1], xa = cb[t % C], xb = cb[t % C + 1];
      // Tile edges include every footprint edge, so a view covers the whole tile or none of it.
      int nv = 0;
      for (int v = 0; v < V; ++v) {
        if (bx[4 * v] <= xa && xb <= bx[4 * v + 2] && bx[4 * v + 1] <= ya && yb <= bx[4 * v + 3]) views[nv++] = v;
      }
      int ns = 0;
      if (nv > 0) {
        // Queries in descending class score; keep those that can be on somewhere in the tile, and stop
        // after the first that is on everywhere in it (nothing ranked below can win a pixel).
        for (int r = 0; r < Q; ++r) {
          const int q = ord[r];
          float lb, ub;
          cf_paste::tile_bounds(L + q * query_stride, view_stride, w, H, W, nv, views.data(), ri, ci, ya, yb, xa, xb,
                                &lb, &ub);
          if (ub > thr_lo) survivors[ns++] = q;
          if (lb > thr_hi) break;
        }
      }
      // Second pruning level: the tile's survivors again, over sub-tiles of kSubTile x kSubTile pixels
      // (the same bounds on a smaller support: every query dropped there is off at each of its pixels).
      // Where the output is many times the mask resolution a tile spans few low-res pixels and its
      // bounds are loose; the sub-tiles cut the pixels x queries evaluated 2-3x (measured, see
      // docs/BENCHMARKS.md). With a single survivor there is nothing to prune.
      for (int sy = ya; sy < yb; sy += kSubTile) {
        const int sy1 = std::min(sy + kSubTile, yb);
        for (int sx = xa; sx < xb; sx += kSubTile) {
          const int sx1 = std::min(sx + kSubTile, xb);
          const int* cand = survivors.data();
          int nc = ns;
          if (ns > 1) {
            nc = 0;
            for (int s = 0; s < ns; ++s) {
              const int q = survivors[s];
              float lb, ub;
              cf_paste::tile_bounds(L + q * query_stride, view_stride, w, H, W, nv, views.data(), ri, ci, sy, sy1, sx,
                                    sx1, &lb, &ub);
              if (ub > thr_lo) sub[nc++] = q;
              if (lb > thr_hi) break;
            }
            cand = sub.data();
          }
          for (int y = sy; y < sy1; ++y) {
            int* out_row = out + (long long)y * W;
            for (int x = sx; x < sx1; ++x) {
              int id = 0;
              for (int s = 0; s < nc; ++s) {
                const int q = cand[s];
                ++ev;
                const float p = cf_paste::fused_prob(L + q * query_stride, view_stride, w, H, W, nv, views.data(), ri,
                                                     rw, ci, cw, y, x);
                if (p > thr) {
                  id = q + 1;
                  ps[q] += cf_paste::score_term(p, mode);
                  ar[q] += 1;
                  break;
                }
              }
              out_row[x] = id;
            }
          }
        }
      }
    }
#pragma omp critical
    {
      for (int q = 0; q < Q; ++q) {
        ps_out[q] += ps[q];
        ar_out[q] += ar[q];
      }
      ev_out[0] += ev;
    }
  }
  return {id_map, prob_sum, area, evaluated};
}

// Launch configuration of the CUDA kernel's shared memory for num_queries queries (the arithmetic of
// paste_cuda.cu, compiled here so that CPU tests check it): (static bytes = sizeof(TileShared),
// dynamic bytes, mode of cf_paste::smem_mode for the given limits).
std::tuple<int64_t, int64_t, int64_t> paste_entities_smem(int64_t num_queries, int64_t default_limit,
                                                          int64_t optin_limit) {
  const size_t stat = sizeof(cf_paste::TileShared), dyn = cf_paste::dynamic_smem_bytes(num_queries);
  return {(int64_t)stat, (int64_t)dyn, cf_paste::smem_mode(stat, dyn, (size_t)default_limit, (size_t)optin_limit)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cropformer_C, m) {
  m.def("paste_entities_smem(int num_queries, int default_limit, int optin_limit) -> (int, int, int)");
  m.def(
      "paste_entities(Tensor logits, Tensor row_idx, Tensor row_w, Tensor col_idx, Tensor col_w, Tensor boxes, "
      "Tensor row_breaks, Tensor col_breaks, Tensor order, float threshold, int score_mode) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cropformer_C, CPU, m) { m.impl("paste_entities", &paste_entities_cpu); }

TORCH_LIBRARY_IMPL(cropformer_C, CompositeExplicitAutograd, m) { m.impl("paste_entities_smem", &paste_entities_smem); }
