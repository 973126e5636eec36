"""Parity tests of `cropformer.ops.paste_entities` (fused multi-view paste).

Layers checked, each against something independent:
1. geometry: `_linear_taps` / `_resize_matrix` give F.interpolate's exact weights; `_axis_taps` (3 taps
   per output position, used by the kernels) equals `_axis_matrix` (two dense resizes);
2. the float64 reference against a float32 transcription of the released code (`_original`: two
   F.interpolate calls per view, sum, divide, threshold, paint in ascending score);
3. the compiled CPU kernel (and CUDA where a GPU exists) against the reference, on random inputs with
   V = 1, 2, 5, Q = 1, 7, 100, odd output sizes, crops at the border and tied class scores;
4. bad inputs, backend selection, and an 8000 x 6000 x Q=100 x 5-view run in a subprocess for time and
   peak RSS.

Id maps may differ only at pixels where some query's fused probability lies within 1e-5 of the
threshold (float32 vs float64 rounding can flip those); every test counts them and asserts that each
mismatch is such a pixel.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from cropformer.ops._dispatch import has_compiled_op
from cropformer.ops.paste import (
    _axis_matrix,
    _axis_taps,
    _linear_taps,
    _rank_order,
    _resize_matrix,
    _tile_breaks,
    paste_entities,
    paste_entities_ref,
)
from tests.conftest import REPO, assert_close, cuda_or_skip, spy_device_guard, triton_device_or_skip
from tests.paste_inputs import blob_inputs, corner_views

NEAR = 1e-5  # fused probabilities this close to the threshold may legitimately flip


def compiled_or_skip():
    if not has_compiled_op("paste_entities"):
        pytest.skip("compiled paste_entities not built (setup.py, or CROPFORMER_JIT_OPS=paste)")


# ----------------------------------------------------------------------------------------------------
# Inputs.


def random_inputs(V, Q, H, W, h=11, w=13, seed=0, boxes=None):
    """Smooth-ish random logits (low-res noise scaled so masks are blobs with sharp and soft edges),
    view sizes within the padded size 4h x 4w, random class scores."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(V, Q, h, w, generator=g) * 4 + torch.randn(V, Q, 1, 1, generator=g)
    sizes = [[4 * h - int(torch.randint(0, 3, (), generator=g)), 4 * w - int(torch.randint(0, 5, (), generator=g))]
             for _ in range(V)]
    boxes = corner_views(H, W, V) if boxes is None else boxes
    scores = torch.rand(Q, generator=g)
    return logits, sizes, boxes, scores


def fused_probs(logits, sizes, boxes, H, W) -> torch.Tensor:
    """Q x H x W float64 fused probabilities from F.interpolate in float64 (independent of the op)."""
    V, Q, h, w = logits.shape
    total = torch.zeros(Q, H, W, dtype=torch.float64)
    count = torch.zeros(H, W, dtype=torch.float64)
    for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes, boxes)):
        up = F.interpolate(logits[v : v + 1].double(), size=(4 * h, 4 * w), mode="bilinear", align_corners=False)
        view = F.interpolate(up[..., :rows, :cols], size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False)
        total[:, y0:y1, x0:x1] += view[0].sigmoid()
        count[y0:y1, x0:x1] += 1
    return total / count.clamp_min(1)


def _original(logits, sizes, boxes, scores, H, W, threshold=0.5):
    """Float32 transcription of the released `inference_whole_views` (full view first in `boxes`).

    Returns the id map (painted in ascending class score, ties resolved like ours) and the
    double-sigmoid scores."""
    V, Q, h, w = logits.shape
    up = F.interpolate(logits, size=(4 * h, 4 * w), mode="bilinear", align_corners=False)  # V x Q x 4h x 4w
    probs = []
    for v, ((rows, cols), (x0, y0, x1, y1)) in enumerate(zip(sizes, boxes)):
        view = F.interpolate(up[v : v + 1, :, :rows, :cols], size=(y1 - y0, x1 - x0), mode="bilinear",
                             align_corners=False)
        probs.append(view[0].sigmoid())
    fused = torch.zeros(Q, H, W)
    valid = torch.zeros(Q, H, W) + 1e-16
    for (x0, y0, x1, y1), p in zip(boxes[1:], probs[1:]):
        fused[:, y0:y1, x0:x1] += p
        valid[:, y0:y1, x0:x1] += 1
    fused = (fused + probs[0]) / (valid + 1)
    masks = fused > threshold
    id_map = torch.zeros(H, W, dtype=torch.int32)
    for q in _rank_order(scores).flip(0).tolist():  # ascending score; the higher rank paints last
        id_map[masks[q]] = q + 1
    final = id_map[None] == torch.arange(1, Q + 1)[:, None, None]
    mean = (fused.sigmoid() * final).flatten(1).sum(1) / (final.flatten(1).sum(1) + 1e-6)
    return id_map, scores * mean


