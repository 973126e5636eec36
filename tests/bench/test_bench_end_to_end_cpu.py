"""End-to-end CPU benchmarks (issue 15): ours against HuggingFace transformers' Mask2Former on the same
weights, the paper's full + 4 crops inference, and a training iteration idle and beside a busy process.

    python -m pytest -m bench tests/bench/test_bench_end_to_end_cpu.py -s

Take the numbers on an idle machine (`uptime` load under about 1.5): every record carries the load
average at its start and end. CROPFORMER_BENCH_REPS (default 3) sets the interleaved repetitions;
CROPFORMER_BENCH_QUICK=1 shrinks every size to check the benchmarks themselves in a minute.

Roofline: the model's FLOPs come from torch's flop counter (matmuls, convolutions, attention; the
deformable sampling, norms and elementwise work are not counted), per stage; the rate is the best of
2048 x 2048 matmuls timed before every round of the same run, in fp32 and bf16 (this VM's rate moves by up
to 2x between consecutive runs). "roofline" = counted FLOPs / time / that rate: the share of the
matmul rate the whole stage runs at.
"""
from __future__ import annotations

import copy
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from cropformer.allocator import tune_cpu_allocator
from cropformer.config import load_config
from cropformer.inference import Segmenter, bf16_support, matmul_rate
from cropformer.modeling.build import build_model
from cropformer.ops.rle import id_map_to_rle
from tests.bench.common import loadavg, record
from tests.conftest import REPO
from tests.paste_inputs import blob_logits, random_blobs

pytestmark = pytest.mark.bench

QUICK = os.environ.get("CROPFORMER_BENCH_QUICK", "") not in ("", "0")
REPS = int(os.environ.get("CROPFORMER_BENCH_REPS", "1" if QUICK else "3"))
SIZES = [(128, 160), (160, 224)] if QUICK else [(512, 512), (800, 1088)]
STAGES = ("backbone", "pixel decoder", "transformer decoder")
CONFIDENT_MASKS = float(os.environ.get("CROPFORMER_BENCH_MASK_SCALE", "20"))  # 1: the raw random model


