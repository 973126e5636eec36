// CPU (OpenMP) kernels of cropformer.ops.point_mask: bilinear sampling of compact masks and the
// fused per-pair BCE + dice loss with its backward. Registered as torch.ops.cropformer_C.*.
// The sampling loops run through run_best_cpu (common.h): AVX2 + FMA code where the CPU has it (the
// candidate sampling of a training iteration 1.7x faster), the same bits as the baseline code
// (tests/ops/test_cpu_isa.py). The backward's scatter stays baseline: `g += gp * w` would become an FMA.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "point_mask/point_mask.h"

namespace cropformer {
namespace point_mask {
namespace {

void check_points(const at::Tensor& points, int64_t dims, const char* name) {
  CF_CHECK_CPU(points);
  CF_CHECK_CONTIGUOUS(points);
  TORCH_CHECK(points.dim() == dims && points.size(-1) == 2, name, ": points must have ", dims,
              " dims ending in 2 (x, y), got ", points.sizes());
  TORCH_CHECK(points.scalar_type() == at::kFloat || points.scalar_type() == at::kDouble, name,
              ": points must be float32 or float64");
}

void check_index(const at::Tensor& index, int64_t m, int64_t rows, const char* name) {
  CF_CHECK_CPU(index);
  CF_CHECK_CONTIGUOUS(index);
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 1 && index.size(0) == m, name,
              " must be int64 of shape (", m, ")");
  const int64_t* idx = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < rows, name, "[", i, "] = ", idx[i], " is out of range [0, ", rows, ")");
  }
}

// Visiting order of P points sorted by image row (stable counting sort on floor(y * rows)): masks
// of 1024 x 1024 are then swept top to bottom instead of read at random, which roughly halves the
// time of the sampling loops. Results are written back at the points' own positions.
template <typename scalar_t>
void row_order(const scalar_t* pts, int64_t P, int64_t rows, std::vector<int32_t>& order, std::vector<int32_t>& count) {
  order.resize(P);
  count.assign(rows + 1, 0);
  auto key = [&](int64_t p) {
    const scalar_t r = pts[2 * p + 1] * scalar_t(rows);
    return r >= scalar_t(0) && r < scalar_t(rows) ? (int64_t)r : (r >= scalar_t(rows) ? rows - 1 : 0);  // NaN -> 0
  };
  for (int64_t p = 0; p < P; ++p) ++count[key(p) + 1];
  for (int64_t r = 0; r < rows; ++r) count[r + 1] += count[r];
  for (int64_t p = 0; p < P; ++p) order[count[key(p)]++] = (int32_t)p;
}

// Calls f((map_t*)0) with the element type of a mask/logit tensor.
template <typename F>
void dispatch_map(const at::Tensor& maps, const char* name, F&& f) {
  switch (maps.scalar_type()) {
    case at::kByte: f((const uint8_t*)nullptr); break;
    case at::kBool: f((const uint8_t*)nullptr); break;  // one byte, 0 or 1
    case at::kFloat: f((const float*)nullptr); break;
    case at::kDouble: f((const double*)nullptr); break;
    default: TORCH_CHECK(false, name, ": maps must be uint8, bool, float32 or float64, got ", maps.scalar_type());
  }
}

// maps: K x T x H x W (any strides), points: P x 2 -> K x T x P samples in the points' dtype.
at::Tensor sample_shared_cpu(const at::Tensor& maps, const at::Tensor& points) {
  CF_CHECK_CPU(maps);
  TORCH_CHECK(maps.dim() == 4, "point_mask_sample_shared: maps must be K x T x H x W, got ", maps.sizes());
  check_points(points, 2, "point_mask_sample_shared");
  const int64_t K = maps.size(0), T = maps.size(1), H = maps.size(2), W = maps.size(3), P = points.size(0);
  auto out = at::empty({K, T, P}, points.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "point_mask_sample_shared", [&] {
    // the taps depend only on the point and the map strides: compute them once for all maps
    std::vector<Taps<scalar_t>> taps(P);
    const scalar_t* pts = points.data_ptr<scalar_t>();
    for (int64_t p = 0; p < P; ++p) {
      bilinear_taps<scalar_t>(pts[2 * p], pts[2 * p + 1], H, W, maps.stride(2), maps.stride(3), taps[p]);
    }
    std::vector<int32_t> order, count;
    row_order(pts, P, H, order, count);
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t sK = maps.stride(0), sT = maps.stride(1);
    dispatch_map(maps, "point_mask_sample_shared", [&](auto tag) {
      using map_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      const map_t* base = (const map_t*)maps.data_ptr();
      at::parallel_for(0, K * T, 1, [&](int64_t begin, int64_t end) {
        run_best_cpu([&] {
          for (int64_t kt = begin; kt < end; ++kt) {
            const map_t* map = base + (kt / T) * sK + (kt % T) * sT;
            scalar_t* row = o + kt * P;
            for (int64_t i = 0; i < P; ++i) {
              const int64_t p = order[i];
              row[p] = sample<scalar_t, map_t>(map, taps[p]);
            }
          }
        });
      });
    });
  });
  return out;
}