def assert_id_maps_match(actual, expected, fused, threshold=0.5, name="id_map"):
    """Equal except at pixels where some query's fused probability is within NEAR of the threshold."""
    actual, expected = actual.cpu(), expected.cpu()
    near = ((fused - threshold).abs() <= NEAR).any(0)
    diff = actual != expected
    n_diff, n_near = int(diff.sum()), int(near.sum())
    bad = diff & ~near
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} pixels differ away from the threshold (first {torch.nonzero(bad)[:5].tolist()}; "
        f"actual {actual[bad][:5].tolist()}, expected {expected[bad][:5].tolist()})"
    )
    return n_diff, n_near


def assert_results_match(actual, expected, fused, threshold=0.5, name=""):
    """Id maps as in `assert_id_maps_match`, with few flips (at most 0.2% of the output, + 2); areas and
    scores of every query that owns no flipped pixel in either map equal (scores to 1e-5); the areas
    of the others off by at most the flips."""
    n_diff, n_near = assert_id_maps_match(actual[0], expected[0], fused, threshold, name=f"{name} id_map")
    assert actual[0].dtype == torch.int32 and actual[2].dtype == torch.int64
    ids, exp_ids = actual[0].cpu(), expected[0].cpu()
    assert n_diff <= 0.002 * ids.numel() + 2, f"{name}: {n_diff} of {ids.numel()} pixels flipped"
    diff = ids != exp_ids
    affected = torch.zeros(fused.shape[0] + 1, dtype=torch.bool)
    affected[ids[diff].long()] = True
    affected[exp_ids[diff].long()] = True
    kept = ~affected[1:]
    area, exp_area = actual[2].cpu(), expected[2].cpu()
    assert torch.equal(area[kept], exp_area[kept]), f"{name} areas {area} != {exp_area}"
    assert_close(actual[1].cpu()[kept], expected[1].cpu()[kept], rtol=1e-5, atol=1e-5, name=f"{name} scores")
    assert (area - exp_area).abs().sum() <= 2 * n_diff
    return n_diff, n_near


# ----------------------------------------------------------------------------------------------------
# 1. Geometry.


# Sizes: equal (copy branch), x4 up, odd up/down ratios, tiny inputs (1, 2), a large up factor.
@pytest.mark.parametrize("in_size,out_size", [(40, 40), (40, 160), (37, 101), (159, 112), (223, 156), (1, 5), (2, 7),
                                              (1000, 7), (333, 8000)])
def test_resize_matrix_is_f_interpolate(in_size, out_size):
    # F.interpolate of one-hot inputs gives its weights. They match to float32 rounding: exactly where
    # the two taps differ; where both taps hit one input (border, in_size 1) ATen's float32 sum
    # lambda0 + lambda1 rounds to 1 and ours (float64) may not. Rows and columns: ATen's two axes use
    # different loops.
    eye = torch.eye(in_size)
    rows = F.interpolate(eye.reshape(in_size, 1, in_size, 1), size=(out_size, 1), mode="bilinear", align_corners=False)
    cols = F.interpolate(eye.reshape(in_size, 1, 1, in_size), size=(1, out_size), mode="bilinear", align_corners=False)
    m = _resize_matrix(in_size, out_size)
    i0, i1, _, _ = _linear_taps(in_size, out_size)
    distinct = i0 != i1
    assert torch.equal(rows.reshape(in_size, out_size).T.double()[distinct], m[distinct])
    assert_close(rows.reshape(in_size, out_size).T, m, rtol=0, atol=6e-8, name="row weights")
    assert_close(cols.reshape(in_size, out_size).T, m, rtol=0, atol=6e-8, name="column weights")


@pytest.mark.parametrize("low,cut,out", [(40, 160, 160), (40, 159, 112), (10, 37, 101), (7, 25, 9), (2, 7, 13),
                                         (1, 3, 5), (1, 4, 1), (3, 12, 2), (50, 199, 3001)])
