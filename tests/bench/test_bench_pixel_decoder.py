"""End to end: the Swin-T pixel decoder (6 deformable encoder layers) at a 512 x 512 input, with
`ms_deform_attn` on the torch reference versus the fastest available backend, forward and forward+backward.

    python -m pytest -m bench tests/bench/test_bench_pixel_decoder.py -s
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from cropformer.config import load_config
from cropformer.modeling.build import build_model
from cropformer.ops.ms_deform_attn import _choose_backend
from tests.bench.common import record


def _set_backend(pixel_decoder, backend: str) -> None:
    for m in pixel_decoder.modules():
        if type(m).__name__ == "MSDeformAttn":
            m.backend = backend


@pytest.mark.bench
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bench_pixel_decoder(mode):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fast = _choose_backend("auto", device, torch.float32)
    if fast == "torch":
        pytest.skip("no fast ms_deform_attn backend here (build the extension)")
    torch.manual_seed(0)
    model = build_model(load_config("cropformer_swin_tiny_3x").model).to(device).eval()
    with torch.no_grad():
        feats = model.image_encoder(torch.randn(1, 3, 512, 512, device=device))
    pd = model.pixel_decoder

    def run():
        if mode == "fwd":
            with torch.no_grad():
                pd(feats)
        else:
            f = {k: v.detach().requires_grad_() for k, v in feats.items()}
            mask_features, multi_scale = pd(f)
            (mask_features.sum() + sum(m.sum() for m in multi_scale)).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = {"torch": [], fast: []}
    for _ in range(5):  # backends interleaved so load changes hit both
        for backend in times:
            _set_backend(pd, backend)
            t = time.perf_counter()
            run()
            times[backend].append(time.perf_counter() - t)
    med = {b: statistics.median(t[1:]) * 1e3 for b, t in times.items()}
    ratio = med["torch"] / med[fast]
    print(f"\npixel decoder Swin-T 512x512 {mode}: torch {med['torch']:.0f} ms, {fast} {med[fast]:.0f} ms -> {ratio:.2f}x")
    record("pixel_decoder", {"shape": "swin_t 1x3x512x512", "mode": mode, "backend": fast, "device": device.type,
                             "median_ms": med[fast], "ref_median_ms": med["torch"], "ratio": ratio})
    assert ratio > 1.0