// maps: K x h x w contiguous float, index: M, points: M x S x 2 -> M x S samples of row index[m].
at::Tensor sample_rows_cpu(const at::Tensor& maps, const at::Tensor& index, const at::Tensor& points) {
  CF_CHECK_CPU(maps);
  CF_CHECK_CONTIGUOUS(maps);
  TORCH_CHECK(maps.dim() == 3, "point_mask_sample_rows: maps must be K x h x w, got ", maps.sizes());
  check_points(points, 3, "point_mask_sample_rows");
  TORCH_CHECK(maps.scalar_type() == points.scalar_type(),
              "point_mask_sample_rows: maps and points must have one dtype");
  const int64_t K = maps.size(0), h = maps.size(1), w = maps.size(2), M = points.size(0), S = points.size(1);
  check_index(index, M, K, "point_mask_sample_rows: index");
  auto out = at::empty({M, S}, points.options());
  AT_DISPATCH_FLOATING_TYPES(maps.scalar_type(), "point_mask_sample_rows", [&] {
    const scalar_t* base = maps.data_ptr<scalar_t>();
    const scalar_t* pts = points.data_ptr<scalar_t>();
    const int64_t* idx = index.data_ptr<int64_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> order, count;
      run_best_cpu([&] {
        for (int64_t m = begin; m < end; ++m) {
          const scalar_t* mp = pts + m * S * 2;
          const scalar_t* map = base + idx[m] * h * w;
          row_order(mp, S, h, order, count);
          for (int64_t i = 0; i < S; ++i) {
            const int64_t p = order[i];
            Taps<scalar_t> taps;
            bilinear_taps<scalar_t>(mp[2 * p], mp[2 * p + 1], h, w, w, 1, taps);
            o[m * S + p] = sample<scalar_t, scalar_t>(map, taps);
          }
        }
      });
    });
  });
  return out;
}

// The per-pair losses from the samples x, t (M x P), with ATen's vectorised kernels (the extension
// is compiled for baseline x86-64, so its own loops ran exp and log1p one point at a time; the op went
// from 2.9 to 2.1 ms at the demo's training shapes): bce = mean BCE-with-logits, dice = 1 - (2 sum(s t) + 1) /
// (sum(s) + sum(t) + 1), s = sigmoid(x), the reference's formulas term for term.
std::vector<at::Tensor> losses_from_samples(const at::Tensor& xs, const at::Tensor& ts) {
  const auto bce = at::binary_cross_entropy_with_logits(xs, ts, {}, {}, at::Reduction::None).mean(1);
  const auto s = at::sigmoid(xs);
  const auto dice = 1 - (2 * (s * ts).sum(1) + 1) / (s.sum(1) + ts.sum(1) + 1);
  return {bce, dice};
}

