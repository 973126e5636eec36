"""Inference: the crop ensemble of SPEC.md section 5 and a segment-anything-shaped API.

    seg = Segmenter.from_checkpoint("model_final.safetensors", device="cpu")
    records = seg.generate(rgb_uint8)     # [{"segmentation", "area", "bbox", "predicted_iou", ...}]

Input images are RGB uint8 H x W x 3 (the original's demo takes BGR; we do not).

Modes (paper Table 7; "4 corner crops" is input.crop_sample_num_test, 0-4, see views.inference_corners):
    full_crops  full image + 4 corner crops through the batch decoder, fused (CropFormer default)
    full_batch  full image alone through the batch decoder
    full_image  full image alone through the image decoder
    crops       the 4 corner crops alone through the batch decoder (the first crop stands in for the
                full view as the association module's query)
    single      Mask2Former baseline: image decoder, top-100 queries by class score

Views of all images in a call are batched together when their padded sizes agree, so any batch size
gives the results of batch 1 (images of different padded sizes run in separate forwards).
Default output (ours): non-empty entities with area >= min_area and score >= score_threshold, scores
class x mean fused probability. `score_mode="original"` plus `keep_empty=True` gives the original's
output (all queries, double-sigmoid scores).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .allocator import tune_cpu_allocator
from .checkpoint import load_model_weights, read_weights
from .config import Config, load_config, with_overrides
from .data.dataset import _ceil_to, collate
from .data.decode import DecodedImage
from .data.views import build_sample, inference_corners, plan_views
from .modeling.build import build_model
from .ops.paste import paste_entities
from .ops.rle import id_map_to_rle

MODES = ("full_crops", "full_batch", "full_image", "crops", "single")
PRECISIONS = ("fp32", "bf16")
_CROP_MODES = ("full_crops", "crops")  # the modes whose views include corner crops


class PrecisionUnsupported(ValueError):
    """The requested precision has no fast hardware path on this device (bf16 on a CPU without it)."""


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(w for line in f if line.startswith("flags") for w in line.split(":", 1)[1].split())
    except OSError:
        return frozenset()


def matmul_rate(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """GFLOP/s of an n x n x n matmul in `dtype` on this CPU and thread count (best of `reps`, after one
    warm-up): the roofline the benchmarks report against, and fast mode's check."""
    import time

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


@functools.lru_cache(maxsize=None)
def _cpu_bf16_gain() -> tuple[float, float]:
    """(fp32, bf16) GFLOP/s of a 1024^3 matmul (~0.1 s, once per process): the instruction set alone does
    not say whether bf16 is faster (a VM with AVX512-BF16 but no AMX ran bf16 matmuls at 0.56x the fp32
    rate, docs/BENCHMARKS.md)."""
    return matmul_rate(torch.float32), matmul_rate(torch.bfloat16)


# bf16 must beat fp32 matmuls by this factor for fast mode to run on a CPU (the network is not all matmuls).
MIN_CPU_BF16_GAIN = 1.3


