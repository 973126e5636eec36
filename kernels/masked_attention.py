"""Fused masked cross-attention (Mask2Former decoders) in Triton: forward and backward.

Semantics are those of `cropformer.ops.masked_attention.masked_cross_attention_ref`: q is
B x H x Q x D, k and v are B x H x K x D, mask_logits is B x Q x K and shared by all heads; key j is
blocked for query i when ``mask_logits[b, i, j] < 0``, except that a row whose keys are all blocked
attends to every key. Gradients flow to q, k and v, never to the mask.

The mask is decided inside the kernels from the logits, so no B x H x Q x K (or even B x Q x K bool)
tensor is ever written:

1. `_masked_attention_rows_kernel` reads the logits once and sets ``row_open[b, i] = 1`` when row i has
   at least one open key (B x Q int32); a row left at 0 is fully blocked and therefore attends to all.
2. `_masked_attention_fwd_kernel` is a flash-attention forward (online softmax, fp32 statistics) that
   blocks key j of row i when ``logit < 0 and row_open[i]``. The decoders have few queries (100-200)
   and many keys, so B x H x ceil(Q / BLOCK_Q) programs cannot fill a GPU: the keys are split into
   `num_splits` ranges (flash-decoding), each writes a partial output and log-sum-exp in fp32, and
   `_combine_splits` merges them.
3. Backward: `_masked_attention_bwd_dkdv_kernel` owns a key block and loops over all queries (plenty of
   programs since K is large); `_masked_attention_bwd_dq_kernel` owns a query block and a key range,
   like the forward, and its fp32 partials are summed. No atomics, so gradients are deterministic.

The grid puts heads on axis 0, so the H programs that read the same logits tile run side by side and
share it through L2. Block sizes are fixed heuristics (not autotuned) so that the interpreter runs the
same code as the GPU. Each kernel's looped block is then halved, if need be, until an estimate of its
shared memory fits the device (`_fit_shared`). Head sizes up to MAX_HEAD_DIM are supported (the dispatch
sends larger ones elsewhere).
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from cropformer.ops._dispatch import cuda_device_guard

LOG2E = 1.0 / math.log(2.0)
MAX_HEAD_DIM = 128  # the largest D the compile check (scripts/triton_compile_check.py) compiles
# Per-block shared memory (opt-in) of an A100 (sm_80), the smallest of the GPUs the compile check targets:
# the budget off a GPU, so that the interpreter and the compile check launch what an A100 would.
A100_SHARED_BYTES = 166912
NUM_STAGES = 2  # software pipeline depth of the flash kernels' loops


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. UPCAST (interpreter only): the Triton interpreter multiplies the bit
    patterns of bf16 operands (triton-lang/triton#11584), so feed it the exact fp32 values instead."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _masked_attention_rows_kernel(
    logits_ptr, row_open_ptr,
    Q, K,
    s_lb, s_lq, s_lk,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """row_open[b, i] |= any(not logits[b, i, j] < 0) over this program's BLOCK_Q x BLOCK_K tile."""
    pid_k = tl.program_id(0)
    pid_q = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    valid = (rows[:, None] < Q) & (cols[None, :] < K)
    x = tl.load(logits_ptr + b * s_lb + rows[:, None] * s_lq + cols[None, :] * s_lk, mask=valid, other=-1.0)
    x = x.to(tl.float32)  # compare values, not bf16 bit patterns, under the interpreter too
    # `not (x < 0)` rather than `x >= 0`: a NaN logit is open, exactly as in the torch reference.
    key_open = tl.where(valid & (x < 0), 0, 1)
    key_open = tl.where(valid, key_open, 0)
    any_open = tl.max(key_open, axis=1)
    tl.atomic_max(row_open_ptr + b * Q + rows, any_open, mask=(rows < Q) & (any_open > 0))