// Fused forward: per pair m, x = pred[pred_index[m]] and t = gt[gt_index[m]] (zero if not
// gt_valid[m]) at the pair's P points; returns (bce M, dice M, x M x P, t M x P).
std::vector<at::Tensor> loss_fwd_cpu(const at::Tensor& pred, const at::Tensor& gt, const at::Tensor& points,
                                     const at::Tensor& pred_index, const at::Tensor& gt_index,
                                     const at::Tensor& gt_valid) {
  CF_CHECK_CPU(pred);
  CF_CHECK_CONTIGUOUS(pred);
  CF_CHECK_CPU(gt);
  TORCH_CHECK(pred.dim() == 3, "point_mask_loss_fwd: pred must be K x h x w, got ", pred.sizes());
  TORCH_CHECK(gt.dim() == 3, "point_mask_loss_fwd: gt must be K' x H x W, got ", gt.sizes());
  check_points(points, 3, "point_mask_loss_fwd");
  TORCH_CHECK(pred.scalar_type() == points.scalar_type(), "point_mask_loss_fwd: pred and points must have one dtype");
  const int64_t M = points.size(0), P = points.size(1);
  const int64_t h = pred.size(1), w = pred.size(2), H = gt.size(1), W = gt.size(2);
  check_index(pred_index, M, pred.size(0), "point_mask_loss_fwd: pred_index");
  check_index(gt_index, M, gt.size(0), "point_mask_loss_fwd: gt_index");
  CF_CHECK_CPU(gt_valid);
  CF_CHECK_CONTIGUOUS(gt_valid);
  TORCH_CHECK(gt_valid.scalar_type() == at::kByte && gt_valid.numel() == M,
              "point_mask_loss_fwd: gt_valid must be uint8 (", M, ")");
  auto xs = at::empty({M, P}, pred.options());
  auto ts = at::empty({M, P}, pred.options());
  AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "point_mask_loss_fwd", [&] {
    const scalar_t* pbase = pred.data_ptr<scalar_t>();
    const scalar_t* pts = points.data_ptr<scalar_t>();
    const int64_t* pidx = pred_index.data_ptr<int64_t>();
    const int64_t* gidx = gt_index.data_ptr<int64_t>();
    const uint8_t* valid = gt_valid.data_ptr<uint8_t>();
    scalar_t* xo = xs.data_ptr<scalar_t>();
    scalar_t* to = ts.data_ptr<scalar_t>();
    const int64_t sK = gt.stride(0), sH = gt.stride(1), sW = gt.stride(2);
    dispatch_map(gt, "point_mask_loss_fwd", [&](auto tag) {
      using map_t = std::remove_const_t<std::remove_pointer_t<decltype(tag)>>;
      const map_t* gbase = (const map_t*)gt.data_ptr();
      at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
        std::vector<int32_t> order, count;
        run_best_cpu([&] {
          for (int64_t m = begin; m < end; ++m) {
            const scalar_t* pmap = pbase + pidx[m] * h * w;
            const map_t* gmap = gbase + gidx[m] * sK;
            const bool ok = valid[m] != 0;
            row_order(pts + m * P * 2, P, H, order, count);
            for (int64_t i = 0; i < P; ++i) {
              const int64_t p = order[i];
              const scalar_t px = pts[(m * P + p) * 2], py = pts[(m * P + p) * 2 + 1];
              Taps<scalar_t> taps;
              bilinear_taps<scalar_t>(px, py, h, w, w, 1, taps);
              xo[m * P + p] = sample<scalar_t, scalar_t>(pmap, taps);
              scalar_t t = scalar_t(0);
              if (ok) {
                bilinear_taps<scalar_t>(px, py, H, W, sH, sW, taps);
                t = sample<scalar_t, map_t>(gmap, taps);
              }
              to[m * P + p] = t;
            }
          }
        });
      });
    });
  });
  auto losses = losses_from_samples(xs, ts);
  return {losses[0], losses[1], xs, ts};
}

