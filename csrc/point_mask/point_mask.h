// Point-sampled mask costs and losses: the bilinear sampling of the CPU kernels (the loss math
// itself runs as ATen ops, vectorised; the Triton kernels have their own).
//
// Bilinear sampling follows grid_sample(align_corners=False, padding_mode="zeros") on
// grid = 2 * point - 1 in the arithmetic of ATen's vectorised CPU kernel (unnormalise with one fma,
// weights from the fractional parts, taps accumulated nw, ne, sw, se with fma), so samples equal
// detectron2's point_sample on an AVX2/AVX-512 CPU bit for bit. A neighbour outside the map has
// weight 0 (zero padding).
#pragma once

#include "common.h"

#include <math.h>
#include <stdint.h>

namespace cropformer {
namespace point_mask {

// The four bilinear neighbours (nw, ne, sw, se) of one point: element offsets (row * stride_h +
// col * stride_w) and weights; an outside neighbour gets offset 0 and weight 0.
template <typename scalar_t>
struct Taps {
  int64_t off[4];
  scalar_t w[4];
};

template <typename scalar_t>
CF_HOST_DEVICE void bilinear_taps(scalar_t px, scalar_t py, int64_t height, int64_t width, int64_t stride_h,
                                  int64_t stride_w, Taps<scalar_t>& taps) {
  const scalar_t gx = px * scalar_t(2) - scalar_t(1);
  const scalar_t gy = py * scalar_t(2) - scalar_t(1);
  const scalar_t ix = fma(gx, scalar_t(width) / scalar_t(2), (scalar_t(width) - scalar_t(1)) / scalar_t(2));
  const scalar_t iy = fma(gy, scalar_t(height) / scalar_t(2), (scalar_t(height) - scalar_t(1)) / scalar_t(2));
  const scalar_t fx = floor(ix);
  const scalar_t fy = floor(iy);
  const scalar_t wx = ix - fx;                // weight of the east column
  const scalar_t ex = scalar_t(1) - wx;       // weight of the west column
  const scalar_t wy = iy - fy;                // weight of the south row
  const scalar_t ey = scalar_t(1) - wy;       // weight of the north row
  const scalar_t weights[4] = {ex * ey, wx * ey, ex * wy, wx * wy};
  // Test in floating point before converting: points far outside (or NaN) never index memory.
  const bool in_x0 = fx >= scalar_t(0) && fx <= scalar_t(width - 1);
  const bool in_x1 = fx + scalar_t(1) >= scalar_t(0) && fx + scalar_t(1) <= scalar_t(width - 1);
  const bool in_y0 = fy >= scalar_t(0) && fy <= scalar_t(height - 1);
  const bool in_y1 = fy + scalar_t(1) >= scalar_t(0) && fy + scalar_t(1) <= scalar_t(height - 1);
  const bool inside[4] = {in_x0 && in_y0, in_x1 && in_y0, in_x0 && in_y1, in_x1 && in_y1};
  const int64_t x0 = in_x0 || in_x1 ? (int64_t)fx : 0;
  const int64_t y0 = in_y0 || in_y1 ? (int64_t)fy : 0;
  const int64_t dx[4] = {0, 1, 0, 1};
  const int64_t dy[4] = {0, 0, 1, 1};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    taps.off[k] = inside[k] ? (y0 + dy[k]) * stride_h + (x0 + dx[k]) * stride_w : 0;
    taps.w[k] = inside[k] ? weights[k] : scalar_t(0);
  }
}

// Bilinear sample of one map at precomputed taps, accumulated as grid_sample does (nw, ne, sw, se,
// fused multiply-adds; fma(v, w, 0) of the first tap is the plain product).
template <typename scalar_t, typename map_t>
CF_HOST_DEVICE scalar_t sample(const map_t* map, const Taps<scalar_t>& taps) {
  scalar_t v = scalar_t(0);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (taps.w[k] != scalar_t(0)) v = fma(scalar_t(map[taps.off[k]]), taps.w[k], v);
  }
  return v;
}

}  // namespace point_mask
}  // namespace cropformer