@triton.jit
def _masked_attention_fwd_kernel(
    q_ptr, k_ptr, v_ptr, logits_ptr, row_open_ptr, o_ptr, lse_ptr,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kk, s_kd,
    s_vb, s_vh, s_vk, s_vd,
    s_lb, s_lq, s_lk,
    B, H, Q, K, D, keys_per_split, qk_scale_log2,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (head, query block, key split, batch) program.

    Writes o[split, b, h, rows] = softmax-weighted v over the split's keys (0 where every key of the
    split is blocked) and lse[split, b, h, rows] = natural log-sum-exp of its scores (-inf then);
    o and lse are contiguous S x B x H x Q x D and S x B x H x Q.
    """
    h = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2) // B
    b = tl.program_id(2) % B
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < Q
    dim_valid = dims < D

    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    l_base = logits_ptr + b.to(tl.int64) * s_lb
    q = tl.load(q_base + rows[:, None] * s_qq + dims[None, :] * s_qd,
                mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    row_open = tl.load(row_open_ptr + b * Q + rows, mask=row_valid, other=0)

    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)  # running max, log2 units
    l = tl.zeros([BLOCK_Q], tl.float32)  # running sum of 2^(s - m)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, K)
    for start in range(k_start, k_end, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_valid = cols < k_end
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_base + cols[:, None] * s_kk + dims[None, :] * s_kd, mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2
        x = tl.load(l_base + rows[:, None] * s_lq + cols[None, :] * s_lk,
                    mask=row_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
        blocked = ((x < 0) & (row_open[:, None] > 0)) | (~col_valid[None, :])
        s = tl.where(blocked, float("-inf"), s)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A row whose keys so far are all blocked keeps m = -inf; shift by 0 then so that
        # 2^(-inf - -inf) never produces NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * s_vk + dims[None, :] * s_vd, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m = m_new

    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    o = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (tl.where(empty, 0.0, m) + tl.log2(l_safe)) * 0.6931471805599453)  # ln 2
    row_off = ((split * B + b) * H + h).to(tl.int64) * Q + rows
    tl.store(o_ptr + row_off[:, None] * D + dims[None, :], o.to(o_ptr.dtype.element_ty),
             mask=row_valid[:, None] & dim_valid[None, :])
    tl.store(lse_ptr + row_off, lse, mask=row_valid)


@triton.jit
def _masked_attention_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, logits_ptr, row_open_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kk, s_kd,
    s_vb, s_vh, s_vk, s_vd,
    s_lb, s_lq, s_lk,
    s_ob, s_oh, s_oq, s_od,
    H, Q, K, D, qk_scale_log2, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (head, key block, batch) program: dk, dv of its keys, summed over every query.

    lse and delta (= rowsum(dO * O)) are contiguous B x H x Q fp32; dk, dv contiguous B x H x K x D.
    """
    h = tl.program_id(0)
    pid_k = tl.program_id(1)
    b = tl.program_id(2)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    col_valid = cols < K
    dim_valid = dims < D
    kv_mask = col_valid[:, None] & dim_valid[None, :]

    bh = b.to(tl.int64) * H + h
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    l_base = logits_ptr + b.to(tl.int64) * s_lb
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    k = tl.load(k_base + cols[:, None] * s_kk + dims[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + cols[:, None] * s_vk + dims[None, :] * s_vd, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_K, BLOCK_D], tl.float32)
    for start in range(0, Q, BLOCK_Q):
        rows = start + tl.arange(0, BLOCK_Q)
        row_valid = rows < Q
        q_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(q_base + rows[:, None] * s_qq + dims[None, :] * s_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * s_oq + dims[None, :] * s_od, mask=q_mask, other=0.0)
        lse = tl.load(lse_ptr + bh * Q + rows, mask=row_valid, other=0.0)
        delta = tl.load(delta_ptr + bh * Q + rows, mask=row_valid, other=0.0)
        row_open = tl.load(row_open_ptr + b * Q + rows, mask=row_valid, other=0)
        x = tl.load(l_base + rows[:, None] * s_lq + cols[None, :] * s_lk,
                    mask=row_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2
        blocked = ((x < 0) & (row_open[:, None] > 0)) | (~col_valid[None, :]) | (~row_valid[:, None])
        p = tl.where(blocked, 0.0, tl.exp2(s - lse[:, None] * 1.4426950408889634))
        dv += _dot(tl.trans(p.to(do.dtype)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(q.dtype)), q, PRECISION, UPCAST)

    out_off = (bh * K + cols)[:, None] * D + dims[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _masked_attention_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, logits_ptr, row_open_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    s_qb, s_qh, s_qq, s_qd,
    s_kb, s_kh, s_kk, s_kd,
    s_vb, s_vh, s_vk, s_vd,
    s_lb, s_lq, s_lk,
    s_ob, s_oh, s_oq, s_od,
    B, H, Q, K, D, keys_per_split, qk_scale_log2, scale,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One (head, query block, key split, batch) program: the split's share of dq, written to
    dq[split, b, h, rows] (contiguous S x B x H x Q x D)."""
    h = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2) // B
    b = tl.program_id(2) % B
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    dims = tl.arange(0, BLOCK_D)
    row_valid = rows < Q
    dim_valid = dims < D
    q_mask = row_valid[:, None] & dim_valid[None, :]

    bh = b.to(tl.int64) * H + h
    k_base = k_ptr + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = v_ptr + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh
    l_base = logits_ptr + b.to(tl.int64) * s_lb
    q_base = q_ptr + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = do_ptr + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh
    q = tl.load(q_base + rows[:, None] * s_qq + dims[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * s_oq + dims[None, :] * s_od, mask=q_mask, other=0.0)
    lse = tl.load(lse_ptr + bh * Q + rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + bh * Q + rows, mask=row_valid, other=0.0)
    row_open = tl.load(row_open_ptr + b * Q + rows, mask=row_valid, other=0)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    k_start = split * keys_per_split
    k_end = tl.minimum(k_start + keys_per_split, K)
    for start in range(k_start, k_end, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_valid = cols < k_end
        kv_mask = col_valid[:, None] & dim_valid[None, :]
        k = tl.load(k_base + cols[:, None] * s_kk + dims[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vk + dims[None, :] * s_vd, mask=kv_mask, other=0.0)
        x = tl.load(l_base + rows[:, None] * s_lq + cols[None, :] * s_lk,
                    mask=row_valid[:, None] & col_valid[None, :], other=0.0).to(tl.float32)
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale_log2
        blocked = ((x < 0) & (row_open[:, None] > 0)) | (~col_valid[None, :]) | (~row_valid[:, None])
        p = tl.where(blocked, 0.0, tl.exp2(s - lse[:, None] * 1.4426950408889634))
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, PRECISION, UPCAST)

    row_off = ((split * B + b) * H + h).to(tl.int64) * Q + rows
    tl.store(dq_ptr + row_off[:, None] * D + dims[None, :], (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


# ----------------------------------------------------------------------------------------------------
# Launchers: allocate, pick blocks / splits / grid.
# ----------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _precision(dtype: torch.dtype) -> str:
    # fp32 follows torch's own matmul policy (TF32 only when the user allowed it); fp16/bf16 products
    # are exact in fp32 so the setting does not apply to them, except under the interpreter's upcast.
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 or _upcast(dtype):
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=None)
def _shared_limit(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).shared_memory_per_block_optin


def _device_shared(device: torch.device) -> int:
    if device.type != "cuda":
        return A100_SHARED_BYTES
    return _shared_limit(device.index if device.index is not None else torch.cuda.current_device())


def _fit_shared(loop_block: int, other_block: int, block_d: int, resident: int, itemsize: int,
                logit_itemsize: int, limit: int) -> int:
    """The looped block, halved (tl.dot needs >= 16) until the kernel's estimated shared memory fits `limit`.

    The kernel's loop loads two loop_block x block_d operands and a loop_block x other_block logits tile
    (NUM_STAGES copies in flight); `resident` other_block x block_d operands are loaded once. The estimate
    is a model, not Triton's allocation: scripts/triton_compile_check.py compiles the launches and checks
    the real figure (fp32 with TF32 at D = 128 needs the dkdv kernel's query block halved on an A100)."""
    fixed = resident * other_block * block_d * itemsize
    while loop_block > 16:
        looped = loop_block * (2 * block_d * itemsize + other_block * logit_itemsize)
        if NUM_STAGES * looped + fixed <= limit:
            break
        loop_block //= 2
    return loop_block


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _blocks(Q: int, D: int, block_q: int | None, block_k: int | None) -> tuple[int, int, int]:
    # tl.dot needs every dimension >= 16; 64 x 64 tiles keep registers modest for D <= 128.
    block_d = max(16, triton.next_power_of_2(D))
    if block_q is None:
        block_q = min(64, max(16, triton.next_power_of_2(Q)))
    if block_k is None:
        block_k = 64 if block_d <= 64 else 32
    return block_q, block_k, block_d


def _splits(device: torch.device, programs: int, K: int, block_k: int, num_splits: int | None
            ) -> tuple[int, int]:
    """(num_splits, keys_per_split): enough key splits for about two programs per SM, each split at
    least 4 key blocks long so the partial outputs stay small next to the keys they summarise."""
    k_blocks = triton.cdiv(K, block_k)
    if num_splits is None:
        sms = 1  # CPU: the interpreter, one program at a time
        if device.type == "cuda":
            sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
        num_splits = max(1, min(triton.cdiv(2 * sms, programs), k_blocks // 4))
    blocks_per_split = triton.cdiv(k_blocks, max(1, min(num_splits, k_blocks)))
    keys_per_split = blocks_per_split * block_k
    return triton.cdiv(K, keys_per_split), keys_per_split


def masked_attention_row_open(mask_logits: torch.Tensor) -> torch.Tensor:
    """B x Q int32: 1 where row i has at least one open key (logit not < 0), 0 where it is fully blocked."""
    B, Q, K = mask_logits.shape
    row_open = torch.zeros(B, Q, dtype=torch.int32, device=mask_logits.device)
    block_q, block_k = 32, 128
    grid = (triton.cdiv(K, block_k), triton.cdiv(Q, block_q), B)
    with cuda_device_guard(mask_logits.device):
        _masked_attention_rows_kernel[grid](
            mask_logits, row_open, Q, K, *mask_logits.stride(), BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=4)
    return row_open


def _combine_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, dtype: torch.dtype):
    """Merge S x B x H x Q x D partial outputs weighted by their S x B x H x Q log-sum-exps."""
    lse = torch.logsumexp(lse_parts, dim=0)  # B x H x Q; finite: every row has an unblocked key
    weights = torch.exp(lse_parts - lse)  # S x B x H x Q, 0 for splits whose keys were all blocked
    return (weights.unsqueeze(-1) * o_parts).sum(0).to(dtype), lse


def masked_attention_forward(q, k, v, mask_logits, *, block_q=None, block_k=None, num_splits=None):
    """Launch the forward. Inputs as `masked_attention` (already validated; any strides).

    Returns (out B x H x Q x D contiguous in q's dtype, lse B x H x Q fp32 natural log-sum-exp,
    row_open B x Q int32).
    """
    B, H, Q, D = q.shape
    K = k.shape[2]
    block_q, block_k, block_d = _blocks(Q, D, block_q, block_k)
    # loops over key blocks (k, v, logits); q stays
    block_k = _fit_shared(block_k, block_q, block_d, 1, q.element_size(), mask_logits.element_size(),
                                  _device_shared(q.device))
    q_blocks = triton.cdiv(Q, block_q)
    num_splits, keys_per_split = _splits(q.device, B * H * q_blocks, K, block_k, num_splits)
    row_open = masked_attention_row_open(mask_logits)
    if num_splits == 1:  # write straight into the output
        o = torch.empty(1, B, H, Q, D, dtype=q.dtype, device=q.device)
    else:
        o = torch.empty(num_splits, B, H, Q, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(num_splits, B, H, Q, dtype=torch.float32, device=q.device)
    grid = (H, q_blocks, num_splits * B)
    with cuda_device_guard(q.device):
        _masked_attention_fwd_kernel[grid](
            q, k, v, mask_logits, row_open, o, lse,
            *q.stride(), *k.stride(), *v.stride(), *mask_logits.stride(),
            B, H, Q, K, D, keys_per_split, D ** -0.5 * LOG2E,
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=_precision(q.dtype),
            UPCAST=_upcast(q.dtype), num_warps=4, num_stages=NUM_STAGES,
        )
    if num_splits == 1:
        return o[0], lse[0], row_open
    out, lse = _combine_splits(o, lse, q.dtype)
    return out, lse, row_open


def masked_attention_backward(grad_out, q, k, v, mask_logits, out, lse, row_open, *,
                              block_q=None, block_k=None, num_splits=None):
    """Launch the backward. Returns (dq, dk, dv), contiguous, in the inputs' dtype."""
    B, H, Q, D = q.shape
    K = k.shape[2]
    block_q, block_k, block_d = _blocks(Q, D, block_q, block_k)
    fit = functools.partial(_fit_shared, block_d=block_d, itemsize=q.element_size(),
                            logit_itemsize=mask_logits.element_size(), limit=_device_shared(q.device))
    precision = _precision(q.dtype)
    qk_scale_log2 = D ** -0.5 * LOG2E
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # B x H x Q: rowsum(dO * O)
    lse = lse.contiguous()

    dk = torch.empty(B, H, K, D, dtype=k.dtype, device=k.device)
    dv = torch.empty(B, H, K, D, dtype=v.dtype, device=v.device)
    dkdv_block_q = fit(block_q, block_k, resident=2)  # loops over query blocks (q, dO, logits); k, v stay
    with cuda_device_guard(q.device):
        _masked_attention_bwd_dkdv_kernel[(H, triton.cdiv(K, block_k), B)](
            q, k, v, mask_logits, row_open, grad_out, lse, delta, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *mask_logits.stride(), *grad_out.stride(),
            H, Q, K, D, qk_scale_log2, D ** -0.5,
            BLOCK_Q=dkdv_block_q, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision,
            UPCAST=_upcast(q.dtype), num_warps=4, num_stages=NUM_STAGES,
        )

    block_k = fit(block_k, block_q, resident=2)  # loops over key blocks (k, v, logits); q, dO stay
    q_blocks = triton.cdiv(Q, block_q)
    num_splits, keys_per_split = _splits(q.device, B * H * q_blocks, K, block_k, num_splits)
    dq_dtype = q.dtype if num_splits == 1 else torch.float32
    dq = torch.empty(num_splits, B, H, Q, D, dtype=dq_dtype, device=q.device)
    with cuda_device_guard(q.device):
        _masked_attention_bwd_dq_kernel[(H, q_blocks, num_splits * B)](
            q, k, v, mask_logits, row_open, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *mask_logits.stride(), *grad_out.stride(),
            B, H, Q, K, D, keys_per_split, qk_scale_log2, D ** -0.5,
            BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=block_d, PRECISION=precision, UPCAST=_upcast(q.dtype),
            num_warps=4, num_stages=NUM_STAGES,
        )
    dq = dq[0] if num_splits == 1 else dq.sum(0).to(q.dtype)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------
# Autograd + functional.
# ----------------------------------------------------------------------------------------------------


class MaskedAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_logits, tuning):
        out, lse, row_open = masked_attention_forward(q, k, v, mask_logits, **tuning)
        ctx.save_for_backward(q, k, v, mask_logits, out, lse, row_open)
        ctx.tuning = tuning
        return out

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk, dv = masked_attention_backward(grad_out, *ctx.saved_tensors, **ctx.tuning)
        return dq, dk, dv, None, None


def masked_attention(q, k, v, mask_logits, *, block_q=None, block_k=None, num_splits=None):
    """Masked cross-attention on the Triton kernels (GPU, or CPU under TRITON_INTERPRET=1).

    Args:
        q: B x H x Q x D; k, v: B x H x K x D (fp16, bf16 or fp32, one dtype).
        mask_logits: B x Q x K float, shared by all heads; see the module docstring for the rule.
        block_q, block_k, num_splits: tuning overrides (tests use them to reach the multi-block and
            split-key paths at tiny sizes); None picks the heuristics.
    Returns:
        B x H x Q x D in q's dtype. Inputs are not validated here: `cropformer.ops.masked_cross_attention`
        does that.
    """
    tuning = dict(block_q=block_q, block_k=block_k, num_splits=num_splits)
    return MaskedAttentionFunction.apply(q, k, v, mask_logits, tuning)