// Backward of loss_fwd w.r.t. pred: the gradient at every sample (ATen, vectorised), then each
// point's gradient scattered into its 4 neighbours of row pred_index[m]. Pairs sharing a row are
// handled by one thread, so no two threads write one row.
at::Tensor loss_bwd_cpu(const at::Tensor& grad_bce, const at::Tensor& grad_dice, const at::Tensor& points,
                        const at::Tensor& pred_index, const at::Tensor& xs, const at::Tensor& ts,
                        at::IntArrayRef pred_shape) {
  check_points(points, 3, "point_mask_loss_bwd");
  TORCH_CHECK(pred_shape.size() == 3, "point_mask_loss_bwd: pred_shape must be (K, h, w)");
  const int64_t M = points.size(0), P = points.size(1);
  const int64_t K = pred_shape[0], h = pred_shape[1], w = pred_shape[2];
  check_index(pred_index, M, K, "point_mask_loss_bwd: pred_index");
  for (const auto* t : {&grad_bce, &grad_dice, &xs, &ts}) {
    CF_CHECK_CPU(*t);
    CF_CHECK_CONTIGUOUS(*t);
    TORCH_CHECK(t->scalar_type() == points.scalar_type(), "point_mask_loss_bwd: all inputs must share one dtype");
  }
  TORCH_CHECK(xs.dim() == 2 && xs.size(0) == M && xs.size(1) == P && ts.sizes() == xs.sizes(),
              "point_mask_loss_bwd: x and t must be M x P = ", M, " x ", P);
  // d/dx of g_bce * mean BCE + g_dice * dice, dice = 1 - numer / denom:
  //   g_bce / P * (s - t) - g_dice * (2 t denom - numer) / denom^2 * s (1 - s)
  const auto s = at::sigmoid(xs);
  const auto numer = (2 * (s * ts).sum(1, true) + 1);
  const auto denom = (s.sum(1, true) + ts.sum(1, true) + 1);
  const auto d_dice_ds = (numer - 2 * ts * denom) / (denom * denom);
  const auto gx = ((grad_bce.view({M, 1}) / double(P)) * (s - ts) + grad_dice.view({M, 1}) * d_dice_ds * s * (1 - s))
                      .contiguous();
  auto grad = at::zeros({K, h, w}, xs.options());
  // group the pairs by prediction row (stable: pairs of a row keep their order)
  const int64_t* pidx = pred_index.data_ptr<int64_t>();
  std::vector<int64_t> pairs(M);
  for (int64_t m = 0; m < M; ++m) pairs[m] = m;
  std::stable_sort(pairs.begin(), pairs.end(), [&](int64_t a, int64_t b) { return pidx[a] < pidx[b]; });
  std::vector<int64_t> starts;
  for (int64_t i = 0; i < M; ++i) {
    if (i == 0 || pidx[pairs[i]] != pidx[pairs[i - 1]]) starts.push_back(i);
  }
  starts.push_back(M);
  const int64_t groups = (int64_t)starts.size() - 1;
  AT_DISPATCH_FLOATING_TYPES(xs.scalar_type(), "point_mask_loss_bwd", [&] {
    const scalar_t* pts = points.data_ptr<scalar_t>();
    const scalar_t* g_at = gx.data_ptr<scalar_t>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> order, count;
      for (int64_t grp = begin; grp < end; ++grp) {
        for (int64_t j = starts[grp]; j < starts[grp + 1]; ++j) {
          const int64_t m = pairs[j];
          scalar_t* gmap = g + pidx[m] * h * w;
          row_order(pts + m * P * 2, P, h, order, count);
          for (int64_t i = 0; i < P; ++i) {
            const int64_t p = order[i];
            const scalar_t gp = g_at[m * P + p];
            Taps<scalar_t> taps;
            bilinear_taps<scalar_t>(pts[(m * P + p) * 2], pts[(m * P + p) * 2 + 1], h, w, w, 1, taps);
            for (int k = 0; k < 4; ++k) {
              if (taps.w[k] != scalar_t(0)) gmap[taps.off[k]] += gp * taps.w[k];
            }
          }
        }
      }
    });
  });
  return grad;
}

}  // namespace
}  // namespace point_mask
}  // namespace cropformer

TORCH_LIBRARY_FRAGMENT(cropformer_C, m) {
  m.def("point_mask_sample_shared(Tensor maps, Tensor points) -> Tensor");
  m.def("point_mask_sample_rows(Tensor maps, Tensor index, Tensor points) -> Tensor");
  m.def(
      "point_mask_loss_fwd(Tensor pred, Tensor gt, Tensor points, Tensor pred_index, Tensor gt_index, "
      "Tensor gt_valid) -> Tensor[]");
  m.def(
      "point_mask_loss_bwd(Tensor grad_bce, Tensor grad_dice, Tensor points, Tensor pred_index, Tensor x, "
      "Tensor t, int[] pred_shape) -> Tensor");
}

TORCH_LIBRARY_IMPL(cropformer_C, CPU, m) {
  m.impl("point_mask_sample_shared", &cropformer::point_mask::sample_shared_cpu);
  m.impl("point_mask_sample_rows", &cropformer::point_mask::sample_rows_cpu);
  m.impl("point_mask_loss_fwd", &cropformer::point_mask::loss_fwd_cpu);
  m.impl("point_mask_loss_bwd", &cropformer::point_mask::loss_bwd_cpu);
}