def test_axis_taps_equal_two_resizes(low, cut, out):
    idx, wts = _axis_taps(low, cut, out)
    dense = torch.zeros(out, low, dtype=torch.float64).scatter_add_(1, idx.long(), wts.double())
    assert_close(dense, _axis_matrix(low, cut, out), rtol=0, atol=1e-7, name="taps vs matrices")
    assert (idx[1:] >= idx[:-1]).all() and (wts >= 0).all() and int(idx.max()) < low
    # And the matrices against two float32 F.interpolate calls (x4, cut, resize), as the released code
    # runs them: equal up to the float32 rounding of the intermediate and final values.
    x = torch.randn(3, low)
    up = F.interpolate(x[None, :, :, None], size=(4 * low, 1), mode="bilinear", align_corners=False)
    two = F.interpolate(up[:, :, :cut], size=(out, 1), mode="bilinear", align_corners=False)[0, :, :, 0]
    assert_close(x.double() @ _axis_matrix(low, cut, out).T, two, rtol=0, atol=2e-6, name="matrix vs F.interpolate")


def test_tile_breaks_include_footprint_edges():
    b = _tile_breaks(200, [0, 60, 140, 200, 59], 64).tolist()
    assert b[0] == 0 and b[-1] == 200 and {59, 60, 140} <= set(b)
    assert all(0 < e - s <= 64 for s, e in zip(b[:-1], b[1:]))


# ----------------------------------------------------------------------------------------------------
# 2. Reference vs the released algorithm.


# Sizes: 37 x 53 and 61 x 45 are odd and not multiples of the tile; 160 x 224 is the golden image.
@pytest.mark.parametrize("V,Q,H,W", [(1, 7, 37, 53), (2, 7, 61, 45), (5, 12, 160, 224), (5, 100, 47, 39)])
def test_reference_matches_original(V, Q, H, W):
    logits, sizes, boxes, scores = random_inputs(V, Q, H, W, seed=V * 100 + Q)
    # Small chunks (5 queries x 9 rows, neither dividing Q or H) exercise the row and query chunking.
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W), score_mode="original", query_chunk=5,
                             chunk_elems=5 * W * 9)
    id_map, orig_scores = _original(logits, sizes, boxes, scores, H, W)
    n_diff, n_near = assert_id_maps_match(ref[0], id_map, fused_probs(logits, sizes, boxes, H, W))
    if n_diff == 0:
        assert_close(ref[1], orig_scores, rtol=1e-5, atol=1e-6, name="scores")
    assert ref[2].sum() == (ref[0] > 0).sum()
    print(f"reference vs original: {n_diff} pixels differ, {n_near} within {NEAR} of the threshold")


# ----------------------------------------------------------------------------------------------------
# 3. Compiled kernels vs the reference.


# V = 1 (Mask2Former), 2 (training-like), 5 (CropFormer test); Q = 1, 7, 100; output sizes odd and
# prime-ish so tiles, crops and taps never align; low-res 11 x 13 and 7 x 5 (up and down sampling).
@pytest.mark.parametrize("score_mode", ["mean_prob", "original"])
@pytest.mark.parametrize("V", [1, 2, 5])
@pytest.mark.parametrize("Q", [1, 7, 100])
@pytest.mark.parametrize("H,W,h,w", [(97, 131, 11, 13), (67, 29, 11, 13), (23, 17, 7, 5)])
def test_cpu_kernel_matches_reference(score_mode, V, Q, H, W, h, w):
    compiled_or_skip()
    logits, sizes, boxes, scores = random_inputs(V, Q, H, W, h, w, seed=H * 7 + V * 3 + Q)
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W), score_mode=score_mode)
    out = paste_entities(logits, sizes, boxes, scores, (H, W), score_mode=score_mode, backend="cpu")
    assert_results_match(out, ref, fused_probs(logits, sizes, boxes, H, W), name="cpu")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_tied_scores_lower_query_wins(backend):
    if backend == "cpu":
        compiled_or_skip()
    V, Q, H, W = 5, 7, 53, 41
    logits, sizes, boxes, _ = random_inputs(V, Q, H, W, seed=3)
    logits[:, 4] = logits[:, 2]  # queries 2 and 4 identical, same score: 2 must win everywhere
    scores = torch.tensor([0.3, 0.1, 0.9, 0.5, 0.9, 0.9, 0.2])
    id_map, sc, area = paste_entities(logits, sizes, boxes, scores, (H, W), backend=backend)
    assert area[4] == 0 and sc[4] == 0 and area[2] > 0
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W))
    assert_results_match((id_map, sc, area), ref, fused_probs(logits, sizes, boxes, H, W))