class StageTimer:
    """Wall time of named submodules, summed over their calls (a CPU forward runs the backbone and the
    pixel decoder once per view), from forward pre/post hooks; `reset()` before each forward."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.times: dict[str, float] = {}
        self._start: dict[str, float] = {}
        for name, module in modules.items():
            module.register_forward_pre_hook(lambda m, a, name=name: self._start.__setitem__(name, time.perf_counter()))
            module.register_forward_hook(lambda m, a, o, name=name: self.times.__setitem__(
                name, self.times.get(name, 0.0) + time.perf_counter() - self._start[name]))

    def reset(self) -> None:
        self.times.clear()


def stage_flops(model: torch.nn.Module, images: torch.Tensor, **kwargs) -> dict[str, float]:
    """FLOPs per stage of our model (grad mode on: the flop counter's module tracker needs it)."""
    with FlopCounterMode(display=False) as counter:
        model(images, **kwargs)
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    parts = dict(zip(STAGES, ("image_encoder", "pixel_decoder", "image_decoder")))
    flops = {stage: float(counts.get(f"CropFormer.{name}", 0)) for stage, name in parts.items()}
    flops["whole"] = float(counts["Global"])
    return flops


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module", autouse=True)
def _our_allocator():
    """Every in-process measurement runs under the allocator setting that our tools, `Segmenter` and `train`
    make (HF shares the process, so it gets it too); `test_runtime_settings_inference_idle` and the training
    benchmark measure the setting itself, in fresh processes."""
    tune_cpu_allocator()


@pytest.fixture(scope="module")
def same_weights():
    """Swin-T Mask2Former: HF's with seeded random weights (norms perturbed), converted into ours."""
    pytest.importorskip("transformers", exc_type=ImportError)
    from tests.hf_reference import build_hf, load_hf_into_ours, randomise_

    cfg = load_config("mask2former_swin_tiny_3x")
    torch.manual_seed(0)
    ours = build_model(cfg.model).eval()
    hf = build_hf(cfg.model)
    randomise_(hf, seed=3)
    load_hf_into_ours(hf, ours)
    return ours, hf


def test_end_to_end_vs_huggingface(same_weights):
    """One view of Swin-T, ours (exact fp32 and, where the CPU has it, fast bf16) against HF's fp32
    forward, interleaved: per stage and whole, ratio, share of the matmul roofline, output agreement.

    "ours" makes every decoder layer's full-size mask logits, as HF's forward does; "ours_last" is what
    `Segmenter` runs (`masks="last"`: the final prediction's masks only, attention masks at each level's
    size), whose roofline share is taken over its own, smaller, FLOP count."""
    ours, hf = same_weights
    fast, why = bf16_support("cpu")
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16) if fast else None
    # This VM's matmul rate moves by up to 2x (a 1024^3 fp32 matmul measured 303, 163 and 307 GFLOP/s in three
    # consecutive runs), so one probe at the start can understate the roofline and inflate every share of it.
    # The roofline of a size is the best rate seen in probes before each of its rounds.
    def probe_rates() -> dict[str, float]:
        return {"fp32": matmul_rate(torch.float32, 2048, 3), "bf16": matmul_rate(torch.bfloat16, 2048, 3)}

    rates = probe_rates()
    timers = {
        "hf": StageTimer(dict(zip(STAGES, (hf.model.pixel_level_module.encoder, hf.model.pixel_level_module.decoder,
                                          hf.model.transformer_module)))),
        "ours": StageTimer(dict(zip(STAGES, (ours.image_encoder, ours.pixel_decoder, ours.image_decoder)))),
    }
    timers["ours_last"] = timers["ours"]
    if ours_bf16 is not None:
        timers["ours_bf16"] = StageTimer(dict(zip(STAGES, (ours_bf16.image_encoder, ours_bf16.pixel_decoder,
                                                           ours_bf16.image_decoder))))
    runners = {"hf": lambda x, imgs: hf(pixel_values=x), "ours": lambda x, imgs: ours(imgs),
               "ours_last": lambda x, imgs: ours(imgs, masks="last")}
    if ours_bf16 is not None:
        runners["ours_bf16"] = lambda x, imgs: ours_bf16(imgs)
    print(f"\nthreads {torch.get_num_threads()}, matmul at the start {rates['fp32']:.0f} GFLOP/s fp32, "
          f"{rates['bf16']:.0f} bf16; "
          f"bf16 fast mode: {why}")
    for H, W in SIZES:
        load0 = loadavg()
        images = torch.randint(0, 256, (1, 1, 3, H, W), generator=torch.Generator().manual_seed(H), dtype=torch.uint8)
        flops = stage_flops(ours, images)
        flops_last = stage_flops(ours, images, masks="last")
        with torch.no_grad():
            x = ours.preprocess(images)
            outs = {name: run(x, images) for name, run in runners.items()}  # warm-up, and the outputs compared
            times = {name: {s: [] for s in (*STAGES, "whole")} for name in runners}
            probes = []
            for _ in range(REPS):
                probes.append(probe_rates())
                for name, run in runners.items():
                    timers[name].reset()
                    t0 = time.perf_counter()
                    run(x, images)
                    times[name]["whole"].append(time.perf_counter() - t0)
                    for s in STAGES:
                        times[name][s].append(timers[name].times[s])
        med = {name: {s: statistics.median(v) for s, v in t.items()} for name, t in times.items()}
        agreement = {name + "_vs_hf": {"class": _rel(outs[name]["image"]["pred_logits"], outs["hf"].class_queries_logits),
                                       "mask": _rel(outs[name]["image"]["pred_masks"], outs["hf"].masks_queries_logits)}
                     for name in ("ours", "ours_last")}
        if ours_bf16 is not None:
            agreement["bf16_vs_hf"] = {"class": _rel(outs["ours_bf16"]["image"]["pred_logits"], outs["hf"].class_queries_logits),
                                       "mask": _rel(outs["ours_bf16"]["image"]["pred_masks"], outs["hf"].masks_queries_logits)}
        rates = {k: max(p[k] for p in probes) for k in ("fp32", "bf16")}
        rows = {}
        for name in runners:
            rate = rates["bf16" if name == "ours_bf16" else "fp32"]
            counted = flops_last if name == "ours_last" else flops
            rows[name] = {s: {"s": med[name][s], "vs_hf": med["hf"][s] / med[name][s],
                              "roofline": counted[s] / med[name][s] / (rate * 1e9)} for s in (*STAGES, "whole")}
        rec = record("end_to_end_vs_hf", {"size": [H, W], "threads": torch.get_num_threads(), "reps": REPS,
                                          "gflop": {k: v / 1e9 for k, v in flops.items()},
                                          "gflop_last": {k: v / 1e9 for k, v in flops_last.items()}, "matmul_gflops": rates,
                                          "matmul_gflops_probes": probes,
                                          "results": rows, "agreement": agreement, "loadavg": [load0, loadavg()]})
        fp32_probes = [p["fp32"] for p in probes]
        print(f"{H} x {W}: {rec['gflop']['whole']:.0f} GFLOP counted ({rec['gflop_last']['whole']:.0f} with masks='last'); "
              f"roofline {rates['fp32']:.0f} GFLOP/s fp32 (probes {min(fp32_probes):.0f}-{max(fp32_probes):.0f}), "
              f"{rates['bf16']:.0f} bf16; load {load0} -> {rec['loadavg'][1]}")
        print(f"  {'':12s}" + "".join(f"{s:>28s}" for s in (*STAGES, "whole")))
        for name, row in rows.items():
            print(f"  {name:12s}" + "".join(f"{row[s]['s']:8.3f} s {row[s]['vs_hf']:5.2f}x {100 * row[s]['roofline']:4.0f}%   "
                                            for s in (*STAGES, "whole")))
        print(f"  agreement (max |diff| / max |HF|): {json.dumps(agreement)}")
        # The issue's bound is 1e-4; this run measures ~1e-6. A change of last bits before the decoders
        # (a softmax computed another way: 7e-5 at 800 x 1088) flips masked-attention decisions and shows
        # as 1e-5 or more long before it reaches 1e-4.
        for name in ("ours", "ours_last"):
            assert agreement[name + "_vs_hf"]["class"] < 2e-5 and agreement[name + "_vs_hf"]["mask"] < 2e-5, agreement


