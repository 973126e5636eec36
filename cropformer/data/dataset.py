"""Entity dataset over a COCO-style JSON (EntitySeg), batching, samplers and worker seeding.

What the original does (detectron2 `load_coco_json` + `EntityCropDatasetMapper`), and we do:
- Class-agnostic: every annotation with `iscrowd == 0` is one entity, label 0; crowd annotations are
  not used at all. Images without a single non-crowd annotation are dropped for training
  (`filter_empty`, as detectron2's `filter_images_with_only_crowd_annotations`), kept by option and
  by default for evaluation.
- Masks: compressed RLE (EntitySeg), uncompressed RLE and polygons are accepted. They stay in their
  JSON encoding until a sample is built; each view's mask is then evaluated only at the pixels that
  view keeps (`rle_sample`), so a 15,000 px annotation is never decoded at full resolution.
  (Polygons are rasterised at the original resolution by pycocotools and then sampled like an RLE;
  detectron2 instead rasterises transformed polygons at the output size, which can differ on boundary
  pixels. EntitySeg has no polygons.)
- Every entity is kept in every view in the same order, with a per-view validity flag (non-empty
  box and non-empty mask in the view), so entity i is row i of every view's masks.

Errors are never silent: a JSON with annotations for unknown images, images without size or file,
missing files or malformed segmentations/boxes raises `DatasetError` listing the offending ids
(`on_bad_image="fatal"`), or drops those images with one warning that lists them ("skip"). At sample
time an undecodable image (`ImageDecodeError`) or an RLE whose counts do not cover the image
(`AnnotationError`) is fatal or skipped the same way; a skipped index is replaced by the next one.

Reproducibility: all randomness of a sample (short side, flip, corner) comes from a generator seeded
by (dataset seed, index, draw number); `TrainingSampler` yields (index, draw) pairs, so a seeded run
gives identical batches whatever the number of workers.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
import pickle
import random
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import pycocotools.mask as mask_util
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .decode import ImageDecodeError, decode_image
from .views import build_sample, draw_train_plan, inference_corners, inference_plan

logger = logging.getLogger(__name__)

__all__ = [
    "DatasetError",
    "AnnotationError",
    "rle_string_to_counts",
    "segmentation_to_counts",
    "check_segmentation",
    "rle_sample",
    "RLEMasks",
    "load_entity_records",
    "EntityDataset",
    "collate",
    "TrainingSampler",
    "InferenceSampler",
    "GroupedBatchSampler",
    "seed_worker",
    "build_train_loader",
    "build_test_loader",
    "build_dataset",
]

# ----------------------------------------------------------------------------------------------------
# RLE


class DatasetError(ValueError):
    """The annotation file is inconsistent; the message lists the offending ids."""


class AnnotationError(ValueError):
    """An annotation turned out malformed when its sample was built (ids in the message)."""


def rle_string_to_counts(s: str | bytes) -> np.ndarray:
    """Decode COCO's compressed RLE string into run lengths (int64), as pycocotools' rleFrString.

    Each count is a little-endian sequence of 5-bit groups stored as chr(48 + g) with 0x20 as the
    continuation bit and 0x10 of the last group as the sign; counts from the fourth on are stored as
    differences to the count two places earlier. Vectorised with numpy (no per-character loop).
    """
    if isinstance(s, str):
        s = s.encode("ascii")
    c = np.frombuffer(s, np.uint8).astype(np.int64) - 48
    if c.size == 0:
        return np.zeros(0, np.int64)
    if c.min() < 0 or c.max() > 63:
        raise ValueError("compressed RLE has characters outside '0'..'o'")
    more = (c & 0x20) != 0
    if more[-1]:
        raise ValueError("compressed RLE ends inside a number")
    last = np.flatnonzero(~more)  # last character of each number
    first = np.concatenate(([0], last[:-1] + 1))
    group = np.repeat(np.arange(last.size), last - first + 1)
    pos = np.arange(c.size) - first[group]
    if pos.max() > 11:
        raise ValueError("compressed RLE number longer than 60 bits")
    x = np.add.reduceat((c & 0x1F) << (5 * pos), first)
    neg = (c[last] & 0x10) != 0
    x[neg] -= np.left_shift(np.int64(1), 5 * (pos[last][neg] + 1))
    # cnts[m] += cnts[m - 2] for m > 2: running sums over odd and over even (from 2) positions.
    x[1::2] = np.cumsum(x[1::2])
    x[2::2] = np.cumsum(x[2::2])
    return x


def check_segmentation(segm, height: int, width: int) -> str | None:
    """Structural check of one segmentation against its image size; returns the problem or None.

    Cheap enough to run on every annotation at load time (the sum of compressed counts is checked when
    the sample is built, see `segmentation_to_counts`).
    """
    if isinstance(segm, dict):
        size, counts = segm.get("size"), segm.get("counts")
        if not (isinstance(size, (list, tuple)) and len(size) == 2):
            return "RLE without a [height, width] size"
        if [int(size[0]), int(size[1])] != [height, width]:
            return f"RLE size {list(size)} differs from the image's {[height, width]}"
        if isinstance(counts, (str, bytes)):
            return None if counts else "empty compressed RLE"
        if isinstance(counts, list):
            if not all(isinstance(v, int) and v >= 0 for v in counts):
                return "uncompressed RLE counts must be non-negative integers"
            if sum(counts) != height * width:
                return f"uncompressed RLE counts sum to {sum(counts)}, not {height * width}"
            return None
        return "RLE counts neither a string nor a list"
    if isinstance(segm, list):
        if not segm:
            return "empty polygon list"
        for poly in segm:
            if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
                return "polygon with fewer than 3 points or an odd number of coordinates"
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly):
                return "polygon coordinates must be finite numbers"
        return None
    return f"segmentation of type {type(segm).__name__}"


def segmentation_to_counts(segm, height: int, width: int) -> np.ndarray:
    """Run lengths (column-major, starting with background) of any COCO segmentation.

    Raises ValueError if the runs do not cover exactly height * width pixels.
    """
    if isinstance(segm, dict) and isinstance(segm["counts"], list):
        counts = np.asarray(segm["counts"], dtype=np.int64)
    else:
        if isinstance(segm, list):  # polygons -> one compressed RLE
            segm = mask_util.merge(mask_util.frPyObjects(segm, height, width))
        counts = rle_string_to_counts(segm["counts"])
    if counts.size and counts.min() < 0:
        raise ValueError("negative RLE run length")
    total = int(counts.sum())
    if total != height * width:
        raise ValueError(f"RLE runs cover {total} pixels, the image has {height * width}")
    return counts


def _fg_runs(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ends = np.cumsum(counts)
    starts, stops = ends[0:-1:2], ends[1::2]
    keep = stops > starts
    return starts[keep], stops[keep]


def rle_extent(counts: np.ndarray, height: int) -> tuple[int, int, int, int] | None:
    """(row_min, row_max, col_min, col_max), inclusive, of the foreground; None if empty."""
    starts, stops = _fg_runs(counts)
    if starts.size == 0:
        return None
    c0, c1 = starts // height, (stops - 1) // height
    spans = c0 != c1  # a run crossing a column boundary covers the bottom and top rows
    r0 = np.where(spans, 0, starts % height)
    r1 = np.where(spans, height - 1, (stops - 1) % height)
    return int(r0.min()), int(r1.max()), int(c0.min()), int(c1.max())


def rle_sample(counts: np.ndarray, height: int, width: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """mask[rows][:, cols] of the RLE-encoded H x W mask, without decoding the whole mask.

    Args:
        counts: run lengths (column-major, first run background).
        rows, cols: int arrays of pixel indices (any order, repeats allowed).
    Returns:
        len(rows) x len(cols) bool.

    Only the grid points inside the mask's bounding box are looked up (binary search of each point's
    column-major index among the run ends; odd runs are foreground).
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    out = np.zeros((rows.size, cols.size), dtype=bool)
    ext = rle_extent(counts, height)
    if ext is None:
        return out
    r0, r1, c0, c1 = ext
    ri = np.flatnonzero((rows >= r0) & (rows <= r1))
    ci = np.flatnonzero((cols >= c0) & (cols <= c1))
    if ri.size == 0 or ci.size == 0:
        return out
    ends = np.cumsum(counts)
    linear = cols[ci][:, None] * height + rows[ri][None, :]  # (cols, rows): column-major index
    run = np.searchsorted(ends, linear, side="right")
    out[np.ix_(ri, ci)] = (run & 1).astype(bool).T
    return out