@pytest.mark.parametrize("threshold", [0.3, 0.75])
def test_threshold_and_uncovered_pixels(threshold):
    compiled_or_skip()
    V, Q, H, W = 3, 9, 45, 61
    # Views that leave the right part of the output uncovered and overlap partly.
    boxes = [[0, 0, 40, 45], [10, 5, 33, 44], [20, 0, 47, 30]]
    logits, sizes, _, scores = random_inputs(V, Q, H, W, seed=11, boxes=boxes)
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W), mask_threshold=threshold)
    out = paste_entities(logits, sizes, boxes, scores, (H, W), mask_threshold=threshold, backend="cpu")
    assert (ref[0][:, 47:] == 0).all() and (ref[0][30:, 40:] == 0).all()
    assert_results_match(out, ref, fused_probs(logits, sizes, boxes, H, W), threshold)


def test_pruning_skips_most_pairs_on_blob_masks():
    """Localised masks (as trained models give) leave few (pixel, query) pairs to evaluate."""
    compiled_or_skip()
    from cropformer.ops.paste import _check_inputs, _paste_fast

    V, Q, H, W = 5, 50, 301, 403
    logits, sizes, boxes, scores = blob_inputs(V, Q, H, W)
    sizes_, boxes_, _, _ = _check_inputs(logits, sizes, boxes, scores, (H, W), 0.5, "mean_prob")
    id_map, sc, area, evaluated = _paste_fast(logits, sizes_, boxes_, scores, H, W, 0.5, "mean_prob", "cpu")
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W))
    assert_results_match((id_map, sc, area), ref, fused_probs(logits, sizes, boxes, H, W))
    assert evaluated < 0.1 * H * W * Q, f"evaluated {evaluated / (H * W * Q):.3f} of the pairs"


