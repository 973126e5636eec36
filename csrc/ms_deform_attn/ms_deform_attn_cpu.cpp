// Multi-scale deformable attention, C++ CPU kernels (forward and backward) and the op schemas.
//
// Forward: OpenMP over output rows r = (b, q, h); each row accumulates its L x P samples into a D-long
// accumulator (float for float/half/bfloat16 inputs, double for double), the channel loops vectorised.
// Backward: OpenMP over (b, h) partitions, each walking its queries: grad_value[b, :, h, :] is written
// only by its own partition, so no atomics. When there are fewer (b, h) partitions than threads can
// balance, queries are split into chunks that accumulate into private buffers summed at the end.
//
// x86-64 builds compile the hot loops twice (baseline and AVX2+FMA, `run_best_cpu` in common.h) and pick
// one at run time, so the extension stays portable while using 256-bit vectors where the CPU has them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_attn_checks.h"

namespace cropformer {
namespace msda {

namespace {

const char* device_name(c10::DeviceType t) { return t == c10::DeviceType::CPU ? "CPU" : "CUDA"; }

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& value, c10::DeviceType device_type) {
  TORCH_CHECK(t.device().type() == device_type, "ms_deform_attn: ", name, " must be a ", device_name(device_type),
              " tensor, got a tensor on ", t.device());
  TORCH_CHECK(t.device() == value.device(), "ms_deform_attn: ", name, " is on ", t.device(), " but value is on ",
              value.device());
  TORCH_CHECK(t.is_contiguous(), "ms_deform_attn: ", name, " must be contiguous");
}

}  // namespace

Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                   const at::Tensor& sampling_locations, const at::Tensor& attention_weights,
                   c10::DeviceType device_type) {
  check_tensor(value, "value", value, device_type);
  check_tensor(spatial_shapes, "spatial_shapes", value, device_type);
  check_tensor(level_start_index, "level_start_index", value, device_type);
  check_tensor(sampling_locations, "sampling_locations", value, device_type);
  check_tensor(attention_weights, "attention_weights", value, device_type);

  const auto dtype = value.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "ms_deform_attn: value must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(sampling_locations.scalar_type() == dtype, "ms_deform_attn: sampling_locations must have value's dtype ",
              dtype, ", got ", sampling_locations.scalar_type());
  TORCH_CHECK(attention_weights.scalar_type() == dtype, "ms_deform_attn: attention_weights must have value's dtype ",
              dtype, ", got ", attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, "ms_deform_attn: spatial_shapes must be int64, got ",
              spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, "ms_deform_attn: level_start_index must be int64, got ",
              level_start_index.scalar_type());

  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be B x S x H x D, got shape ", value.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be B x Q x H x L x P x 2, got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "ms_deform_attn: attention_weights must be B x Q x H x L x P, got shape ",
              attention_weights.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be L x 2, got shape ", spatial_shapes.sizes());
  Sizes s{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
          sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(s.L >= 1, "ms_deform_attn: need at least one level");
  TORCH_CHECK(spatial_shapes.size(0) == s.L, "ms_deform_attn: spatial_shapes has ", spatial_shapes.size(0),
              " levels but sampling_locations has ", s.L);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "ms_deform_attn: level_start_index must have shape [", s.L, "], got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.size(0) == s.B && sampling_locations.size(2) == s.H,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " in batch or heads");
  TORCH_CHECK(attention_weights.size(0) == s.B && attention_weights.size(1) == s.Q &&
                  attention_weights.size(2) == s.H && attention_weights.size(3) == s.L &&
                  attention_weights.size(4) == s.P,
              "ms_deform_attn: attention_weights must have shape [", s.B, ", ", s.Q, ", ", s.H, ", ", s.L, ", ", s.P,
              "], got ", attention_weights.sizes());
  TORCH_CHECK(s.D >= 1 && s.H >= 1, "ms_deform_attn: value needs at least one head and one channel");
  // Pixel offsets inside a level are int in the kernels.
  TORCH_CHECK(s.S <= INT_MAX, "ms_deform_attn: S = ", s.S, " is too large (max ", INT_MAX, ")");

  // The level integers of CUDA tensors are not read here: copying them to the host would be a sync on
  // every call (and rule out CUDA-graph capture). The CUDA kernels skip a level that does not lie inside
  // value instead, and the Python dispatch checks them in debug mode.
  if (device_type != c10::DeviceType::CPU) return s;
  const int64_t* sh = spatial_shapes.data_ptr<int64_t>();
  const int64_t* st = level_start_index.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < s.L; ++l) {
    TORCH_CHECK(sh[2 * l] >= 1 && sh[2 * l + 1] >= 1, "ms_deform_attn: spatial_shapes[", l, "] = (", sh[2 * l], ", ",
                sh[2 * l + 1], ") must be positive");
    TORCH_CHECK(st[l] == total, "ms_deform_attn: level_start_index[", l, "] = ", st[l],
                " but the levels before it hold ", total, " pixels");
    total += sh[2 * l] * sh[2 * l + 1];
    TORCH_CHECK(total <= s.S, "ms_deform_attn: spatial_shapes hold more pixels than value's S = ", s.S);
  }
  TORCH_CHECK(total == s.S, "ms_deform_attn: spatial_shapes sum to ", total, " pixels but value has S = ", s.S);
  return s;
}