class RLEMasks:
    """The entity masks of one image as run lengths (a `views.MaskSource`)."""

    def __init__(self, counts: Sequence[np.ndarray], height: int, width: int):
        self.counts = list(counts)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.counts)

    def sample(self, index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return rle_sample(self.counts[index], self.height, self.width, rows, cols)

    def box(self, index: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the foreground (pixel edges); zeros when empty."""
        ext = rle_extent(self.counts[index], self.height)
        if ext is None:
            return (0.0, 0.0, 0.0, 0.0)
        r0, r1, c0, c1 = ext
        return (float(c0), float(r0), float(c1 + 1), float(r1 + 1))


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class _Problems:
    """Offending ids per kind of problem found in an annotation file."""

    by_kind: dict = field(default_factory=dict)
    bad_images: set = field(default_factory=set)

    def add(self, kind: str, item, image_id=None):
        self.by_kind.setdefault(kind, []).append(item)
        if image_id is not None:
            self.bad_images.add(image_id)

    def __bool__(self):
        return bool(self.by_kind)

    def report(self, limit: int = 20) -> str:
        lines = []
        for kind, items in self.by_kind.items():
            shown = ", ".join(str(i) for i in items[:limit])
            more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"  {kind} [{len(items)}]: {shown}{more}")
        return "\n".join(lines)


def load_entity_records(
    json_file: str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    filter_empty: bool = True,
    check_files: bool = True,
    on_bad_image: str = "fatal",
) -> list[dict]:
    """Read a COCO-style entity JSON into per-image records.

    Each record: {"image_id", "file_name" (image_root joined), "height", "width",
    "annotations": [{"id", "bbox" (x0, y0, x1, y1) or None, "segmentation"}]} with only iscrowd == 0
    annotations, in file order. Problems are collected over the whole file and reported together with
    their ids; "fatal" raises DatasetError, "skip" drops the affected images and logs a warning.
    """
    if on_bad_image not in ("fatal", "skip"):
        raise ValueError(f"on_bad_image must be 'fatal' or 'skip', got {on_bad_image!r}")
    with open(json_file) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{json_file}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
        except UnicodeDecodeError:
            raise DatasetError(f"{json_file}: not a JSON file (not UTF-8 text)") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_file}: not a COCO JSON (no 'images' list)")
    problems = _Problems()
    images: dict = {}
    for img in data["images"]:
        iid = img.get("id") if isinstance(img, dict) else None
        if iid is None:
            problems.add("images without an id", repr(img)[:80])
            continue
        if iid in images:
            problems.add("duplicate image ids", iid, iid)
            continue
        h, w, name = img.get("height"), img.get("width"), img.get("file_name")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and isinstance(name, str) and name):
            problems.add("images without a positive height/width or a file_name", iid, iid)
        images[iid] = img
    anns_by_image: dict = {iid: [] for iid in images}
    for ann in data.get("annotations", []):
        aid = ann.get("id") if isinstance(ann, dict) else None
        iid = ann.get("image_id") if isinstance(ann, dict) else None
        if iid not in images:
            problems.add("annotations whose image_id is not in 'images' (annotation ids)", aid)
            continue
        if ann.get("iscrowd", 0) != 0:
            continue
        anns_by_image[iid].append(ann)

    records = []
    for iid, img in images.items():
        if iid in problems.bad_images:
            continue
        h, w = img["height"], img["width"]
        path = os.path.join(str(image_root), img["file_name"])
        if check_files and not os.path.isfile(path):
            problems.add("missing image files (image ids)", f"{iid} ({path})", iid)
            continue
        anns = []
        for ann in anns_by_image[iid]:
            aid = ann.get("id")
            why = check_segmentation(ann.get("segmentation"), h, w)
            if why is not None:
                problems.add("malformed segmentations (annotation id / image id: why)", f"{aid}/{iid}: {why}", iid)
                continue
            bbox = ann.get("bbox")
            if bbox is not None:
                if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4
                        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)
                        and bbox[2] >= 0 and bbox[3] >= 0):
                    problems.add("malformed bboxes (annotation id / image id)", f"{aid}/{iid}", iid)
                    continue
                x, y, bw, bh = (float(v) for v in bbox)
                bbox = (x, y, x + bw, y + bh)
            anns.append({"id": aid, "bbox": bbox, "segmentation": ann["segmentation"]})
        if filter_empty and not anns:
            continue
        records.append({"image_id": iid, "file_name": path, "height": h, "width": w, "annotations": anns})

    if problems:
        msg = f"{json_file}: problems found:\n{problems.report()}"
        if on_bad_image == "fatal":
            raise DatasetError(msg)
        records = [r for r in records if r["image_id"] not in problems.bad_images]
        logger.warning("%s\nskipping the %d affected images", msg, len(problems.bad_images))
    return records


class _PackedList:
    """A list of picklable objects stored as one byte buffer, so DataLoader workers that read it do not
    touch (and copy-on-write) millions of Python objects."""

    def __init__(self, items: list):
        blobs = [np.frombuffer(pickle.dumps(x, protocol=pickle.HIGHEST_PROTOCOL), np.uint8) for x in items]
        self._offsets = np.cumsum([0] + [b.size for b in blobs]).astype(np.int64)
        self._data = np.concatenate(blobs) if blobs else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return self._offsets.size - 1

    def __getitem__(self, i: int):
        return pickle.loads(self._data[self._offsets[i]:self._offsets[i + 1]].tobytes())


# ----------------------------------------------------------------------------------------------------
# Dataset


class EntityDataset(Dataset):
    """COCO-style entity dataset producing CropFormer view samples (see `views.build_sample`).

    Args:
        json_file, image_root: the annotation file and the folder its file_names are relative to.
        train: training samples (one short side from `short_sides`, flip, `num_train_crops` random
            corners, masks) or test samples (short side `short_sides[0]`, no flip, `num_test_crops`
            corners (all four by default, see `views.inference_corners`), no masks unless `with_masks`).
        short_sides, max_size: resize choices (train: (640, ..., 800) / 1333; test: (800,) / 1333).
        flip_prob: horizontal flip probability in training.
        crop_ratio: crop side ratio (0.7).
        filter_empty: drop images without non-crowd annotations (default: True for training).
        with_masks: build entity masks (default: True for training).
        on_bad_image: "fatal" raises on any bad image or annotation, "skip" drops it with a warning.
        check_files: check at load time that every image file exists.
        reduced_decode: allow reduced-resolution JPEG decoding when the views need fewer pixels.
        seed: seeds every sample's random choices together with its index and draw number.
    """

    def __init__(
        self,
        json_file: str | os.PathLike,
        image_root: str | os.PathLike,
        *,
        train: bool = True,
        short_sides: Sequence[int] = (640, 672, 704, 736, 768, 800),
        max_size: int = 1333,
        flip_prob: float = 0.5,
        crop_ratio: float = 0.7,
        num_train_crops: int = 1,
        num_test_crops: int = 4,
        filter_empty: bool | None = None,
        with_masks: bool | None = None,
        on_bad_image: str = "fatal",
        check_files: bool = True,
        reduced_decode: bool = True,
        seed: int = 0,
    ):
        self.train = train
        self.short_sides = tuple(int(s) for s in short_sides)
        if not self.short_sides:
            raise ValueError("short_sides is empty")
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)
        self.crop_ratio = float(crop_ratio)
        self.num_train_crops = int(num_train_crops)
        self.num_test_crops = num_test_crops
        inference_corners(num_test_crops)  # fail at construction, not in a worker
        self.with_masks = train if with_masks is None else bool(with_masks)
        self.on_bad_image = on_bad_image
        self.reduced_decode = reduced_decode
        self.seed = int(seed)
        self.epoch = 0
        records = load_entity_records(
            json_file, image_root,
            filter_empty=train if filter_empty is None else filter_empty,
            check_files=check_files, on_bad_image=on_bad_image,
        )
        if not records:
            raise DatasetError(f"{json_file}: no usable images")
        self._records = _PackedList(records)
        # 0 for landscape (w > h), 1 otherwise: detectron2's aspect-ratio groups for batching.
        self.aspect_groups = np.array([0 if r["width"] > r["height"] else 1 for r in records], np.int8)
        self._skipped: set[int] = set()

    def __len__(self) -> int:
        return len(self._records)

    def record(self, index: int) -> dict:
        return self._records[index]

    def set_epoch(self, epoch: int) -> None:
        """Varies the random choices of plain integer indices between epochs (see __getitem__)."""
        self.epoch = int(epoch)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """A sample for `key` = index, or (index, draw) as TrainingSampler yields.

        The sample's random choices come from a generator seeded by (seed, index, draw), where a plain
        integer index uses the current epoch as its draw.
        """
        if isinstance(key, tuple):
            index, draw, kind = int(key[0]), int(key[1]), 0
        else:
            index, draw, kind = int(key), self.epoch, 1
        n = len(self)
        for attempt in range(min(n, 64)):
            i = (index + attempt) % n
            if i in self._skipped:
                continue
            # Seeded by the index actually loaded, so a replacement for a skipped sample is the same
            # whichever worker (knowing of the bad index or not) builds it.
            rng = np.random.default_rng([self.seed, kind, i, draw])
            try:
                return self._load(i, rng)
            except (ImageDecodeError, AnnotationError) as e:
                if self.on_bad_image == "fatal":
                    raise
                self._skipped.add(i)
                logger.warning("skipping sample %d: %s", i, e)
        raise RuntimeError(f"no loadable sample found from index {index} on (last 64 indices bad)")

    def _plan(self, height: int, width: int, rng: np.random.Generator):
        if self.train:
            return draw_train_plan(height, width, rng, short_sides=self.short_sides, max_size=self.max_size,
                                   flip_prob=self.flip_prob, num_crops=self.num_train_crops,
                                   ratio=self.crop_ratio)
        return inference_plan(height, width, short_side=self.short_sides[0], max_size=self.max_size,
                              ratio=self.crop_ratio, num_crops=self.num_test_crops)

    def _load(self, index: int, rng: np.random.Generator) -> dict:
        rec = self._records[index]
        h, w = rec["height"], rec["width"]
        plan = self._plan(h, w, rng)
        decoded = decode_image(rec["file_name"], scale=plan.needed_scale(), reduced=self.reduced_decode,
                               expected_size=(h, w))
        masks = boxes = None
        anns = rec["annotations"]
        if self.with_masks:
            counts = []
            for ann in anns:
                try:
                    counts.append(segmentation_to_counts(ann["segmentation"], h, w))
                except (ValueError, KeyError, TypeError) as e:
                    raise AnnotationError(
                        f"annotation {ann['id']} of image {rec['image_id']} ({rec['file_name']}): {e}"
                    ) from None
            masks = RLEMasks(counts, h, w)
            boxes = np.array(
                [a["bbox"] if a["bbox"] is not None else masks.box(i) for i, a in enumerate(anns)],
                dtype=np.float64,
            ).reshape(-1, 4)
        sample = build_sample(decoded, plan, masks, boxes)
        sample["image_id"] = rec["image_id"]
        sample["file_name"] = rec["file_name"]
        sample["ann_ids"] = [a["id"] for a in anns]
        sample["decode_reduction"] = decoded.reduction
        return sample


# ----------------------------------------------------------------------------------------------------
# Batching


def _ceil_to(x: int, d: int) -> int:
    return int(math.ceil(x / d) * d)


def collate(samples: list[dict], size_divisibility: int = 32) -> dict:
    """Batch samples into the CONTRACTS.md batch dict.

    images       B x T x 3 x Hp x Wp uint8, zero padded; Hp, Wp = largest view size rounded up to a
                 multiple of `size_divisibility`
    image_sizes  B x T x 2 int64;  crop_boxes B x T x 4 float32;  orig_sizes B x 2 int64
    targets      (when the samples have masks) list of B dicts: masks n x T x Hp x Wp bool (padded),
                 valid n x T bool, labels n int64
    image_ids, file_names: lists of B
    """
    if not samples:
        raise ValueError("empty batch")
    T = len(samples[0]["images"])
    if any(len(s["images"]) != T for s in samples):
        raise ValueError("all samples of a batch need the same number of views")
    sizes = torch.stack([s["image_sizes"] for s in samples])  # B x T x 2
    hp = _ceil_to(int(sizes[..., 0].max()), size_divisibility)
    wp = _ceil_to(int(sizes[..., 1].max()), size_divisibility)
    images = torch.zeros(len(samples), T, 3, hp, wp, dtype=torch.uint8)
    for b, s in enumerate(samples):
        for t, im in enumerate(s["images"]):
            images[b, t, :, : im.shape[1], : im.shape[2]] = im
    batch = {
        "images": images,
        "image_sizes": sizes,
        "crop_boxes": torch.stack([s["crop_boxes"] for s in samples]),
        "orig_sizes": torch.stack([s["orig_size"] for s in samples]),
        "image_ids": [s.get("image_id") for s in samples],
        "file_names": [s.get("file_name") for s in samples],
    }
    if all("masks" in s for s in samples):
        targets = []
        for s in samples:
            n = s["valid"].shape[0]
            masks = torch.zeros(n, T, hp, wp, dtype=torch.bool)
            for t, m in enumerate(s["masks"]):
                masks[:, t, : m.shape[1], : m.shape[2]] = m
            targets.append({"masks": masks, "valid": s["valid"], "labels": s["labels"]})
        batch["targets"] = targets
    return batch


# ----------------------------------------------------------------------------------------------------
# Samplers, seeding, loaders


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        from ..distributed import get_rank, get_world_size

        rank = get_rank() if rank is None else rank
        world_size = get_world_size() if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return rank, world_size


class TrainingSampler(Sampler):
    """Infinite stream of (index, draw) for one rank.

    All ranks generate the same sequence of shuffled permutations of range(size) (seeded by `seed`)
    and take every world_size-th element starting at their rank, so together they see each epoch's
    permutation once. `draw` is the element's position in the global stream: a unique number that
    seeds the sample's augmentation. `start` skips that many of this rank's items (to resume).
    """

    def __init__(self, size: int, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, start: int = 0):
        if size <= 0:
            raise ValueError("TrainingSampler needs a non-empty dataset")
        self.size, self.shuffle, self.seed, self.start = size, shuffle, int(seed), int(start)
        self.rank, self.world_size = _rank_world(rank, world_size)

    def _global(self) -> Iterator[int]:
        g = torch.Generator()
        g.manual_seed(self.seed)
        while True:
            if self.shuffle:
                yield from torch.randperm(self.size, generator=g).tolist()
            else:
                yield from range(self.size)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        stream = zip(itertools.count(), self._global())
        mine = itertools.islice(stream, self.rank + self.start * self.world_size, None, self.world_size)
        for draw, index in mine:
            yield index, draw


class InferenceSampler(Sampler):
    """range(size) split into contiguous, nearly equal shards, one per rank (no padding, no repeats)."""

    def __init__(self, size: int, *, rank: int | None = None, world_size: int | None = None):
        self.rank, self.world_size = _rank_world(rank, world_size)
        per = size // self.world_size
        extra = size % self.world_size
        begin = self.rank * per + min(self.rank, extra)
        self.indices = range(begin, begin + per + (1 if self.rank < extra else 0))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def seed_worker(worker_id: int) -> None:
    """DataLoader worker_init_fn: seed Python's and NumPy's global generators from the worker's torch
    seed (base seed from the loader's generator + worker id), for any library that uses them. Our own
    augmentation does not: it is seeded per sample (see EntityDataset.__getitem__)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class GroupedBatchSampler(Sampler):
    """Batches of `batch_size` items of an infinite sampler of (index, draw), each batch from one
    aspect-ratio group (as detectron2's AspectRatioGroupedDataset: landscape and portrait images are
    not mixed, so padding stays small). `groups` None batches in stream order. The first
    `start_batches` batches are skipped (to resume)."""

    def __init__(self, sampler: Sampler, batch_size: int, groups: np.ndarray | None = None,
                 start_batches: int = 0):
        self.sampler, self.batch_size = sampler, int(batch_size)
        self.groups, self.start = groups, int(start_batches)

    def _batches(self) -> Iterator[list]:
        buckets: dict[int, list] = {}
        for item in self.sampler:
            g = int(self.groups[item[0]]) if self.groups is not None else 0
            bucket = buckets.setdefault(g, [])
            bucket.append(item)
            if len(bucket) == self.batch_size:
                buckets[g] = []
                yield bucket

    def __iter__(self) -> Iterator[list]:
        return itertools.islice(self._batches(), self.start, None)


def build_train_loader(
    dataset: EntityDataset,
    *,
    batch_size: int,
    num_workers: int = 4,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    start_iter: int = 0,
    aspect_ratio_grouping: bool = True,
    size_divisibility: int = 32,
) -> DataLoader:
    """Infinite training loader of `batch_size` samples per rank (per-rank, not total).

    Batches from a given `seed` are identical on every run, whatever `num_workers`. `start_iter`
    resumes the stream after that many batches. With `aspect_ratio_grouping` (detectron2's default)
    each batch holds only landscape or only portrait images.
    """
    sampler = TrainingSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    groups = dataset.aspect_groups if aspect_ratio_grouping else None
    g = torch.Generator()
    g.manual_seed(seed)
    return DataLoader(
        dataset, batch_sampler=GroupedBatchSampler(sampler, batch_size, groups, start_iter),
        num_workers=num_workers, collate_fn=functools.partial(collate, size_divisibility=size_divisibility),
        worker_init_fn=seed_worker, generator=g, persistent_workers=num_workers > 0, pin_memory=False,
    )


def build_test_loader(
    dataset: EntityDataset,
    *,
    batch_size: int = 1,
    num_workers: int = 2,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """Loader over this rank's contiguous shard of `dataset`, in order."""
    sampler = InferenceSampler(len(dataset), rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, worker_init_fn=seed_worker)


def build_dataset(input_cfg, data_cfg, *, train: bool, seed: int = 0) -> EntityDataset:
    """EntityDataset from the `input` and `data` sections of cropformer.config.Config.

    Training reads data.train_json / data.train_images with input.min_size_train / max_size_train;
    evaluation reads data.val_json / data.val_images with input.min_size_test / max_size_test.
    """
    return EntityDataset(
        data_cfg.train_json if train else data_cfg.val_json,
        data_cfg.train_images if train else data_cfg.val_images,
        train=train,
        short_sides=tuple(input_cfg.min_size_train) if train else (input_cfg.min_size_test,),
        max_size=input_cfg.max_size_train if train else input_cfg.max_size_test,
        flip_prob=0.5 if input_cfg.random_flip == "horizontal" else 0.0,
        crop_ratio=input_cfg.crop_ratio,
        num_train_crops=input_cfg.crop_sample_num_train,
        num_test_crops=input_cfg.crop_sample_num_test,
        filter_empty=data_cfg.filter_empty if train else False,
        on_bad_image=data_cfg.on_bad_image,
        reduced_decode=train,  # evaluation decodes at full resolution: the original's exact inputs
        seed=seed,
    )