# Triton under the interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 unless told otherwise):
# small outputs (it is slow), still with partial tiles (37, 45 are
# not multiples of 32), V = 1 and 5, Q = 1 and 7, and a tiled-score case.
@pytest.mark.parametrize("score_mode", ["mean_prob", "original"])
@pytest.mark.parametrize("V,Q,H,W", [(1, 7, 37, 45), (5, 7, 37, 45), (5, 1, 23, 17), (2, 3, 70, 33)])
def test_triton_matches_reference(score_mode, V, Q, H, W):
    triton_device_or_skip("cpu")
    logits, sizes, boxes, scores = random_inputs(V, Q, H, W, seed=H + V + Q)
    if Q == 3:
        scores = torch.tensor([0.5, 0.5, 0.5])  # all tied: the lowest index wins
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W), score_mode=score_mode)
    out = paste_entities(logits, sizes, boxes, scores, (H, W), score_mode=score_mode, backend="triton")
    assert_results_match(out, ref, fused_probs(logits, sizes, boxes, H, W), name="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("score_mode", ["mean_prob", "original"])
@pytest.mark.parametrize("V,Q,H,W", [(1, 7, 97, 131), (5, 100, 97, 131), (5, 1, 23, 17), (2, 100, 333, 257)])
def test_gpu_kernels_match_reference(backend, score_mode, V, Q, H, W):
    device = cuda_or_skip()
    if backend == "cuda":
        compiled_or_skip()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton needs TRITON_INTERPRET=0")
    logits, sizes, boxes, scores = random_inputs(V, Q, H, W, seed=H + V + Q)
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W), score_mode=score_mode)
    out = paste_entities(logits.to(device), sizes, boxes, scores.to(device), (H, W), score_mode=score_mode,
                         backend=backend)
    assert out[0].device.type == "cuda"
    assert_results_match(out, ref, fused_probs(logits, sizes, boxes, H, W), name=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_kernels_on_a_second_gpu(backend):
    """Logits on cuda:1 while cuda:0 is current: the launches must follow the tensors."""
    cuda_or_skip()
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if backend == "cuda":
        compiled_or_skip()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton needs TRITON_INTERPRET=0")
    torch.cuda.set_device(0)
    V, Q, H, W = 5, 100, 97, 131
    logits, sizes, boxes, scores = random_inputs(V, Q, H, W, seed=1)
    ref = paste_entities_ref(logits, sizes, boxes, scores, (H, W))
    dev = torch.device("cuda", 1)
    out = paste_entities(logits.to(dev), sizes, boxes, scores.to(dev), (H, W), backend=backend)
    assert out[0].device == dev
    assert_results_match(out, ref, fused_probs(logits, sizes, boxes, H, W), name=backend)


# ----------------------------------------------------------------------------------------------------
# 4. Errors, dispatch, large output.


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.update(view_boxes=[[0, 0, 32, 31], [0, 0, 33, 10]]), "inside the output"),
        (lambda a: a.update(view_boxes=[[0, 0, 32, 31], [5, 5, 5, 10]]), "non-empty"),
        (lambda a: a.update(view_boxes=[[0, 0, 32, 31], [-1, 0, 10, 10]]), "inside the output"),
        (lambda a: a.update(view_boxes=[[0, 0, 32, 31]]), "view_boxes must be V x 4"),
        (lambda a: a.update(view_sizes=[[44, 52]]), "view_sizes must be V x 2"),
        (lambda a: a.update(view_sizes=[[44, 52], [45, 52]]), "padded size"),
        (lambda a: a.update(class_scores=torch.rand(4)), r"class_scores must be a tensor of shape \(Q,\)"),
        (lambda a: a.update(class_scores=[0.1, 0.2, 0.3]), "class_scores must be a tensor"),
        (lambda a: a.update(view_sizes=[[44, 52], [40.5, 50]]), "view_sizes must be rows of 2 integers"),
        (lambda a: a.update(view_boxes=torch.zeros(2, 4)), "view_boxes must hold integers"),
        (lambda a: a.update(out_size=(0, 32)), "out_size must be positive"),
        (lambda a: a.update(view_logits=torch.randn(2, 3, 11)), "V x Q x h x w"),
        (lambda a: a.update(view_logits=torch.randn(2, 0, 11, 13)), "must not be empty"),
        (lambda a: a.update(score_mode="max"), "score_mode"),
    ],
)
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_bad_inputs_raise(change, message, backend):
    args = dict(view_logits=torch.randn(2, 3, 11, 13), view_sizes=[[44, 52], [40, 50]],
                view_boxes=[[0, 0, 32, 31], [0, 0, 20, 10]], class_scores=torch.rand(3), out_size=(31, 32))
    change(args)
    with pytest.raises(ValueError, match=message):
        paste_entities(**args, backend=backend)


def test_explicit_unavailable_backend_raises():
    logits, sizes, boxes, scores = random_inputs(1, 2, 9, 9)
    with pytest.raises(RuntimeError, match="cuda"):
        paste_entities(logits, sizes, boxes, scores, (9, 9), backend="cuda")


_BIG_SCRIPT = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from cropformer.ops._dispatch import jit_load
if os.environ.get("CROPFORMER_JIT_OPS"):
    jit_load([o for o in os.environ["CROPFORMER_JIT_OPS"].split(",") if o])
from cropformer.ops.paste import paste_entities
from tests.paste_inputs import blob_inputs

from tests.bench.test_bench_paste import _rss as rss, peak_rss, reset_peak_rss

H, W, Q, V = 6000, 8000, 100, 5
logits, sizes, boxes, scores = blob_inputs(V, Q, H, W, short=800)  # 5 x 100 x 200 x 272
import gc; gc.collect()
reset = reset_peak_rss()  # else the peak is since process start (ru_maxrss): an upper bound
before = rss()
t0 = time.perf_counter()
id_map, sc, area = paste_entities(logits, sizes, boxes, scores, (H, W), backend="cpu")
elapsed = time.perf_counter() - t0
peak = peak_rss() if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"elapsed": elapsed, "before": before, "peak": peak, "inputs": logits.numel() * 4,
                  "output": id_map.numel() * 4, "entities": int((area > 0).sum()),
                  "covered": float((id_map > 0).float().mean())}))
