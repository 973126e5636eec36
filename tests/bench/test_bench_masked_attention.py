"""Benchmarks of masked cross-attention at the decoder shapes of a 1024 x 1024 input (`pytest -m bench`).

Shapes: B = 2 images, Q = 200 queries, 8 heads of D = 32 (d_model 256); the image decoder attends to one
level of 32x32, 64x64 or 128x128 keys, the batch decoder to T = 5 views of the 1/8 level (5 x 128 x 128).

Baselines, in the same run:
- ``sdpa_dense``: what the decoders did before this op, the block mask expanded per head (B x H x Q x K
  bool, as Mask2Former's ``repeat`` over heads) and handed to `F.scaled_dot_product_attention`.
- ``sdpa_bcast`` (GPU): the same bool mask broadcast over heads (B x 1 x Q x K), not expanded.
- ``flex`` (GPU, where FlexAttention exists): compiled `flex_attention` with a BlockMask built from the
  B x Q x K bool mask each call (the mask changes every layer, so building it is part of the cost).
- ``torch``: `masked_cross_attention_ref` (chunked over queries, recomputed in backward).

Ours is ``triton`` on a GPU and ``cpu`` on CPU (what ``auto`` picks: SDPA with the mask broadcast over
heads); `ratio` = backend median / ours (> 1: ours faster).
Work per call: forward 4 * B*H*Q*K*D FLOP (two matmuls), backward 2.5x that (flash-attention
convention, not counting the recomputed scores), so forward + backward 3.5x; minimum traffic: read q,
k, v and the B x Q x K logits once and write the output (backward: also read o, dO, the logits again
and write dq, dk, dv).

Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the inputs; on CPU the profiler's record of
c10's CPU allocator (`profile_memory=True`: every tensor allocation and free, with a running total), so
it counts tensor storages but not scratch that MKL/oneDNN allocate outside c10.

Each record is appended as a JSON line to $CROPFORMER_BENCH_OUT (default bench_results.jsonl).
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from cropformer.ops.masked_attention import attention_block_mask, masked_cross_attention, masked_cross_attention_ref
from tests.bench.common import peak_bytes, record

B, Q, H, D = 2, 200, 8, 32
IMAGE_LEVELS = {"32x32": 32 * 32, "64x64": 64 * 64, "128x128": 128 * 128}
BATCH_KEYS = 5 * 128 * 128  # T = 5 views at 1/8 of 1024


def sdpa_dense(q, k, v, mask_logits):
    """Baseline: block mask expanded per head (B x H x Q x K bool), then SDPA."""
    b, h, q_len, _ = q.shape
    allowed = ~attention_block_mask(mask_logits).unsqueeze(1).expand(b, h, q_len, k.shape[2]).contiguous()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def sdpa_bcast(q, k, v, mask_logits):
    """Baseline: the same bool mask broadcast over heads (B x 1 x Q x K)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~attention_block_mask(mask_logits).unsqueeze(1))


def _flex_or_none():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    compiled = torch.compile(flex_attention, dynamic=False)

    def flex(q, k, v, mask_logits):
        allowed = ~attention_block_mask(mask_logits)  # B x Q x K

        def mask_mod(b, h, q_idx, kv_idx):
            return allowed[b, q_idx, kv_idx]

        block_mask = create_block_mask(mask_mod, q.shape[0], None, q.shape[2], k.shape[2], device=q.device)
        return compiled(q, k, v, block_mask=block_mask)

    return flex


