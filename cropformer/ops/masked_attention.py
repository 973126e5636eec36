"""Masked cross-attention (Mask2Former image and batch decoders): one dispatch point + torch reference.

Backends behind `masked_cross_attention`:

- ``torch``: `masked_cross_attention_ref`, the definition of correctness (any device and dtype).
- ``cpu``: `F.scaled_dot_product_attention` with the B x 1 x Q x K bool mask broadcast over heads, so
  torch's fused CPU attention (flash) kernel runs without a per-head mask (any floating dtype).
- ``triton``: `kernels/masked_attention.py`, a flash-attention kernel pair that decides the mask from
  the logits inside the kernel (GPU; CPU only under TRITON_INTERPRET=1, for tests). It is registered as
  the custom op ``torch.ops.cropformer.masked_cross_attention_fwd`` (+ ``_bwd``) with fake
  implementations, so `torch.compile` traces through it.

``auto`` picks ``triton`` for fp16/bf16/fp32 CUDA tensors with head size D <= 128 (the kernels' limit),
``cpu`` for CPU tensors (never the Triton interpreter, which exists for tests) and the reference
otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ._dispatch import check_selftest, register_op, resolve, triton_usable

# Target size of one query chunk's B x H x chunk x K scores in the reference.
_REF_CHUNK_BYTES = 64 * 2**20

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention_block_mask(mask_logits: torch.Tensor) -> torch.Tensor:
    """B x Q x K bool, True = blocked: logit < 0 (sigmoid < 0.5), rows fully blocked are fully opened."""
    blocked = mask_logits < 0
    return blocked & ~blocked.all(dim=-1, keepdim=True)


def _check_inputs(q, k, v, mask_logits) -> None:
    """Raise a ValueError / TypeError that names the offending argument and the expected shape."""
    for name, t, dims in (("q", q, 4), ("k", k, 4), ("v", v, 4), ("mask_logits", mask_logits, 3)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"masked_cross_attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != dims:
            raise ValueError(f"masked_cross_attention: {name} must have {dims} dims, got shape {list(t.shape)}")
    B, H, Q, D = q.shape
    K = k.shape[2]
    if tuple(k.shape) != (B, H, K, D):
        raise ValueError(
            f"masked_cross_attention: k has shape {list(k.shape)}; with q {list(q.shape)} (B x H x Q x D) "
            f"it must be B x H x K x D = [{B}, {H}, K, {D}]")
    if tuple(v.shape) != (B, H, K, D):
        raise ValueError(
            f"masked_cross_attention: v has shape {list(v.shape)}; it must match k, B x H x K x D = "
            f"{[B, H, K, D]}")
    if tuple(mask_logits.shape) != (B, Q, K):
        raise ValueError(
            f"masked_cross_attention: mask_logits has shape {list(mask_logits.shape)}; it must be "
            f"B x Q x K = {[B, Q, K]} (shared by all heads, not expanded per head)")
    if K == 0:
        raise ValueError("masked_cross_attention: needs at least one key (k has K = 0)")
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise TypeError(
            f"masked_cross_attention: q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not mask_logits.is_floating_point():
        raise TypeError(f"masked_cross_attention: mask_logits must be floating point logits, got {mask_logits.dtype}")
    if not (q.device == k.device == v.device == mask_logits.device):
        raise ValueError(
            f"masked_cross_attention: inputs on different devices: q {q.device}, k {k.device}, v {v.device}, "
            f"mask_logits {mask_logits.device}")


def _attend(q, k, v, mask_logits):
    """Dense masked attention of one query chunk: q B x H x C x D, mask_logits B x C x K."""
    scores = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))  # B x H x C x K
    # In place: matmul's backward needs its inputs, not its output. The mask broadcasts over heads.
    scores.masked_fill_(attention_block_mask(mask_logits).unsqueeze(1), float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v)


def masked_cross_attention_ref(q, k, v, mask_logits, query_chunk: int | None = None):
    """Readable reference, the definition of correctness.

    Args:
        q: B x H x Q x D; k, v: B x H x K x D, one floating dtype.
        mask_logits: B x Q x K floating, shared by all heads. Key j is blocked for query i when
            mask_logits[b, i, j] < 0 (a logit of exactly 0 is open, NaN is open), except that a row
            with every key blocked attends to all keys. No gradient flows to it.
        query_chunk: queries per chunk; None sizes chunks so one chunk's scores are ~64 MiB.
    Returns:
        B x H x Q x D.

    Memory: queries are processed in chunks (rows are independent), the mask is computed per chunk
    and broadcast over heads (never expanded per head), and under autograd each chunk is recomputed
    in backward (activation checkpointing), so neither pass holds more than one chunk's scores: the
    largest live tensors are a few B x H x chunk x K (~64 MiB each by default).
    """
    _check_inputs(q, k, v, mask_logits)
    B, H, Q, _ = q.shape
    K = k.shape[2]
    if query_chunk is None:
        query_chunk = max(1, _REF_CHUNK_BYTES // (B * H * K * q.element_size()))
    recompute = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    mask_logits = mask_logits.detach()
    outs = []
    for start in range(0, max(Q, 1), query_chunk):  # one empty chunk when Q == 0
        args = (q[:, :, start:start + query_chunk], k, v, mask_logits[:, start:start + query_chunk])
        outs.append(checkpoint(_attend, *args, use_reentrant=False) if recompute else _attend(*args))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


# ----------------------------------------------------------------------------------------------------
# Triton fast path as a custom op (opaque to torch.compile, with fake kernels and autograd).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("cropformer::masked_cross_attention_fwd", mutates_args=())
def _triton_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_logits: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out B x H x Q x D, lse B x H x Q fp32, row_open B x Q int32)."""
    from cropformer.kernels.masked_attention import masked_attention_forward

    return masked_attention_forward(q, k, v, mask_logits)