"""


def _run_large_output() -> dict:
    out = subprocess.run([sys.executable, "-c", _BIG_SCRIPT, str(REPO)], capture_output=True, text=True,
                         env=dict(os.environ), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"8000x6000 Q=100 V=5: {r['elapsed']:.2f} s, peak RSS growth {(r['peak'] - r['before']) / 2**20:.0f} MB "
          f"(output {r['output'] / 2**20:.0f} MB, inputs {r['inputs'] / 2**20:.0f} MB), "
          f"{r['entities']} entities cover {100 * r['covered']:.0f}%")
    assert r["entities"] > 10 and r["covered"] > 0.3  # a real workload, not an empty map
    return r


def test_large_output_memory():
    """8000 x 6000 output, Q = 100, 5 views, CPU: peak RSS growth during the call below output + 256 MB
    (the inputs already exist before the call; peak = VmHWM reset right before the call, in a fresh
    process)."""
    compiled_or_skip()
    r = _run_large_output()
    assert r["peak"] - r["before"] < r["output"] + 256 * 2**20


@pytest.mark.bench
def test_large_output_time():
    """The same run within 15 s (a timing: `pytest -m bench`, never in the default suite)."""
    compiled_or_skip()
    assert _run_large_output()["elapsed"] < 15.0


# ----------------------------------------------------------------------------------------------------
# 5. GPU-path properties checkable on CPU: shared memory, launch device, no host synchronisation.


# (default limit, opt-in limit) per block: every NVIDIA GPU since Volta (48 KiB), and the opt-in of
# sm_86/89 (99 KiB), A100 (163 KiB), H100/H200 (227 KiB).
@pytest.mark.parametrize("optin_kib", [99, 163, 227])
def test_cuda_paste_shared_memory_counts_static_and_dynamic(optin_kib):
    """The CUDA kernel's launch configuration (csrc/paste/paste.h, compiled into the CPU extension) counts
    the block's static shared memory with the per-query dynamic part: no query count fits the check and
    then fails at launch. The old check (dynamic <= 48 KiB alone) let Q = 2876..2891 through."""
    compiled_or_skip()
    smem = torch.ops.cropformer_C.paste_entities_smem
    default, optin = 48 * 1024, optin_kib * 1024
    static = smem(1, default, optin)[0]
    assert static >= 64 * 4 + 16  # the views list (64 ints) and the three counters
    for q in [1, 100, 200, 2875, 2876, 2880, 2891, 2892, 5000, 5997, 5998, 9999, 13000, 13682, 13683, 20000]:
        s, dynamic, mode = smem(q, default, optin)
        assert s == static and dynamic == 17 * q  # double sum, uint area, int survivor, uchar flag
        expected = 0 if static + dynamic <= default else (1 if static + dynamic <= optin else -1)
        assert mode == expected, (q, static, dynamic, mode)
    assert smem(2880, default, optin)[2] == 1  # within 48 KiB alone, but not with the static part


def test_triton_launch_runs_on_the_logits_device(monkeypatch):
    """The Triton launcher enters the logits' device (a no-op on CPU, recorded here), not the current one."""
    triton_device_or_skip("cpu")
    seen = spy_device_guard(monkeypatch, "paste")
    logits, sizes, boxes, scores = random_inputs(2, 3, 19, 23)
    paste_entities(logits, sizes, boxes, scores, (19, 23), backend="triton")
    assert seen == [torch.device("cpu")]


class _NoSync:
    """Raises on the Tensor methods that make a CUDA host wait (item, tolist, cpu, numpy, bool/int/float
    conversion) while `active`: run on CPU, it finds the host synchronisations a GPU path would have."""

    NAMES = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.active = False
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def guarded(t, *args, _real=real, _name=name, **kwargs):
                if self.active:
                    raise AssertionError(f"host synchronisation: Tensor.{_name}")
                return _real(t, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, guarded)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_fast_paths_never_wait_for_the_device(backend, monkeypatch):
    """After a first call with a geometry (its plan is then cached on the device), the Python side of the
    fast paths reads nothing back from the device: CUDA-graph capture and asynchronous launches work.
    (The compiled kernels themselves are excluded: the C++ entry checks values on the device with
    at::_assert_async for CUDA tensors; the Triton interpreter copies to numpy.)"""
    if backend == "cpu":
        compiled_or_skip()
    else:
        triton_device_or_skip("cpu")
    import cropformer.kernels.paste as kpaste

    logits, sizes, boxes, scores = random_inputs(2, 5, 29, 31)
    expected = paste_entities(logits, sizes, boxes, scores, (29, 31), backend=backend)  # warm-up
    guard = _NoSync(monkeypatch)
    if backend == "cpu":
        real_op = torch.ops.cropformer_C.paste_entities

        def compiled_op(*args):
            guard.active = False
            out = real_op(*args)
            guard.active = True
            return out

        monkeypatch.setattr(torch.ops.cropformer_C, "paste_entities", compiled_op)
    else:
        for name in ("_paste_bounds_kernel", "_paste_pixels_kernel"):
            kernel = getattr(kpaste, name)

            class Launch:
                def __getitem__(self, grid, _kernel=kernel):
                    def launch(*args, **kwargs):
                        guard.active = False
                        _kernel[grid](*args, **kwargs)
                        guard.active = True

                    return launch

            monkeypatch.setattr(kpaste, name, Launch())
    guard.active = True
    try:
        out = paste_entities(logits, sizes, boxes, scores, (29, 31), backend=backend)
    finally:
        guard.active = False
    for a, e in zip(out, expected):
        assert torch.equal(a, e)