def make_inputs(keys, dtype, device, requires_grad, density=0.3, seed=0):
    """Decoder-like inputs; `density` of the keys open per row, some rows fully blocked."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g).to(device, dtype)
    k = torch.randn(B, H, keys, D, generator=g).to(device, dtype)
    v = torch.randn(B, H, keys, D, generator=g).to(device, dtype)
    mask_logits = (density - torch.rand(B, Q, keys, generator=g)).to(device, dtype)
    mask_logits[:, ::17] = -1.0  # fully blocked rows (they attend everywhere)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, mask_logits


def _step(fn, inputs, mode):
    q, k, v, m = inputs
    if mode == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v, m)
    else:
        grad = torch.randn(B, H, Q, D, device=q.device, dtype=q.dtype)

        def run():
            for t in (q, k, v):
                t.grad = None
            fn(q, k, v, m).backward(grad)
    return run


def _time_ms(run, device, repeats):
    """(median, lo, hi) ms: 20% / 80% quantiles of triton's do_bench on CUDA, min / max of `repeats`
    runs after one warm-up on CPU."""
    if device.type == "cuda":
        import triton.testing

        med, lo, hi = triton.testing.do_bench(run, quantiles=[0.5, 0.2, 0.8])
        return med, lo, hi
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times), max(times)


def _work(keys, mode, elem):
    flops = 4 * B * H * Q * keys * D * (1 if mode == "fwd" else 3.5)
    qo = B * H * Q * D * elem
    kv = B * H * keys * D * elem
    logits = B * Q * keys * elem
    traffic = 2 * qo + 2 * kv + logits if mode == "fwd" else 5 * qo + 4 * kv + 2 * logits
    return flops, traffic


def _run_case(label, keys, mode, device, dtype, backends, ours, repeats, with_time=True):
    inputs = make_inputs(keys, dtype, device, requires_grad=(mode != "fwd"))
    flops, traffic = _work(keys, mode, torch.finfo(dtype).bits // 8)
    results = {}
    for name, fn in backends.items():
        run = _step(fn, inputs, mode)
        peak = peak_bytes(run, device)
        med, lo, hi = _time_ms(run, device, repeats) if with_time else (float("nan"),) * 3
        results[name] = dict(median_ms=med, lo_ms=lo, hi_ms=hi, peak_mem=peak)
    base = results[ours]["median_ms"]
    print(f"\nmasked_cross_attention {label} {mode} {device.type} {dtype}: B={B} H={H} Q={Q} K={keys} D={D}, "
          f"{flops / 1e9:.2f} GFLOP, >= {traffic / 1e6:.1f} MB traffic")
    for name, r in results.items():
        ratio = r["median_ms"] / base
        print(f"  {name:11s} {r['median_ms']:10.3f} ms  ratio {ratio:6.2f}  peak {r['peak_mem'] / 2**20:9.1f} MiB  "
              f"{flops / r['median_ms'] / 1e6:8.1f} GFLOP/s  {traffic / r['median_ms'] / 1e6:8.2f} GB/s")
        record("masked_cross_attention", dict(shape=dict(B=B, H=H, Q=Q, K=keys, D=D, level=label), mode=mode, backend=name,
                     ours=ours, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     dtype=str(dtype), ratio=ratio, flops=flops, min_bytes=traffic, **r))
    return results


CPU_BACKENDS = {
    "cpu": lambda q, k, v, m: masked_cross_attention(q, k, v, m, backend="cpu"),
    "torch": masked_cross_attention_ref,
    "sdpa_dense": sdpa_dense,
}
CASES = [(name, keys) for name, keys in IMAGE_LEVELS.items()] + [("batch_5x128x128", BATCH_KEYS)]


@pytest.mark.bench
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("label,keys", CASES, ids=[c[0] for c in CASES])
def test_bench_masked_attention_gpu(label, keys, dtype, mode):
    from tests.conftest import cuda_or_skip

    device = cuda_or_skip()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.skip("TRITON_INTERPRET=1 would time the interpreter; run with TRITON_INTERPRET=0")
    backends = {
        "triton": lambda q, k, v, m: masked_cross_attention(q, k, v, m, backend="triton"),
        "sdpa_dense": sdpa_dense,
        "sdpa_bcast": sdpa_bcast,
        "torch": masked_cross_attention_ref,
    }
    flex = _flex_or_none()
    if flex is not None:
        backends["flex"] = flex
    results = _run_case(label, keys, mode, device, dtype, backends, "triton", repeats=0)
    assert results["triton"]["peak_mem"] < results["sdpa_dense"]["peak_mem"]


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("label,keys", list(IMAGE_LEVELS.items()), ids=list(IMAGE_LEVELS))
def test_bench_masked_attention_cpu(label, keys, mode):
    """CPU timings (fp32) of the "cpu" path and the reference against the dense-mask composition."""
    _run_case(label, keys, mode, torch.device("cpu"), torch.float32, CPU_BACKENDS, "cpu", repeats=3)


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bench_masked_attention_cpu_peak_memory_batch_decoder(mode):
    """The peak memory of the reference and of the "cpu" path is below the dense-mask composition at the
    batch decoder's shape (T = 5 views at 1/8 of 1024: K = 81920), measured with the profiler's
    allocator record; one timed run each."""
    results = _run_case("batch_5x128x128", BATCH_KEYS, mode, torch.device("cpu"), torch.float32, CPU_BACKENDS,
                        "cpu", repeats=1)
    dense_mask_bytes = B * H * Q * BATCH_KEYS  # the expanded bool mask alone
    print(f"  expanded bool mask alone: {dense_mask_bytes / 2**20:.1f} MiB; "
          f"fp32 scores B*H*Q*K: {4 * dense_mask_bytes / 2**20:.1f} MiB")
    assert results["torch"]["peak_mem"] < results["sdpa_dense"]["peak_mem"]
    assert results["cpu"]["peak_mem"] < results["sdpa_dense"]["peak_mem"]
