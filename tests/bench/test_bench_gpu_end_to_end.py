"""GPU end to end, Swin-T CropFormer (`pytest -m "gpu and bench"`, run by scripts/gpu_suite.sh):

- inference: `Segmenter.segment` latency (median, p90 of a few runs after a warm-up) and peak memory per
  inference mode (paper Table 7) on an 800 x 1200 image (the 800-px test scale) and a 4000 x 3000 image;
- training: iterations/s and peak memory of `engine.train_one_iter` at the config's batch (2 per GPU, the
  paper's 16 over 8 GPUs) on synthetic entity images, with the fused kernels (every op on "auto") and
  without (every op on its torch reference), on the same batches.

Random initial weights: the network's cost is that of a trained one; the paste's cost depends on how many
queries are on where, so full-resolution inference with trained weights may differ. Each record is a JSON
line in $CROPFORMER_BENCH_OUT (tests/bench/common.py).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

from cropformer.config import load_config
from cropformer.modeling.build import build_model
from tests.bench.common import record
from tests.conftest import cuda_or_skip

SIZES = {"800x1200": (800, 1200), "3000x4000": (3000, 4000)}  # H x W


def _timed(fn, device, repeats: int) -> tuple[list[float], int]:
    """Seconds of `repeats` runs after one warm-up, and the peak bytes allocated during them (weights,
    optimiser state and activations: what the GPU must hold)."""
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return times, torch.cuda.max_memory_allocated(device)


@pytest.fixture(scope="module")
def swin_t():
    device = cuda_or_skip()
    torch.manual_seed(0)
    cfg = load_config("cropformer_swin_tiny_3x")
    return cfg, build_model(cfg.model).to(device).eval()


@pytest.mark.bench
@pytest.mark.gpu
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("mode", ["full_crops", "full_batch", "full_image", "crops", "single"])
def test_bench_segment_gpu(swin_t, mode, size):
    from cropformer.inference import Segmenter

    cfg, model = swin_t
    device = next(model.parameters()).device
    H, W = SIZES[size]
    image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    seg = Segmenter(model, cfg, mode=mode)
    with torch.no_grad():
        times, peak = _timed(lambda: seg.segment(image), device, repeats=3)
    ms = sorted(t * 1e3 for t in times)
    print(f"\nsegment Swin-T {mode} {size}: median {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms, "
          f"peak {peak / 2**20:.0f} MiB")
    record("segment_e2e", {"model": "cropformer_swin_tiny_3x (random init)", "mode": mode, "image": size,
                           "device": "cuda", "median_ms": statistics.median(ms), "max_ms": ms[-1],
                           "runs": len(ms), "peak_mib": peak / 2**20})


def _use_torch_references(*modules: torch.nn.Module) -> None:
    """Every op of the model and the criterion on its torch reference (no fused kernel)."""
    for root in modules:
        for m in root.modules():
            for attr in ("backend", "attn_backend", "msda_backend"):
                if isinstance(getattr(m, attr, None), str):
                    setattr(m, attr, "torch")


@pytest.mark.bench
@pytest.mark.gpu
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "torch"])
def test_bench_train_gpu(tmp_path_factory, fused):
    from cropformer.data.synthetic import make_synthetic_dataset
    from cropformer.engine import (amp_settings, build_optimizer, build_scheduler, make_train_loader, move_batch,
                                   seed_everything, train_one_iter)
    from cropformer.losses import build_criterion

    device = cuda_or_skip()
    root = tmp_path_factory.getbasetemp() / "bench_train_data"
    if not (root / "annotations.json").exists():
        make_synthetic_dataset(root, 8, (600, 800), seed=0)
    cfg = load_config("cropformer_swin_tiny_3x", [
        f"data.train_json=\"{root / 'annotations.json'}\"", f"data.train_images=\"{root / 'images'}\"",
        "solver.ims_per_batch=2", "data.num_workers=2", f"output_dir=\"{tmp_path_factory.mktemp('out')}\""])
    seed_everything(0)
    model = build_model(cfg.model).to(device).train()
    criterion = build_criterion(cfg)
    if not fused:
        _use_torch_references(model, criterion)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_scheduler(optimizer, cfg.solver)
    amp_on, amp_dtype = amp_settings(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp_on and amp_dtype == torch.float16 else None
    batches = [move_batch(b, device) for b, _ in zip(make_train_loader(cfg, rank=0, world_size=1, start_iter=0),
                                                     range(6))]
    step = iter(range(10**6))

    def one_iter():
        train_one_iter(model, criterion, optimizer, scheduler, scaler, batches[next(step) % len(batches)], cfg,
                       amp_dtype)

    times, peak = _timed(one_iter, device, repeats=8)
    its = 1.0 / statistics.median(times)
    print(f"\ntrain Swin-T batch 2 ({'fused kernels' if fused else 'torch references'}): {its:.2f} it/s, "
          f"peak {peak / 2**20:.0f} MiB")
    record("train_e2e", {"model": "cropformer_swin_tiny_3x", "kernels": "fused (auto)" if fused else "torch",
                         "batch": 2, "amp": str(amp_dtype), "device": "cuda", "it_per_s": its,
                         "median_s": statistics.median(times), "peak_mib": peak / 2**20})