# ----------------------------------------------------------------------------------------------------
# 6. Custom op: opcheck, torch.compile, self-test.


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_custom_op_passes_opcheck(backend):
    if backend == "cpu":
        compiled_or_skip()
    elif backend == "triton":
        triton_device_or_skip("cpu")
    logits, sizes, boxes, scores = random_inputs(2, 4, 17, 19)
    args = (logits, scores, [v for s in sizes for v in s], [v for b in boxes for v in b], [17, 19], 0.5,
            "original", backend)
    torch.library.opcheck(torch.ops.cropformer.paste_entities.default, args)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_post_processing_compiles_in_one_graph(backend):
    """Class scores from the decoder's logits, then the paste, under torch.compile(fullgraph=True):
    the same id map, scores and areas as eager."""
    V, Q, H, W = 5, 7, 41, 37
    logits, sizes, boxes, _ = random_inputs(V, Q, H, W, seed=4)
    class_logits = torch.randn(Q, 2, generator=torch.Generator().manual_seed(5))

    def post(class_logits, mask_logits):
        class_scores = class_logits.softmax(-1)[:, 0]
        return paste_entities(mask_logits, sizes, boxes, class_scores, (H, W), score_mode="original",
                              backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(post, fullgraph=True)(class_logits, logits)
    eager = post(class_logits, logits)
    assert torch.equal(compiled[0], eager[0]) and torch.equal(compiled[2], eager[2])
    assert_close(compiled[1], eager[1], rtol=1e-6, atol=1e-7, name="scores")


def test_selftest_problem_is_far_from_the_threshold():
    """The self-test demands an exact id map, which is fair only if no fused probability lies near the
    threshold: at least 5e-4 away (float32 moves them by ~1e-6)."""
    from cropformer.ops.paste import _selftest_problem

    logits, sizes, boxes, scores, (H, W) = _selftest_problem(torch.device("cpu"), torch.float32)
    fused = fused_probs(logits, sizes, boxes, H, W)
    assert (fused - 0.5).abs().min() > 5e-4
    id_map, _, area = paste_entities_ref(logits, sizes, boxes, scores, (H, W))
    assert (area > 0).sum() >= 4 and (id_map == 0).any()  # several entities and some background


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_selftest_passes_and_catches_a_wrong_kernel(backend, monkeypatch):
    from cropformer.ops import _dispatch
    from cropformer.ops import paste as paste_mod

    if backend == "cpu":
        compiled_or_skip()
    else:
        triton_device_or_skip("cpu")
    selftest = _dispatch.SELFTESTS["paste_entities"]
    available = {name: ok for name, ok, _ in _dispatch.PREFERENCES["paste_entities"]}[backend]
    cpu = torch.device("cpu")
    dtypes = [torch.float32, torch.float16] if backend == "cpu" else [torch.float32]
    for dtype in dtypes:
        assert available(cpu, dtype)
        selftest(backend, cpu, dtype)
    real = paste_mod._paste_kernels

    def one_pixel_wrong(*args):
        id_map, scores, area, evaluated = real(*args)
        id_map = id_map.clone()
        id_map[0, 0] = (id_map[0, 0] + 1) % (scores.numel() + 1)
        return id_map, scores, area, evaluated

    monkeypatch.setattr(paste_mod, "_paste_kernels", one_pixel_wrong)
    with pytest.raises(AssertionError, match="paste_entities self-test"):
        selftest(backend, cpu, torch.float32)