@_triton_fwd.register_fake
def _(q, k, v, mask_logits):
    B, H, Q, D = q.shape
    return (q.new_empty(B, H, Q, D), q.new_empty(B, H, Q, dtype=torch.float32),
            q.new_empty(B, Q, dtype=torch.int32))


@torch.library.custom_op("cropformer::masked_cross_attention_bwd", mutates_args=())
def _triton_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask_logits: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, row_open: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), contiguous."""
    from cropformer.kernels.masked_attention import masked_attention_backward

    return masked_attention_backward(grad_out, q, k, v, mask_logits, out, lse, row_open)


@_triton_bwd.register_fake
def _(grad_out, q, k, v, mask_logits, out, lse, row_open):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _triton_setup_context(ctx, inputs, output):
    q, k, v, mask_logits = inputs
    out, lse, row_open = output
    ctx.save_for_backward(q, k, v, mask_logits, out, lse, row_open)


def _triton_backward(ctx, grad_out, grad_lse, grad_row_open):
    q, k, v, mask_logits, out, lse, row_open = ctx.saved_tensors
    dq, dk, dv = _triton_bwd(grad_out, q, k, v, mask_logits, out, lse, row_open)
    return dq, dk, dv, None


_triton_fwd.register_autograd(_triton_backward, setup_context=_triton_setup_context)


def _triton_ok(device: torch.device, dtype: torch.dtype) -> bool:
    return dtype in _TRITON_DTYPES and triton_usable(device)


def _sdpa_broadcast_mask(q, k, v, mask_logits):
    """CPU fast path: SDPA with the B x 1 x Q x K "may attend" mask, broadcast over heads."""
    allowed = ~attention_block_mask(mask_logits.detach()).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


_PREFERENCE = (
    ("cpu", lambda device, dtype: device.type == "cpu", "SDPA with the mask broadcast over heads"),
    ("triton", _triton_ok, "Triton flash kernel, mask decided in-kernel from the logits"),
)


def _choose_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    return resolve("masked_cross_attention", backend, device, dtype, _PREFERENCE)


# A property of the process, not of the traced values: torch.compile bakes the answer in (see the same
# line in ops/ms_deform_attn.py).
_choose_backend._dynamo_marked_constant = True


def masked_cross_attention(q, k, v, mask_logits, backend="auto"):
    """Masked cross-attention; see `masked_cross_attention_ref` for shapes and semantics.

    Args:
        backend: "auto" (Triton for fp16/bf16/fp32 CUDA tensors with D <= 128, "cpu" for CPU tensors, else the
            reference), "torch", "triton" or "cpu". An explicit backend that cannot run raises a
            RuntimeError.
    Returns:
        B x H x Q x D in q's dtype; gradients for q, k, v, none for mask_logits.
    """
    _check_inputs(q, k, v, mask_logits)
    choice = _choose_backend(backend, q.device, q.dtype)
    if choice == "triton":
        from cropformer.kernels.masked_attention import MAX_HEAD_DIM

        if q.shape[3] > MAX_HEAD_DIM:  # the kernels' tiles would not fit in shared memory
            if backend == "triton":
                raise RuntimeError(f"masked_cross_attention: backend 'triton' supports head sizes up to "
                                   f"{MAX_HEAD_DIM}, got D = {q.shape[3]}")
            return masked_cross_attention_ref(q, k, v, mask_logits)
        if q.shape[2] == 0:
            return q.new_empty(q.shape)
        return torch.ops.cropformer.masked_cross_attention_fwd(q, k, v, mask_logits)[0]
    if choice == "cpu":
        return _sdpa_broadcast_mask(q, k, v, mask_logits)
    return masked_cross_attention_ref(q, k, v, mask_logits)


# Self-test tolerance per dtype, relative to max(1, max |expected|): a correct kernel stays well inside (SDPA
# and the interpreted Triton kernels reach at most 0.22 of it, in bf16); a wrong index or scale is off by O(1).
_SELFTEST_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def _selftest(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """`backend` against the float64 reference on a small random problem, output and dq, dk, dv (see
    `cropformer.ops._dispatch.register_op`). D = 32 as in the decoders; K = 37 spans several key blocks
    of the Triton kernel; a third of the keys open, one row fully blocked and one fully open."""
    g = torch.Generator().manual_seed(0)
    B, H, Q, K, D = 2, 2, 19, 37, 32
    q, k, v, grad_out = [torch.randn(shape, generator=g, dtype=torch.float64)
                         for shape in ((B, H, Q, D), (B, H, K, D), (B, H, K, D), (B, H, Q, D))]
    logits = torch.rand(B, Q, K, generator=g, dtype=torch.float64) * 3 - 2
    logits[:, 0] = -1.0
    logits[:, 1] = 1.0
    inputs = [t.to(dtype).double() for t in (q, k, v, logits, grad_out)]

    def run(fn, dev, dt):
        q, k, v = [t.to(dev, dt).requires_grad_() for t in inputs[:3]]
        out = fn(q, k, v, inputs[3].to(dev, dt))
        # through a scalar: grad_outputs= costs a one-time import of sympy (seconds) in torch's autograd
        return [out, *torch.autograd.grad((out * inputs[4].to(dev, dt)).sum(), (q, k, v))]

    got = run(lambda *a: masked_cross_attention(*a, backend=backend), device, dtype)
    # the reference's math without its chunking (whose activation checkpointing imports torch._dynamo)
    expected = run(_attend, "cpu", torch.float64)
    check_selftest("masked_cross_attention", ("out", "dq", "dk", "dv"), got, expected, _SELFTEST_TOL[dtype])


register_op("masked_cross_attention", _PREFERENCE, _selftest)
