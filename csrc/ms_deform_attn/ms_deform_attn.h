// Bilinear-sampling math of multi-scale deformable attention, shared by the C++ CPU and the CUDA
// kernels (so the CPU tests exercise the arithmetic the GPU runs). Includes only common.h.
//
// Semantics are those of F.grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)
// on a map of h x w pixels: a location (loc_x, loc_y) in [0, 1] maps to pixel coordinates
// x = loc_x * w - 0.5, y = loc_y * h - 0.5 (pixel centres at integers); the four neighbours
// (floor(x), floor(y)) .. (floor(x) + 1, floor(y) + 1) are weighted bilinearly and a neighbour outside
// the map contributes zero. Derivatives use the same floor, so at an exact integer coordinate they are
// the one-sided (right) derivative, as in grid_sample's backward.
#pragma once

#include "common.h"

namespace cropformer {
namespace msda {

// Corner order used everywhere: 0 = (x0, y0), 1 = (x0 + 1, y0), 2 = (x0, y0 + 1), 3 = (x0 + 1, y0 + 1).
template <typename T>
struct Footprint {
  int offset[4];     // y * w + x of the corner inside its level; meaningful only where valid
  bool valid[4];     // corner inside the map
  T weight[4];       // bilinear weight of the corner
  T dweight_dx[4];   // d weight / d loc_x (includes the factor w of x = loc_x * w - 0.5)
  T dweight_dy[4];   // d weight / d loc_y (includes the factor h)
};

// floor() for |x| < 2^31 without <cmath>: truncate, then step down for negative non-integers.
template <typename T>
CF_HOST_DEVICE int floor_to_int(T x) {
  int i = static_cast<int>(x);
  return (static_cast<T>(i) > x) ? i - 1 : i;
}

// Fills `f` for a sampling location on an h x w level. Returns false when no corner is inside the
// map (then the sample and all its derivatives are zero); NaN locations also return false. The
// early return also keeps floor_to_int within int range for locations far outside [0, 1].
template <typename T>
CF_HOST_DEVICE bool bilinear_footprint(T loc_x, T loc_y, int h, int w, Footprint<T>& f) {
  const T x = loc_x * static_cast<T>(w) - static_cast<T>(0.5);
  const T y = loc_y * static_cast<T>(h) - static_cast<T>(0.5);
  if (!(x >= static_cast<T>(-1) && x < static_cast<T>(w) && y >= static_cast<T>(-1) && y < static_cast<T>(h))) {
    return false;
  }
  const int x0 = floor_to_int(x);
  const int y0 = floor_to_int(y);
  const int x1 = x0 + 1;
  const int y1 = y0 + 1;
  const T lx = x - static_cast<T>(x0);
  const T ly = y - static_cast<T>(y0);
  const T hx = static_cast<T>(1) - lx;
  const T hy = static_cast<T>(1) - ly;
  const T fw = static_cast<T>(w);
  const T fh = static_cast<T>(h);
  const bool vx0 = x0 >= 0;
  const bool vx1 = x1 <= w - 1;
  const bool vy0 = y0 >= 0;
  const bool vy1 = y1 <= h - 1;

  f.valid[0] = vx0 && vy0;
  f.valid[1] = vx1 && vy0;
  f.valid[2] = vx0 && vy1;
  f.valid[3] = vx1 && vy1;
  f.offset[0] = y0 * w + x0;
  f.offset[1] = y0 * w + x1;
  f.offset[2] = y1 * w + x0;
  f.offset[3] = y1 * w + x1;
  f.weight[0] = hy * hx;
  f.weight[1] = hy * lx;
  f.weight[2] = ly * hx;
  f.weight[3] = ly * lx;
  f.dweight_dx[0] = -hy * fw;
  f.dweight_dx[1] = hy * fw;
  f.dweight_dx[2] = -ly * fw;
  f.dweight_dx[3] = ly * fw;
  f.dweight_dy[0] = -hx * fh;
  f.dweight_dy[1] = -lx * fh;
  f.dweight_dy[2] = hx * fh;
  f.dweight_dy[3] = lx * fh;
  return true;
}

// Gradients of one sample from the four dot products dot[c] = <grad_out, value at corner c> over the
// channels (zero for invalid corners). The sample's contribution to the output is
// attn * sum_c weight[c] * value[c], so
//   d/d attn  = sum_c weight[c] * dot[c]
//   d/d loc_x = attn * sum_c dweight_dx[c] * dot[c]      (and likewise for loc_y)
// The grad of value at corner c is attn * weight[c] * grad_out (done by the callers, per channel).
template <typename T>
CF_HOST_DEVICE void sample_gradients(const Footprint<T>& f, const T dot[4], T attn, T& grad_attn, T& grad_x,
                                     T& grad_y) {
  T ga = 0, gx = 0, gy = 0;
  for (int c = 0; c < 4; ++c) {
    ga += f.weight[c] * dot[c];
    gx += f.dweight_dx[c] * dot[c];
    gy += f.dweight_dy[c] * dot[c];
  }
  grad_attn = ga;
  grad_x = attn * gx;
  grad_y = attn * gy;
}

}  // namespace msda
}  // namespace cropformer
