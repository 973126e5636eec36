"""Benchmark: what the checkpoint checksums cost (`python -m pytest -m bench tests/bench/test_bench_checksum.py -s`).

Payloads: the Swin-T CropFormer weights (`cropformer_swin_tiny_3x`, ~0.2 GB fp32) as a `.safetensors`
export, and a training checkpoint of the same model (weights + AdamW's two moments, ~0.6 GB) as a
`.pth`. Files live in a temporary folder, so reads come from the page cache (the worst case for the
checksum's share: on a cold disk the read dominates).

Timed, interleaved, median of `REPEATS`:
- ``digest``: `content_digest` of the payload (CRC-32 of every tensor on a few threads), and, for
  the choice of CRC-32, SHA-256 over the same bytes on one thread;
- ``crc``: checking a zip's CRC-32s (`_zip_problem`, what official `.pth` files get);
- save and load with the checksum (`save_training_checkpoint` / `load_training_checkpoint`,
  `save_weights` / `_read_safetensors`) against the same writes and reads without it (`atomic_write`
  of a plain `torch.save` / `safetensors.save_file`; `torch.load(weights_only=True)` / `safe_open`).
Reported as ms per GB of tensor bytes and as the checksum's share of the load and save. The load
average is recorded with each result (the machine is shared).
"""
from __future__ import annotations

import hashlib
import os
import statistics
import time

import pytest
import torch

from cropformer.checkpoint import (
    _read_safetensors,
    _zip_problem,
    atomic_write,
    content_digest,
    load_training_checkpoint,
    save_training_checkpoint,
    save_weights,
)
from cropformer.config import load_config
from cropformer.modeling.build import build_model
from tests.bench.common import record

REPEATS = 5


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _sha256_one_thread(state: dict) -> str:
    h = hashlib.sha256()
    for t in state.values():
        h.update(t.contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _interleaved_medians(fns: dict) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns (so that a change in the machine's
    load hits all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


@pytest.mark.bench
def test_bench_checksum_cost(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("cropformer_swin_tiny_3x")
    state = {k: v.detach().clone() for k, v in build_model(cfg.model).state_dict().items()}
    params = [v for v in state.values() if v.is_floating_point()]
    payload = {"model": state, "optimizer": {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.randn_like(p),
                                                          "exp_avg_sq": torch.rand_like(p)} for i, p in enumerate(params)},
                                             "param_groups": [{"lr": 1e-4, "params": list(range(len(params)))}]},
               "scheduler": {"last_epoch": 1}, "iteration": 1, "rng": [], "world_size": 1}
    ckpt, plain = tmp_path / "last_checkpoint.pth", tmp_path / "plain.pth"
    weights, plain_weights = tmp_path / "w.safetensors", tmp_path / "plain.safetensors"

    def plain_safetensors_save():
        from safetensors.torch import save_file

        atomic_write(plain_weights, lambda tmp: save_file({k: v.contiguous() for k, v in state.items()}, tmp))

    def plain_safetensors_load():
        from safetensors import safe_open

        with safe_open(str(plain_weights), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    timings = {
        "training": {
            "digest": lambda: content_digest(payload),
            "sha256_one_thread": lambda: _sha256_one_thread({str(i): t for i, t in enumerate(_tensors(payload))}),
            "save": lambda: save_training_checkpoint(ckpt, payload),
            "save_plain": lambda: atomic_write(plain, lambda tmp: torch.save(payload, tmp)),
            "load": lambda: load_training_checkpoint(ckpt),
            "load_plain": lambda: torch.load(plain, map_location="cpu", weights_only=True),
            "crc": lambda: _zip_problem(plain),
        },
        "weights": {
            "digest": lambda: content_digest({"metadata": {}, "tensors": state}),
            "sha256_one_thread": lambda: _sha256_one_thread(state),
            "save": lambda: save_weights(state, weights, cfg),
            "save_plain": plain_safetensors_save,
            "load": lambda: _read_safetensors(weights),
            "load_plain": plain_safetensors_load,
        },
    }
    for kind, fns in timings.items():
        gb = _nbytes(payload if kind == "training" else state) / 1e9
        for fn in fns.values():  # warm-up: files written, page cache filled
            fn()
        medians = _interleaved_medians(fns)
        rec = {"payload": f"swin_t_{kind}", "gb": round(gb, 3), "load_avg": round(os.getloadavg()[0], 1),
               "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               **{f"{name}_ms_per_gb": round(1000 * s / gb, 1) for name, s in medians.items()},
               "load_overhead_pct": round(100 * (medians["load"] - medians["load_plain"]) / medians["load_plain"], 1),
               "save_overhead_pct": round(100 * (medians["save"] - medians["save_plain"]) / medians["save_plain"], 1)}
        rec = record("checksum", rec)
        print(rec)
        assert medians["digest"] > 0


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
