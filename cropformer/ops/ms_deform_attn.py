"""Multi-scale deformable attention (Deformable DETR): one dispatch point + torch reference.

Backends behind `ms_deform_attn`:

- ``torch``: `ms_deform_attn_ref` (grid_sample based), the definition of correctness; any device/dtype.
- ``cpu``: C++ kernels in ``csrc/ms_deform_attn/`` (OpenMP, channel loops vectorised, AVX2 picked at run
  time on x86-64), forward and backward; needs the compiled extension.
- ``cuda``: CUDA kernels in ``csrc/ms_deform_attn/`` (fp32/fp16/bf16/fp64 inputs, fp32 accumulation for
  the 16-bit types), forward and backward; needs the extension built with CUDA.
- ``triton``: ``kernels/ms_deform_attn.py``, forward and backward (GPU; CPU only under TRITON_INTERPRET=1,
  for tests).

``auto`` picks, for CUDA tensors, the CUDA kernel when built, else Triton; for CPU tensors the C++ kernel
when built; otherwise the reference, and `_dispatch.resolve` logs once which one it took and why.

The fast paths run through the custom ops ``torch.ops.cropformer.ms_deform_attn_fwd`` / ``_bwd`` (with
fake implementations and autograd), so `torch.compile` traces them as single nodes.

Every backend validates its inputs: wrong ranks or sizes, mismatched dtypes or devices and non-contiguous
tensors raise an error (ValueError here, RuntimeError from the compiled entry points). spatial_shapes /
level_start_index that do not describe value's S raise one too where that costs no device sync: for CPU
tensors and on the torch path (which reads the level sizes anyway). On the CUDA and Triton paths the check
would copy the L x 3 integers to the host on every call, a sync that also rules out CUDA-graph capture;
there it runs only with CROPFORMER_DEBUG=1, and otherwise the kernels skip any level that does not lie
inside value (it contributes zero, with zero gradients), so bad levels never read out of bounds.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._dispatch import check_selftest, has_compiled_op, has_cuda_kernels, register_op, resolve, triton_usable

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def ms_deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Readable reference (grid_sample based), the definition of correctness.

    Args:
        value: B x S x H x D, S = sum(h_l * w_l).
        spatial_shapes: L x 2 int64 (h, w) per level.
        level_start_index: L int64, offsets of each level in S (unused here; kept for the signature).
        sampling_locations: B x Q x H x L x P x 2, (x, y) in [0, 1] of each level; bilinear,
            zero padding outside, align_corners=False.
        attention_weights: B x Q x H x L x P.
    Returns:
        B x Q x (H * D).
    """
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    sizes = [int(h) * int(w) for h, w in spatial_shapes.tolist()]
    value_list = value.split(sizes, dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        # B x h*w x H x D -> B*H x D x h x w. contiguous(): for B = 1 the reshape is a channels-last
        # view, and torch's CPU grid_sample in bf16/fp16 reads wrong values (NaN) from such input at
        # larger maps (torch 2.14.1, docs/NOTES.md); a copy costs nothing next to the sampling.
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(B * H, D, int(h), int(w)).contiguous()
        # B x Q x H x P x 2 -> B*H x Q x P x 2
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        # B*H x D x Q x P
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    # B x Q x H x L x P -> B*H x 1 x Q x L*P
    attn = attention_weights.transpose(1, 2).reshape(B * H, 1, Q, L * P)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * attn).sum(-1).view(B, H * D, Q)
    return out.transpose(1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------
# Input validation (the same rules as csrc/ms_deform_attn/ms_deform_attn_cpu.cpp::check_inputs).
# ----------------------------------------------------------------------------------------------------


def _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> None:
    """Shape, dtype, device and contiguity checks; they read only metadata (no device sync)."""
    named = (("value", value), ("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
             ("sampling_locations", sampling_locations), ("attention_weights", attention_weights))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ms_deform_attn: {name} must be a tensor, got {type(t).__name__}")
    if value.dim() != 4:
        raise ValueError(f"ms_deform_attn: value must be B x S x H x D, got shape {list(value.shape)}")
    if sampling_locations.dim() != 6 or sampling_locations.shape[5] != 2:
        raise ValueError("ms_deform_attn: sampling_locations must be B x Q x H x L x P x 2, got shape "
                         f"{list(sampling_locations.shape)}")
    if attention_weights.dim() != 5:
        raise ValueError("ms_deform_attn: attention_weights must be B x Q x H x L x P, got shape "
                         f"{list(attention_weights.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"ms_deform_attn: spatial_shapes must be L x 2, got shape {list(spatial_shapes.shape)}")
    B, S, H, D = value.shape
    _, Q, _, L, P, _ = sampling_locations.shape
    if L < 1:
        raise ValueError("ms_deform_attn: need at least one level")
    if spatial_shapes.shape[0] != L:
        raise ValueError(f"ms_deform_attn: spatial_shapes has {spatial_shapes.shape[0]} levels but "
                         f"sampling_locations has {L}")
    if tuple(level_start_index.shape) != (L,):
        raise ValueError(f"ms_deform_attn: level_start_index must have shape [{L}], got "
                         f"{list(level_start_index.shape)}")
    if sampling_locations.shape[0] != B or sampling_locations.shape[2] != H:
        raise ValueError(f"ms_deform_attn: sampling_locations {list(sampling_locations.shape)} does not match "
                         f"value {list(value.shape)} in batch or heads")
    if tuple(attention_weights.shape) != (B, Q, H, L, P):
        raise ValueError(f"ms_deform_attn: attention_weights must have shape {[B, Q, H, L, P]}, got "
                         f"{list(attention_weights.shape)}")
    if D < 1 or H < 1:
        raise ValueError("ms_deform_attn: value needs at least one head and one channel")
    if value.dtype not in _DTYPES:
        raise TypeError(f"ms_deform_attn: value must be float32, float64, float16 or bfloat16, got {value.dtype}")
    for name, t in named[3:]:
        if t.dtype != value.dtype:
            raise TypeError(f"ms_deform_attn: {name} must have value's dtype {value.dtype}, got {t.dtype}")
    for name, t in named[1:3]:
        if t.dtype != torch.int64:
            raise TypeError(f"ms_deform_attn: {name} must be int64, got {t.dtype}")
    for name, t in named:
        if t.device != value.device:
            raise ValueError(f"ms_deform_attn: {name} is on {t.device} but value is on {value.device}")
        if not t.is_contiguous():
            raise ValueError(f"ms_deform_attn: {name} must be contiguous")


def _check_levels(spatial_shapes, level_start_index, S: int) -> None:
    """spatial_shapes (h, w >= 1) must sum to S and level_start_index be its exclusive prefix sum.

    Reads the L x 3 integers (a device sync for CUDA tensors: see `_levels_checked`).
    """
    total = 0
    for lvl, ((h, w), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        if h < 1 or w < 1:
            raise ValueError(f"ms_deform_attn: spatial_shapes[{lvl}] = ({h}, {w}) must be positive")
        if start != total:
            raise ValueError(f"ms_deform_attn: level_start_index[{lvl}] = {start} but the levels before it hold "
                             f"{total} pixels")
        total += h * w
    if total != S:
        raise ValueError(f"ms_deform_attn: spatial_shapes sum to {total} pixels but value has S = {S}")


def _levels_checked(device: torch.device) -> bool:
    """Validate the level integers on the host: always for CPU tensors (no sync), for CUDA tensors only
    in debug mode (CROPFORMER_DEBUG=1), so the CUDA and Triton paths stay sync-free and capturable."""
    return device.type != "cuda" or os.environ.get("CROPFORMER_DEBUG", "") not in ("", "0")


# ----------------------------------------------------------------------------------------------------
# Fast paths as custom ops (opaque to torch.compile, with fake kernels and autograd).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("cropformer::ms_deform_attn_fwd", mutates_args=())
def _fused_fwd(value: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor,
               sampling_locations: torch.Tensor, attention_weights: torch.Tensor, backend: str) -> torch.Tensor:
    """B x Q x (H * D) from the "cpu" / "cuda" compiled kernels or the "triton" kernels."""
    if backend != "cpu" and _levels_checked(value.device):  # the C++ CPU entry checks them itself
        _check_levels(spatial_shapes, level_start_index, value.shape[1])
    if backend == "triton":
        from cropformer.kernels.ms_deform_attn import ms_deform_attn_forward

        return ms_deform_attn_forward(value, spatial_shapes, level_start_index, sampling_locations,
                                      attention_weights)
    return torch.ops.cropformer_C.ms_deform_attn_forward(value, spatial_shapes, level_start_index,
                                                         sampling_locations, attention_weights)


@_fused_fwd.register_fake
def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    B, _, H, D = value.shape
    return value.new_empty(B, sampling_locations.shape[1], H * D)


@torch.library.custom_op("cropformer::ms_deform_attn_bwd", mutates_args=())
def _fused_bwd(grad_output: torch.Tensor, value: torch.Tensor, spatial_shapes: torch.Tensor,
               level_start_index: torch.Tensor, sampling_locations: torch.Tensor, attention_weights: torch.Tensor,
               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_value, grad_sampling_locations, grad_attention_weights), each shaped like its input."""
    if backend == "triton":
        from cropformer.kernels.ms_deform_attn import ms_deform_attn_backward

        return ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                       attention_weights)
    return torch.ops.cropformer_C.ms_deform_attn_backward(grad_output, value, spatial_shapes, level_start_index,
                                                          sampling_locations, attention_weights)


@_fused_bwd.register_fake
def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend):
    return (value.new_empty(value.shape), sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape))


def _fused_setup_context(ctx, inputs, output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend = inputs
    ctx.save_for_backward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    ctx.backend = backend


def _fused_backward(ctx, grad_output):
    value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = _fused_bwd(grad_output.contiguous(), value, spatial_shapes, level_start_index,
                                                 sampling_locations, attention_weights, ctx.backend)
    return grad_value, None, None, grad_loc, grad_attn, None


_fused_fwd.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# ----------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------


def _cuda_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cuda" and dtype in _DTYPES and has_cuda_kernels()
            and has_compiled_op("ms_deform_attn_forward"))


def _cpu_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES and has_compiled_op("ms_deform_attn_forward")


def _triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in _DTYPES and triton_usable(device)


_PREFERENCE = (
    ("cuda", _cuda_ok, "compiled CUDA kernel"),
    ("triton", _triton_ok, "Triton kernel (CUDA extension not built)"),
    ("cpu", _cpu_ok, "compiled C++ CPU kernel"),
)


def _choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return resolve("ms_deform_attn", backend, device, dtype, _PREFERENCE)


# Availability is a property of the process, not of the traced values: torch.compile calls this once while
# tracing and bakes the answer in (instead of tracing the logging and caching inside `resolve`). This is
# what `torch.compiler.assume_constant_result` does; set by hand because calling that imports
# torch._dynamo (seconds, and triton with it) when this module is imported.
_choose_backend._dynamo_marked_constant = True


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, backend="auto"):
    """Multi-scale deformable attention; see `ms_deform_attn_ref` for shapes and semantics.

    Args:
        value: B x S x H x D; sampling_locations: B x Q x H x L x P x 2; attention_weights: B x Q x H x L x P,
            all of one floating dtype, contiguous, on one device; spatial_shapes: L x 2 and
            level_start_index: L, int64 on the same device.
        backend: "auto", "torch", "cpu", "cuda" or "triton". An explicit backend that cannot run raises a
            RuntimeError.
    Returns:
        B x Q x (H * D) in value's dtype, differentiable w.r.t. value, sampling_locations and
        attention_weights. A location whose four neighbours are all outside its level samples zero and
        gets a zero gradient; at exact pixel centres the location gradient is grid_sample's one-sided one.
        Level integers that do not describe value are an error, except on the CUDA / Triton paths
        outside debug mode (see the module docstring).
    """
    _check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    choice = _choose_backend(backend, value.device, value.dtype)
    if choice == "torch":
        _check_levels(spatial_shapes, level_start_index, value.shape[1])
        return ms_deform_attn_ref(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return _fused_fwd(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, choice)


# Self-test tolerance per dtype, relative to max(1, max |expected|): what a correct kernel with fp32 (fp64)
# accumulation stays well inside on the problem below (the C++ kernel and the interpreted Triton kernels
# reach at most 0.13 of it, in bf16); a wrong index or weight is off by O(1).
_SELFTEST_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _selftest(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """`backend` against the float64 reference on a small random problem, forward and all three
    gradients (see `cropformer.ops._dispatch.register_op`). Odd level sizes and a 1 x 1 level; D = 32 as
    in the pixel decoder, so the kernels it checks are the ones the model runs."""
    g = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor([[5, 7], [3, 2], [1, 1]])
    sizes = spatial_shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    B, S, H, D, Q, L, P = 2, int(sizes.sum()), 2, 32, 7, 3, 2
    inputs = [torch.randn(B, S, H, D, generator=g, dtype=torch.float64),
              torch.rand(B, Q, H, L, P, 2, generator=g, dtype=torch.float64) * 1.2 - 0.1,  # some outside
              torch.rand(B, Q, H, L, P, generator=g, dtype=torch.float64),
              torch.randn(B, Q, H * D, generator=g, dtype=torch.float64)]

    def run(fn, dev, dt):
        value, loc, attn = [t.to(dev, dt).requires_grad_() for t in inputs[:3]]
        out = fn(value, spatial_shapes.to(dev), starts.to(dev), loc, attn)
        # through a scalar: grad_outputs= costs a one-time import of sympy (seconds) in torch's autograd
        return [out, *torch.autograd.grad((out * inputs[3].to(dev, dt)).sum(), (value, loc, attn))]

    got = run(lambda *a: ms_deform_attn(*a, backend=backend), device, dtype)
    inputs = [t.to(dtype).double() for t in inputs]  # the reference sees the same rounded numbers
    expected = run(ms_deform_attn_ref, "cpu", torch.float64)
    check_selftest("ms_deform_attn", ("out", "grad_value", "grad_sampling_locations", "grad_attention_weights"),
                   got, expected, _SELFTEST_TOL[dtype])


register_op("ms_deform_attn", _PREFERENCE, _selftest)