def test_full_plus_crops_latency():
    """The paper's default inference (full image + 4 corner crops at short side 800: five views of the
    same size) against one view, and the share of everything that is not the network (view planning,
    fusion, paste, RLE), on an 800 x 1088 image and a 3000 x 4000 photo. CropFormer Swin-T, random weights.

    Two kinds of masks for the same network time: "random" (the random network's own, made confident:
    each view's masks are sharp but the views disagree, so the fused probability hovers below the
    threshold nearly everywhere and the paste evaluates most queries at every pixel, a worst case) and
    "agreeing" (the batch decoder's mask logits replaced, after the network, by blobs fixed in image
    coordinates that every view sees alike, `tests.paste_inputs`: what a trained model gives)."""
    cfg = load_config("cropformer_swin_tiny_3x")
    if QUICK:
        cfg = load_config("cropformer_swin_tiny_3x", ["input.min_size_test=160"])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    with torch.no_grad():
        # Random weights give mask logits near 0 everywhere: every query is uncertain at every pixel, the
        # paste's tile pruning never applies and it evaluates ~Q queries per pixel. Scaled mask embeddings
        # make confident masks with sharp edges in each view.
        last = model.image_decoder.mask_embed.layers[-1]
        last.weight.mul_(CONFIDENT_MASKS)
        last.bias.mul_(CONFIDENT_MASKS)
    seg = Segmenter(model, cfg, mode="full_crops")
    one = Segmenter(model, cfg, mode="full_image")
    net = {"t": 0.0}
    model.register_forward_pre_hook(lambda m, a: net.__setitem__("t0", time.perf_counter()))
    model.register_forward_hook(lambda m, a, o: net.__setitem__("t", net["t"] + time.perf_counter() - net["t0"]))
    swap = {"logits": None}

    def agreeing(m, a, out):  # registered after the timer: swapping in a precomputed tensor costs nothing
        if swap["logits"] is not None and "batch" in out:
            out["batch"]["pred_masks"] = swap["logits"]
        return out

    model.register_forward_hook(agreeing)
    rng = np.random.default_rng(0)
    side = cfg.input.min_size_test
    for H, W in ((side, round(side * 1088 / 800)), (3000, 4000)):
        image = np.ascontiguousarray(np.repeat(np.repeat(rng.integers(0, 255, (H // 8, W // 8, 3), dtype=np.uint8), 8, 0), 8, 1))
        sample = seg._views(image)
        padded = [-(-int(v) // 32) * 32 for v in sample["image_sizes"].max(0).values]
        g = torch.Generator().manual_seed(1)
        Q = cfg.model.decoder.num_queries
        blob_maps = blob_logits(random_blobs(Q, H, W, g), sample["image_sizes"].tolist(),
                                sample["crop_boxes"].tolist(), padded[0] // 4, padded[1] // 4, g)
        for masks in ("random", "agreeing"):
            swap["logits"] = blob_maps.transpose(0, 1)[None] if masks == "agreeing" else None  # 1 x Q x V x h x w
            load0 = loadavg()
            seg.segment(image)  # warm-up
            totals, nets, singles = [], [], []
            for _ in range(REPS):
                net["t"] = 0.0
                t0 = time.perf_counter()
                ent = seg.segment(image)
                id_map_to_rle(ent.id_map, np.arange(1, len(ent.scores) + 1))  # what infer.py writes as COCO RLE
                totals.append(time.perf_counter() - t0)
                nets.append(net["t"])
                net["t"] = 0.0
                one.segment(image)
                singles.append(net["t"])
            total, network, single = (statistics.median(v) for v in (totals, nets, singles))
            rec = record("full_crops_latency", {"image": [H, W], "short_side": side, "threads": torch.get_num_threads(),
                                                "masks": masks, "mask_scale": CONFIDENT_MASKS,
                                                "total_s": total, "network_s": network, "one_view_network_s": single,
                                                "vs_one_view": total / single, "network_vs_one_view": network / single,
                                                "non_network_share": 1 - network / total,
                                                "entities": len(ent.scores), "loadavg": [load0, loadavg()]})
            print(f"\n{H} x {W}, {masks} masks: full + 4 crops {total:.2f} s (network {network:.2f} s = "
                  f"{rec['network_vs_one_view']:.2f}x one view), one view {single:.2f} s: {rec['vs_one_view']:.2f}x one "
                  f"view, non-network {100 * rec['non_network_share']:.1f}% ({rec['entities']} entities); load {rec['loadavg']}")


# The training benchmark runs `train` in fresh processes (the OpenMP runtime reads its settings at start).
_TRAIN = """
import json, sys, time
from pathlib import Path
from cropformer.cli import configure_cpu_runtime
if sys.argv[1] == "cli":
    configure_cpu_runtime()  # what train.py / eval.py / infer.py do before importing torch
import torch
from cropformer.config import load_config
from cropformer.data.synthetic import make_synthetic_dataset
from cropformer.engine import train
root = Path(sys.argv[2])
if not (root / "data" / "annotations.json").exists():
    make_synthetic_dataset(root / "data", 8, (256, 320), seed=0)
iters = int(sys.argv[3])
out = root / f"run-{time.time_ns()}"
cfg = load_config("tiny_demo", [f"data.train_json={json.dumps(str(root / 'data/annotations.json'))}",
                                f"data.train_images={json.dumps(str(root / 'data/images'))}",
                                "input.min_size_train=[256]", "solver.ims_per_batch=2", f"solver.max_iter={iters}",
                                f"solver.checkpoint_period={iters}", f"output_dir={json.dumps(str(out))}", "log_period=1000"])
train(cfg, device="cpu")
records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
times = [r["time"] for r in records]
# torch's threads in the last iteration (`train` gives torch its own count back when it returns)
print(json.dumps({"median_s": sorted(times[3:])[len(times[3:]) // 2], "threads": records[-1]["threads"]}))
"""


def _clean_env() -> dict:
    """This process's environment without the OpenMP and malloc settings the benchmarks vary."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("OMP_", "GOMP_", "MALLOC_", "CROPFORMER_ALLOCATOR")) and k != "GLIBC_TUNABLES"}


def _train_iteration(tmp: Path, policy: str, env: dict, busy: bool, iters: int) -> dict:
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        full_env = _clean_env() | env
        out = subprocess.run([sys.executable, "-c", _TRAIN, policy, str(tmp), str(iters)], env=full_env, cwd=REPO,
                             capture_output=True, text=True, timeout=1800, check=True)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_iteration_idle_and_busy(tmp_path):
    """The demo model's training iteration (2 images x 2 views at 256 x 320, forward + backward + step),
    idle and with one process spinning on a core, under torch's default OpenMP and malloc settings, with
    the allocator tuned (`cropformer.allocator`, what `train` does on CPU) and with everything our
    command-line tools set (`cropformer.cli.configure_cpu_runtime`)."""
    iters = 8 if QUICK else 25
    system = {"CROPFORMER_ALLOCATOR": "system"}  # `train` tunes the allocator unless told not to
    # A thread count the user sets is kept (no `ThreadShare` adaptation): torch's own count, fixed
    fixed = {"OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))}
    variants = {"torch default": ("plain", system | fixed), "allocator tuned": ("plain", fixed),
                "ours, threads fixed": ("cli", fixed), "ours (train.py)": ("cli", {}),
                "OMP_WAIT_POLICY=PASSIVE": ("plain", {"OMP_WAIT_POLICY": "PASSIVE"} | system | fixed),
                "1 thread": ("plain", {"OMP_NUM_THREADS": "1"} | system)}
    load0 = loadavg()
    results = {}
    for busy in (False, True):
        for name, (policy, env) in variants.items():
            results.setdefault(name, {})["busy" if busy else "idle"] = _train_iteration(tmp_path, policy, env, busy, iters)
    base = results["torch default"]["idle"]["median_s"]
    rows = {name: {"idle_s": r["idle"]["median_s"], "busy_s": r["busy"]["median_s"],
                   "busy_share_of_idle_speed": r["idle"]["median_s"] / r["busy"]["median_s"],
                   "busy_share_of_best_idle": base / r["busy"]["median_s"],
                   "threads": [r["idle"]["threads"], r["busy"]["threads"]]}
            for name, r in results.items()}
    rec = record("train_iteration_idle_busy", {"iters": iters, "results": rows, "loadavg": [load0, loadavg()]})
    print(f"\ntraining iteration, median of {iters - 3} (load {rec['loadavg']}):")
    for name, row in rows.items():
        print(f"  {name:26s} idle {1000 * row['idle_s']:6.0f} ms  busy {1000 * row['busy_s']:6.0f} ms  "
              f"busy speed {100 * row['busy_share_of_idle_speed']:3.0f}% of its idle, "
              f"{100 * row['busy_share_of_best_idle']:3.0f}% of torch-default idle (threads at the end: "
              f"{row['threads'][0]} idle, {row['threads'][1]} busy)")
    # ours must keep at least half its idle speed beside one busy process (issue 15)
    assert rows["ours (train.py)"]["busy_share_of_idle_speed"] >= 0.5, rows["ours (train.py)"]


_FORWARD = """
import json, statistics, sys, time
from cropformer.cli import configure_cpu_runtime
from cropformer.allocator import tune_cpu_allocator
if sys.argv[1] == "cli":
    configure_cpu_runtime()
elif sys.argv[1] == "allocator":
    tune_cpu_allocator()
import torch
from cropformer.config import load_config
from cropformer.modeling.build import build_model
H, W, reps = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = build_model(load_config("mask2former_swin_tiny_3x").model).eval()
x = torch.randint(0, 256, (1, 1, 3, H, W), dtype=torch.uint8)
import resource
times, faults = [], []
with torch.no_grad():
    model(x, masks="last")
    for _ in range(reps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter(); model(x, masks="last"); times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"median_s": statistics.median(times), "page_faults": statistics.median(faults)}))
"""


def test_runtime_settings_inference_idle():
    """What the command-line tools' runtime settings do to inference on an idle machine: one view of Swin-T
    in fresh processes, interleaved: torch's defaults, the allocator tuned (`cropformer.allocator`, what
    `Segmenter` does on CPU) and everything `configure_cpu_runtime` sets (the allocator, and passive OpenMP
    waiting only where other processes use the CPU at start). Page faults per forward come with the times."""
    variants = {"torch default": "plain", "allocator tuned": "allocator", "ours (infer.py)": "cli"}
    for H, W in SIZES:
        load0 = loadavg()
        runs = {name: [] for name in variants}
        for _ in range(REPS):
            for name, policy in variants.items():
                out = subprocess.run([sys.executable, "-c", _FORWARD, policy, str(H), str(W), "3"], env=_clean_env(),
                                     cwd=REPO, capture_output=True, text=True, timeout=1800, check=True)
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
        med = {name: {"s": statistics.median(r["median_s"] for r in rs),
                      "page_faults": statistics.median(r["page_faults"] for r in rs)} for name, rs in runs.items()}
        base = med["torch default"]["s"]
        rec = record("cpu_runtime_inference", {"size": [H, W], "results": med,
                                               "speedup": {name: base / m["s"] for name, m in med.items()},
                                               "loadavg": [load0, loadavg()]})
        print(f"\nSwin-T one view {H} x {W} (load {rec['loadavg']}):")
        for name, m in med.items():
            print(f"  {name:16s} {m['s']:.3f} s  {rec['speedup'][name]:.2f}x  {m['page_faults']:.0f} page faults per forward")
