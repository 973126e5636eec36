"""Helpers shared by the benchmarks: one way to stamp and append a record, one way to measure peak memory."""
from __future__ import annotations

import datetime
import json
import os
import tempfile

import torch


def record(op: str, rec: dict) -> dict:
    """Stamp `rec` with op, date, device name and versions, and append it as a JSON line to
    $CROPFORMER_BENCH_OUT (default bench_results.jsonl). Returns the stamped record."""
    rec = {"op": op, **rec}
    rec.setdefault("device", "cpu")
    rec.update(date=datetime.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__)
    if rec["device"].startswith("cuda") and torch.cuda.is_available():
        rec["device_name"] = torch.cuda.get_device_name()
    try:
        import triton

        rec["triton"] = triton.__version__
    except ImportError:
        pass
    with open(os.environ.get("CROPFORMER_BENCH_OUT", "bench_results.jsonl"), "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded: every CPU record carries them at its start and end."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_peak_bytes(fn) -> int:
    """Peak bytes held by tensors allocated while `fn()` runs on CPU, from the profiler's allocator
    events ("Total Allocated" is c10's running total; the first event gives the level before)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]"]
    if not mem:
        return 0
    before = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(m["Total Allocated"] for m in mem) - before


def peak_bytes(run, device: torch.device) -> int:
    """Peak tensor memory of `run()` above what was allocated before, on CUDA or CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return cpu_peak_bytes(run)
