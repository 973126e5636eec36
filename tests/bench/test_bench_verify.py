"""Cost of `auto`'s self-verification (cropformer.ops._dispatch.verify), per op and device.

Each measurement is a fresh process (the verdict is remembered per process): the op first runs once with
the backend `auto` will pick, named explicitly (its own one-time costs: imports, first dispatch, Triton
compilation), then the first `auto` call is timed with CROPFORMER_VERIFY=off, =on (the self-test runs)
and =on with the verdict already on disk; then the per-call cost of a verified backend. Medians of 3.

    python -m pytest -m bench tests/bench/test_bench_verify.py -s
"""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.bench.common import record
from tests.conftest import cuda_or_skip

MODES = ("off", "on", "on-cached")


def _child(op: str, device: str) -> dict:
    import torch

    from cropformer.ops import _dispatch
    from cropformer.ops.masked_attention import masked_cross_attention
    from cropformer.ops.ms_deform_attn import ms_deform_attn

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    if op == "ms_deform_attn":  # a pixel-decoder-like head count and D, small levels
        fn, args = ms_deform_attn, (torch.randn(2, 42, 8, 32, generator=g), torch.tensor([[5, 7], [3, 2], [1, 1]]),
                                    torch.tensor([0, 35, 41]), torch.rand(2, 100, 8, 3, 4, 2, generator=g),
                                    torch.rand(2, 100, 8, 3, 4, generator=g))
    else:  # one decoder layer's attention: 100 queries over a 20 x 20 feature map
        fn, args = masked_cross_attention, (torch.randn(2, 8, 100, 32, generator=g),
                                            torch.randn(2, 8, 400, 32, generator=g),
                                            torch.randn(2, 8, 400, 32, generator=g),
                                            torch.randn(2, 100, 400, generator=g))
    args = [a.to(dev) for a in args]
    backend = _dispatch.explain(op, dev, torch.float32)["backend"]

    def timed(**kw):
        start = time.perf_counter()
        fn(*args, **kw)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(backend=backend)  # the op's own first-call costs
    first = timed()
    start = time.perf_counter()
    for _ in range(10000):
        _dispatch.verify(op, backend, dev, torch.float32)
    lookup = (time.perf_counter() - start) / 10000
    return {"backend": backend, "first_auto_ms": 1e3 * first, "lookup_us": 1e6 * lookup}


def _measure(op: str, device: str, mode: str, cache: str) -> dict:
    env = dict(os.environ, CROPFORMER_CACHE_DIR=cache, CROPFORMER_VERIFY=mode.split("-")[0])
    code = f"import json, tests.bench.test_bench_verify as b; print(json.dumps(b._child({op!r}, {device!r})))"
    runs = 2 if mode == "on-cached" else 1  # the first run writes the verdict the second one reads
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.bench
@pytest.mark.parametrize("op", ["ms_deform_attn", "masked_cross_attention"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bench_verification_cost(op, device, tmp_path):
    if device == "cuda":
        cuda_or_skip()
    results = {}
    for mode in MODES:
        runs = [_measure(op, device, mode, str(tmp_path / f"{mode}-{i}")) for i in range(3)]
        results[mode] = {k: sorted(r[k] for r in runs)[1] for k in ("first_auto_ms", "lookup_us")}
    backend = runs[0]["backend"]
    rec = record("verify_cost", {"what": op, "device": device, "backend": backend, "load": os.getloadavg()[0],
                                 **{f"{m}_{k}": round(v, 2) for m, r in results.items() for k, v in r.items()}})
    print(json.dumps(rec))
    if backend != "torch":
        # a verdict on disk must spare the test: the first call then costs about what it costs with the check off
        assert results["on-cached"]["first_auto_ms"] < results["on"]["first_auto_ms"]