def bf16_support(device: torch.device | str) -> tuple[bool, str]:
    """(fast, why): whether `device` runs bfloat16 faster than float32. On CPU that needs AVX512-BF16 or
    AMX-BF16 and, measured once per process, bf16 matmuls at least MIN_CPU_BF16_GAIN x the fp32 rate;
    otherwise fast mode is refused rather than quietly slower than exact mode."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, torch.cuda.get_device_name(device) + ("" if ok else " has no bfloat16 support")
    if device.type != "cpu":
        return False, f"no bf16 fast mode on {device.type}"
    flags = _cpu_flags()
    isa = "AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if "avx512_bf16" in flags else None
    if isa is None:
        why = "no /proc/cpuinfo to read the CPU's features" if not flags else "this CPU has neither AVX512-BF16 nor AMX-BF16"
        return False, why + " (bf16 would be emulated, slower than fp32): use precision fp32"
    fp32, bf16 = _cpu_bf16_gain()
    if bf16 < MIN_CPU_BF16_GAIN * fp32:
        return False, (f"this CPU has {isa} but runs bf16 matmuls at {bf16:.0f} GFLOP/s against {fp32:.0f} in fp32 "
                       f"(measured now, {torch.get_num_threads()} threads): no gain, use precision fp32")
    return True, f"CPU with {isa}: bf16 matmuls {bf16:.0f} GFLOP/s, fp32 {fp32:.0f}"


@dataclass
class Entities:
    """Result for one image: id_map H x W int32 (0 = none, k = entities[k-1]) and per-entity arrays."""

    id_map: np.ndarray
    scores: np.ndarray  # n float32
    areas: np.ndarray  # n int64
    queries: np.ndarray  # n int64, the query each entity came from
    stability: np.ndarray | None = None  # n float32 (`Segmenter.generate` computes it, see there)


class Segmenter:
    """Segment every entity of RGB images with a CropFormer or Mask2Former-baseline model.

    precision: "fp32" (exact: the original's outputs) or "bf16" (fast mode: the network in bfloat16 on
    hardware that computes it natively, see `bf16_support`; PrecisionUnsupported elsewhere). Its
    accuracy cost is measured in tests/test_inference.py and docs/BENCHMARKS.md.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: Config,
        *,
        mode: str | None = None,
        score_mode: str | None = None,
        mask_threshold: float | None = None,
        min_area: int | None = None,
        score_threshold: float | None = None,
        keep_empty: bool = False,
        top_k: int = 100,
        paste_backend: str = "auto",
        precision: str = "fp32",
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if precision == "bf16":
            fast, why = bf16_support(next(model.parameters()).device)
            if not fast:
                raise PrecisionUnsupported(f"precision bf16: {why}")
            # The whole network in bfloat16 (a copy: the caller's model is left as it is); the fusion,
            # paste and scores after it stay in float32.
            model = copy.deepcopy(model).to(torch.bfloat16)
        self.model = model.eval()
        if self.device.type == "cpu":
            tune_cpu_allocator()  # reuse freed memory: page faults cost a third of a CPU forward
        self.cfg = cfg
        t = cfg.test
        self.mode = mode or (t.mode if model.is_cropformer else "single")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode != "single" and self.mode != "full_image" and not model.is_cropformer:
            raise ValueError(f"mode {self.mode!r} needs a CropFormer model; this is a Mask2Former baseline (use 'single')")
        if self.mode in _CROP_MODES:
            n = cfg.input.crop_sample_num_test
            inference_corners(n)  # 0..4, or ValueError
            if self.mode == "crops" and n < 1:
                raise ValueError("mode 'crops' needs input.crop_sample_num_test >= 1")
        self.score_mode = score_mode or t.score_mode
        self.mask_threshold = t.mask_threshold if mask_threshold is None else mask_threshold
        if not 0.0 < self.mask_threshold < 1.0:
            raise ValueError(f"mask_threshold is a probability in (0, 1), got {self.mask_threshold}")
        self.min_area = t.min_area if min_area is None else min_area
        self.score_threshold = t.score_threshold if score_threshold is None else score_threshold
        self.keep_empty = keep_empty
        self.top_k = top_k
        self.paste_backend = paste_backend

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str | Path, cfg: Config | str | None = None, device: str = "cpu",
                        overrides: list[str] | tuple[str, ...] = (), **options) -> Segmenter:
        """Load our exported weights, a training checkpoint or an official checkpoint.

        The config comes from the checkpoint when it stores one; otherwise pass `cfg` (a Config, or a
        config file/name such as "cropformer_swin_tiny_3x"). `overrides` ("input.crop_sample_num_test=2",
        ...) apply to whichever config is used.
        """
        state, stored = read_weights(path)
        if isinstance(cfg, str):
            cfg = load_config(cfg)
        cfg = cfg or stored
        if cfg is None:
            raise ValueError(f"{path} stores no config: pass cfg= (e.g. 'cropformer_swin_tiny_3x')")
        if overrides:
            cfg = with_overrides(cfg, overrides, f"{path} (config, with --set overrides)")
        model = build_model(cfg.model)
        load_model_weights(model, state, source=str(path), strict=True)
        return cls(model.to(device), cfg, **options)

    # ----------------------------------------------------------------------------------------------
    def plan(self, height: int, width: int):
        """The views this segmenter runs for an image of that size (`plan.needed_scale()` tells how
        far a JPEG may be decoded at reduced resolution, see `cropformer.data.decode`)."""
        i = self.cfg.input
        corners = inference_corners(i.crop_sample_num_test) if self.mode in _CROP_MODES else ()
        return plan_views(height, width, short_side=i.min_size_test, max_size=i.max_size_test,
                          corners=corners, ratio=i.crop_ratio)

    def _views(self, image: np.ndarray | DecodedImage) -> dict:
        if isinstance(image, DecodedImage):
            H, W = image.height, image.width
        else:
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {getattr(image, 'shape', type(image))} "
                                 f"{getattr(image, 'dtype', '')}")
            H, W = image.shape[:2]
            if H < 1 or W < 1:
                raise ValueError(f"the image is empty ({H} x {W})")
        sample = build_sample(image, self.plan(H, W))
        if self.mode == "crops":  # drop the full view
            sample["images"] = sample["images"][1:]
            sample["image_sizes"] = sample["image_sizes"][1:]
            sample["crop_boxes"] = sample["crop_boxes"][1:]
        return sample

    @torch.no_grad()
    def segment_batch(self, images: list[np.ndarray | DecodedImage], stability: bool = False) -> list[Entities]:
        """Segment several images (RGB uint8 arrays, or `decode_image` results, possibly decoded at
        reduced resolution); views of images with the same padded size share one forward.
        `stability` also computes each entity's stability score (see `generate`)."""
        samples = [self._views(im) for im in images]
        stride = self.model.size_divisibility
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(samples):
            h, w = (int(v) for v in s["image_sizes"].max(0).values)
            groups.setdefault((_ceil_to(h, stride), _ceil_to(w, stride)), []).append(i)  # collate's padded size
        results: list[Entities | None] = [None] * len(images)
        for idx in groups.values():
            T = len(samples[idx[0]]["images"])
            batch = collate([samples[i] for i in idx], size_divisibility=stride)
            use_batch = self.mode in ("full_crops", "full_batch", "crops")
            out = self.model(batch["images"].to(self.device), batch["image_sizes"].to(self.device),
                             run_batch_decoder=use_batch, masks="last")
            for b, i in enumerate(idx):
                results[i] = self._fuse(out, b, T, samples[i], stability)
        return results

    def segment(self, image: np.ndarray | DecodedImage) -> Entities:
        return self.segment_batch([image])[0]

    def _fuse(self, out: dict, b: int, T: int, sample: dict, stability: bool = False) -> Entities:
        if self.mode in ("full_crops", "full_batch", "crops"):
            logits = out["batch"]["pred_logits"][b]  # Q x 2
            view_logits = out["batch"]["pred_masks"][b].transpose(0, 1)  # V x Q x h x w
        else:
            logits = out["image"]["pred_logits"][b * T]
            view_logits = out["image"]["pred_masks"][b * T : b * T + 1]
        class_scores = logits.float().softmax(-1)[:, 0]
        queries = torch.arange(class_scores.numel(), device=class_scores.device)
        if self.mode == "single" and class_scores.numel() > self.top_k:
            queries = class_scores.topk(self.top_k).indices.sort().values
            class_scores, view_logits = class_scores[queries], view_logits[:, queries]
        H, W = (int(v) for v in sample["orig_size"])
        view_logits = view_logits.float()
        paste_args = (sample["image_sizes"], sample["crop_boxes"].round().long())
        id_map, scores, areas = paste_entities(
            view_logits, *paste_args, class_scores, (H, W),
            mask_threshold=self.mask_threshold, score_mode=self.score_mode, backend=self.paste_backend,
        )
        id_map, scores, areas = id_map.cpu().numpy(), scores.cpu().numpy(), areas.cpu().numpy()
        queries = queries.cpu().numpy()
        if self.keep_empty:
            order = np.argsort(-class_scores.cpu().numpy(), kind="stable")
        else:
            keep = (areas > 0) & (areas >= self.min_area) & (scores >= self.score_threshold)
            order = np.nonzero(keep)[0]
            order = order[np.argsort(-scores[order], kind="stable")]
        # Renumber: entity k (1-based) in the id map = k-th kept query, by descending score.
        lut = np.zeros(len(scores) + 1, dtype=np.int32)
        lut[order + 1] = np.arange(1, len(order) + 1, dtype=np.int32)
        stab = None
        if stability:
            stab = np.array([self._stability(view_logits[:, q : q + 1], paste_args, (H, W)) for q in order], np.float32)
        return Entities(lut[id_map], scores[order].astype(np.float32), areas[order].astype(np.int64), queries[order], stab)

    def _stability(self, query_logits: torch.Tensor, paste_args: tuple, out_size: tuple[int, int]) -> float:
        """segment-anything's stability score of one query, on its fused probability p (mean over the
        views of the sigmoid of the view's logit, as `paste_entities` fuses): the IoU of
        {p > sigmoid(logit(t) + 1)} and {p > sigmoid(logit(t) - 1)}, t = mask_threshold. SAM thresholds
        its logits at 0 +- 1.0; this is the same offset in logit space (0.269 / 0.731 for t = 0.5). The
        high set lies inside the low one, so the IoU is the ratio of their areas (0 when both are empty).
        Each set is of the query alone at full resolution, before other entities take pixels."""
        centre = math.log(self.mask_threshold / (1.0 - self.mask_threshold))
        one = torch.ones(1, device=query_logits.device)
        lo, hi = (int(paste_entities(query_logits, *paste_args, one, out_size, mask_threshold=1.0 / (1.0 + math.exp(-x)),
                                     backend=self.paste_backend)[2][0]) for x in (centre - 1.0, centre + 1.0))
        return hi / lo if lo else 0.0

    # ----------------------------------------------------------------------------------------------
    def generate(self, image: np.ndarray, output_mode: str = "coco_rle") -> list[dict]:
        """segment-anything automatic-mask-generator records, one per entity, best first.

        Keys: segmentation (COCO RLE dict, or H x W bool with output_mode="binary_mask"), area,
        bbox (XYWH), predicted_iou (our entity score: class score x mean fused probability, or the
        original's with score_mode="original"), stability_score (SAM's definition on the fused
        probabilities, see `_stability`; it costs two single-query pastes per entity), crop_box (XYWH
        of the whole image: the crops are fused, not separate records), query. SAM's point_coords is
        left out: there are no prompt points.
        """
        if output_mode not in ("coco_rle", "binary_mask"):
            raise ValueError(f"output_mode must be 'coco_rle' or 'binary_mask', got {output_mode!r}")
        ent = self.segment_batch([image], stability=True)[0]
        return entity_records(ent, output_mode)


def entity_records(ent: Entities, output_mode: str = "coco_rle") -> list[dict]:
    """SAM-shaped records of an `Entities` result (RLE, boxes and areas in one pass over the id map)."""
    H, W = ent.id_map.shape
    ids = list(range(1, len(ent.scores) + 1))
    rles, boxes, areas = id_map_to_rle(ent.id_map, ids)
    records = []
    for k, (rle, box, area) in enumerate(zip(rles, boxes, areas)):
        record = {
            "segmentation": rle if output_mode == "coco_rle" else ent.id_map == k + 1,
            "area": int(area),
            "bbox": [float(v) for v in box],
            "predicted_iou": float(ent.scores[k]),
            "crop_box": [0.0, 0.0, float(W), float(H)],
            "query": int(ent.queries[k]),
        }
        if ent.stability is not None:
            record["stability_score"] = float(ent.stability[k])
        records.append(record)
    return records