void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Sizes& s) {
  TORCH_CHECK(grad_output.device() == value.device(), "ms_deform_attn: grad_output is on ", grad_output.device(),
              " but value is on ", value.device());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), "ms_deform_attn: grad_output must have value's dtype ",
              value.scalar_type(), ", got ", grad_output.scalar_type());
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.B && grad_output.size(1) == s.Q &&
                  grad_output.size(2) == s.H * s.D,
              "ms_deform_attn: grad_output must have shape [", s.B, ", ", s.Q, ", ", s.H * s.D, "], got ",
              grad_output.sizes());
  TORCH_CHECK(grad_output.is_contiguous(), "ms_deform_attn: grad_output must be contiguous");
}

namespace {

#if defined(__GNUC__)
#define MSDA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MSDA_ALWAYS_INLINE inline
#endif

// Sizes and level tables (host pointers) of one call.
struct Problem {
  int64_t B, S, H, D, Q, L, P;
  const int64_t* shapes;  // L x 2 (h, w)
  const int64_t* starts;  // L
};

// Output rows [begin, end) of B*Q*H; row r = (b * Q + q) * H + h, out[r * D : (r + 1) * D].
// kD > 0 fixes D at compile time (the accumulator then lives in registers); kD == 0 reads pr.D.
template <typename scalar_t, typename acc_t, int kD>
MSDA_ALWAYS_INLINE void forward_rows_impl(const Problem& pr, const scalar_t* value, const scalar_t* loc,
                                          const scalar_t* attn, scalar_t* out, int64_t begin, int64_t end) {
  const int64_t D = kD > 0 ? kD : pr.D;
  const int64_t HD = pr.H * D;
  const int64_t QH = pr.Q * pr.H;
  const int64_t LP = pr.L * pr.P;
  acc_t acc_fixed[kD > 0 ? kD : 1];
  std::vector<acc_t> acc_dynamic(kD > 0 ? 0 : D);
  acc_t* acc = kD > 0 ? acc_fixed : acc_dynamic.data();

  for (int64_t r = begin; r < end; ++r) {
    const int64_t b = r / QH;
    const int64_t h = r % pr.H;
    for (int64_t d = 0; d < D; ++d) acc[d] = acc_t(0);
    const scalar_t* loc_r = loc + r * LP * 2;
    const scalar_t* attn_r = attn + r * LP;
    for (int64_t l = 0; l < pr.L; ++l) {
      const int hl = static_cast<int>(pr.shapes[2 * l]);
      const int wl = static_cast<int>(pr.shapes[2 * l + 1]);
      // value[b, starts[l] + i, h, :] is at v_level + i * HD
      const scalar_t* v_level = value + ((b * pr.S + pr.starts[l]) * pr.H + h) * D;
      for (int64_t p = 0; p < pr.P; ++p) {
        const int64_t k = l * pr.P + p;
        Footprint<acc_t> f;
        if (!bilinear_footprint<acc_t>(static_cast<acc_t>(loc_r[2 * k]), static_cast<acc_t>(loc_r[2 * k + 1]), hl, wl,
                                       f)) {
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn_r[k]);
        for (int c = 0; c < 4; ++c) {
          if (!f.valid[c]) continue;
          const scalar_t* v = v_level + static_cast<int64_t>(f.offset[c]) * HD;
          const acc_t wc = a * f.weight[c];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += wc * static_cast<acc_t>(v[d]);
        }
      }
    }
    scalar_t* o = out + r * D;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d]);
  }
}

// Backward of queries [q_begin, q_end) for one (b, h). grad_value of pixel i of (b, h) accumulates at
// gv + i * gv_stride (the grad_value tensor itself, or a private buffer); grad_loc and grad_attn of
// every sample of these rows are written (zeros where nothing is sampled).
template <typename scalar_t, typename acc_t, int kD>
MSDA_ALWAYS_INLINE void backward_part_impl(const Problem& pr, const scalar_t* grad_out, const scalar_t* value,
                                           const scalar_t* loc, const scalar_t* attn, acc_t* gv, int64_t gv_stride,
                                           scalar_t* grad_loc, scalar_t* grad_attn, int64_t b, int64_t h,
                                           int64_t q_begin, int64_t q_end) {
  const int64_t D = kD > 0 ? kD : pr.D;
  const int64_t HD = pr.H * D;
  const int64_t LP = pr.L * pr.P;
  acc_t go_fixed[kD > 0 ? kD : 1];
  std::vector<acc_t> go_dynamic(kD > 0 ? 0 : D);
  acc_t* go = kD > 0 ? go_fixed : go_dynamic.data();
  const scalar_t* v_bh = value + (b * pr.S * pr.H + h) * D;

  for (int64_t q = q_begin; q < q_end; ++q) {
    const int64_t r = (b * pr.Q + q) * pr.H + h;
    const scalar_t* go_r = grad_out + r * D;
    for (int64_t d = 0; d < D; ++d) go[d] = static_cast<acc_t>(go_r[d]);
    const scalar_t* loc_r = loc + r * LP * 2;
    const scalar_t* attn_r = attn + r * LP;
    scalar_t* gloc_r = grad_loc + r * LP * 2;
    scalar_t* gattn_r = grad_attn + r * LP;
    for (int64_t l = 0; l < pr.L; ++l) {
      const int hl = static_cast<int>(pr.shapes[2 * l]);
      const int wl = static_cast<int>(pr.shapes[2 * l + 1]);
      const scalar_t* v_level = v_bh + pr.starts[l] * HD;
      acc_t* gv_level = gv + pr.starts[l] * gv_stride;
      for (int64_t p = 0; p < pr.P; ++p) {
        const int64_t k = l * pr.P + p;
        Footprint<acc_t> f;
        if (!bilinear_footprint<acc_t>(static_cast<acc_t>(loc_r[2 * k]), static_cast<acc_t>(loc_r[2 * k + 1]), hl, wl,
                                       f)) {
          gattn_r[k] = scalar_t(0);
          gloc_r[2 * k] = scalar_t(0);
          gloc_r[2 * k + 1] = scalar_t(0);
          continue;
        }
        const acc_t a = static_cast<acc_t>(attn_r[k]);
        acc_t dot[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
        for (int c = 0; c < 4; ++c) {
          if (!f.valid[c]) continue;
          const scalar_t* v = v_level + static_cast<int64_t>(f.offset[c]) * HD;
          acc_t* g = gv_level + static_cast<int64_t>(f.offset[c]) * gv_stride;
          const acc_t wc = a * f.weight[c];
          acc_t s = acc_t(0);
#pragma omp simd reduction(+ : s)
          for (int64_t d = 0; d < D; ++d) {
            s += go[d] * static_cast<acc_t>(v[d]);
            g[d] += wc * go[d];
          }
          dot[c] = s;
        }
        acc_t ga, gx, gy;
        sample_gradients<acc_t>(f, dot, a, ga, gx, gy);
        gattn_r[k] = static_cast<scalar_t>(ga);
        gloc_r[2 * k] = static_cast<scalar_t>(gx);
        gloc_r[2 * k + 1] = static_cast<scalar_t>(gy);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, int kD>
void forward_cpu_typed(const Problem& pr, const at::Tensor& value, const at::Tensor& loc, const at::Tensor& attn,
                       at::Tensor& out) {
  const scalar_t* v = value.data_ptr<scalar_t>();
  const scalar_t* lp = loc.data_ptr<scalar_t>();
  const scalar_t* ap = attn.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t rows = pr.B * pr.Q * pr.H;
  // ~L*P*4*D multiply-adds per row: a grain of 16 rows is well above OpenMP's per-chunk overhead.
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    // AVX2 + FMA code where the CPU has it (common.h); its FMAs change last bits, within the parity tolerance
    run_best_cpu([&] { forward_rows_impl<scalar_t, acc_t, kD>(pr, v, lp, ap, op, begin, end); });
  });
}

// Query chunks per (b, h) partition: 1 (write grad_value directly, no extra memory) when the B*H
// partitions spread evenly over the threads or are plenty; otherwise enough chunks for ~4 per thread.
int64_t query_chunks(int64_t bh, int64_t q) {
  const int64_t threads = at::get_num_threads();
  if (threads <= 1 || bh % threads == 0 || bh >= 4 * threads) return 1;
  return std::max<int64_t>(1, std::min<int64_t>((4 * threads + bh - 1) / bh, q));
}

template <typename scalar_t, typename acc_t, int kD>
void backward_cpu_typed(const Problem& pr, const at::Tensor& grad_out, const at::Tensor& value, const at::Tensor& loc,
                        const at::Tensor& attn, at::Tensor& grad_value, at::Tensor& grad_loc, at::Tensor& grad_attn) {
  const scalar_t* go = grad_out.data_ptr<scalar_t>();
  const scalar_t* v = value.data_ptr<scalar_t>();
  const scalar_t* lp = loc.data_ptr<scalar_t>();
  const scalar_t* ap = attn.data_ptr<scalar_t>();
  scalar_t* glp = grad_loc.data_ptr<scalar_t>();
  scalar_t* gap = grad_attn.data_ptr<scalar_t>();
  const int64_t BH = pr.B * pr.H;
  const int64_t chunks = query_chunks(BH, pr.Q);
  // Direct accumulation into grad_value needs one writer per (b, h) and an accumulator-typed tensor;
  // otherwise each (b, h, chunk) task gets a private S x D buffer in acc_t.
  const bool direct = chunks == 1 && std::is_same<scalar_t, acc_t>::value;
  at::Tensor buffer;
  if (!direct) {
    buffer = at::zeros({BH * chunks, pr.S, pr.D}, value.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  }
  acc_t* gv_direct = direct ? reinterpret_cast<acc_t*>(grad_value.data_ptr<scalar_t>()) : nullptr;
  acc_t* gv_buffer = direct ? nullptr : buffer.data_ptr<acc_t>();

  at::parallel_for(0, BH * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks;
      const int64_t c = task % chunks;
      const int64_t b = bh / pr.H;
      const int64_t h = bh % pr.H;
      const int64_t q_begin = pr.Q * c / chunks;
      const int64_t q_end = pr.Q * (c + 1) / chunks;
      acc_t* gv = direct ? gv_direct + (b * pr.S * pr.H + h) * pr.D : gv_buffer + task * pr.S * pr.D;
      const int64_t gv_stride = direct ? pr.H * pr.D : pr.D;
      run_best_cpu([&] {
        backward_part_impl<scalar_t, acc_t, kD>(pr, go, v, lp, ap, gv, gv_stride, glp, gap, b, h, q_begin, q_end);
      });
    }
  });

  if (!direct) {
    // grad_value[b, s, h, :] = sum over chunks of buffer[(b * H + h) * chunks + c, s, :]
    scalar_t* gvp = grad_value.data_ptr<scalar_t>();
    const int64_t SD = pr.S * pr.D;
    at::parallel_for(0, pr.B * pr.S, 64, [&](int64_t begin, int64_t end) {
      for (int64_t bs = begin; bs < end; ++bs) {
        const int64_t b = bs / pr.S;
        const int64_t s = bs % pr.S;
        for (int64_t h = 0; h < pr.H; ++h) {
          const acc_t* src = gv_buffer + (b * pr.H + h) * chunks * SD + s * pr.D;
          scalar_t* dst = gvp + (bs * pr.H + h) * pr.D;
          for (int64_t d = 0; d < pr.D; ++d) {
            acc_t sum = acc_t(0);
            for (int64_t c = 0; c < chunks; ++c) sum += src[c * SD + d];
            dst[d] = static_cast<scalar_t>(sum);
          }
        }
      }
    });
  }
}

Problem make_problem(const Sizes& s, const at::Tensor& shapes, const at::Tensor& starts) {
  return Problem{s.B, s.S, s.H, s.D, s.Q, s.L, s.P, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>()};
}

// Calls fn(std::integral_constant<int, kD>) with kD = D for the specialised channel counts, else 0.
template <typename Fn>
void with_channels(int64_t D, Fn&& fn) {
  switch (D) {
    case 32:
      fn(std::integral_constant<int, 32>());
      break;
    case 64:
      fn(std::integral_constant<int, 64>());
      break;
    default:
      fn(std::integral_constant<int, 0>());
  }
}

}  // namespace

// value B x S x H x D, spatial_shapes L x 2, level_start_index L, sampling_locations B x Q x H x L x P x 2,
// attention_weights B x Q x H x L x P -> B x Q x (H * D).
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               c10::DeviceType::CPU);
  at::Tensor out = at::empty({s.B, s.Q, s.H * s.D}, value.options());
  const Problem pr = make_problem(s, spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channels(s.D, [&](auto kd) {
      forward_cpu_typed<scalar_t, acc_t, decltype(kd)::value>(pr, value, sampling_locations, attention_weights, out);
    });
  });
  return out;
}

// Returns (grad_value B x S x H x D, grad_sampling_locations, grad_attention_weights), each shaped like
// its input; grad_output is B x Q x (H * D).
std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention_weights) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                               c10::DeviceType::CPU);
  check_grad_output(grad_output, value, s);
  at::Tensor grad_value = at::zeros_like(value);
  at::Tensor grad_loc = at::empty_like(sampling_locations);
  at::Tensor grad_attn = at::empty_like(attention_weights);
  const Problem pr = make_problem(s, spatial_shapes, level_start_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channels(s.D, [&](auto kd) {
      backward_cpu_typed<scalar_t, acc_t, decltype(kd)::value>(pr, grad_output, value, sampling_locations,
                                                               attention_weights, grad_value, grad_loc, grad_attn);
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace msda
}  // namespace cropformer

TORCH_LIBRARY_FRAGMENT(cropformer_C, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cropformer_C, CPU, m) {
  m.impl("ms_deform_attn_forward", &cropformer::msda::ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &cropformer::msda::ms_deform_attn_backward_cpu);
}
