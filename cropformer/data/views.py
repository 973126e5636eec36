"""Views of one image: the full image and its corner crops (SPEC.md section 2), and the sample builder.

Geometry, as the original `EntityCropDatasetMapper` does it:
- Crops are the four corners of the original-resolution image, `crop_w = int(ratio * W)`,
  `crop_h = int(ratio * H)`, in the order top-left, top-right, bottom-left, bottom-right
  (`corner_crop_boxes`). Training uses one corner drawn uniformly (T = 2 views), testing all four
  (T = 5).
- One short side (drawn from the training choices, or the test size) and one horizontal flip are
  shared by every view. The flip is applied to the original image first; crops are cut from the
  flipped image, so crop boxes are in the flipped frame (the frame the full view shows). Each view is
  resized on its own to that short side (detectron2's rule, `transforms.resized_size`): a crop is seen
  at about 1/ratio = 1.43x the full view's scale.
- Images are resized with PIL BILINEAR, masks with PIL NEAREST, so with a full-resolution decode every
  view equals the original's bit for bit.

Masks are never resized as arrays here: each view's mask is sampled at PIL's nearest-neighbour grid
(`view_grid`) straight from a mask source (an RLE, see dataset.py, or dense masks), so a 15,000 px
annotation is only ever evaluated at the pixels the views keep.

A view's `box` is (x0, y0, x1, y1) in original-resolution pixels of the (possibly flipped) image; the
full view's box is (0, 0, W, H). With flip, the footprint in the unflipped file is (W - x1, y0, W - x0, y1).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol, Sequence

import numpy as np
import torch

from .decode import DecodedImage
from .transforms import nearest_indices, resize_bilinear, resized_size

__all__ = [
    "corner_crop_boxes",
    "View",
    "ViewPlan",
    "view_size",
    "plan_views",
    "draw_train_plan",
    "inference_plan",
    "inference_corners",
    "view_grid",
    "render_image",
    "MaskSource",
    "DenseMasks",
    "views_box_valid",
    "build_sample",
    "build_inference_views",
]

NUM_CORNERS = 4


def corner_crop_boxes(height: int, width: int, ratio: float = 0.7) -> list[tuple[int, int, int, int]]:
    """The four corner crops of an H x W image as (x0, y0, x1, y1), SPEC.md section 2:
    top-left [0, 0, cw, ch], top-right [W-cw, 0, W, ch], bottom-left [0, H-ch, cw, H],
    bottom-right [W-cw, H-ch, W, H], with cw = int(ratio * W), ch = int(ratio * H).

    (The original computes them with a sliding window of stride int(0.6 * side); for every side of
    4 px or more that window yields exactly these corners.)

    A side too short for int(ratio * side) >= 1 (1 px at ratio 0.7) is kept whole: the crops of a
    1 x 7 image are 1 x 4, so every image has its four crops (the original fails on such images).
    """
    height, width = int(height), int(width)
    if height <= 0 or width <= 0 or not 0 < ratio <= 1:
        raise ValueError(f"no crops of ratio {ratio} for an image of {height} x {width}")
    cw, ch = max(1, int(ratio * width)), max(1, int(ratio * height))
    return [
        (0, 0, cw, ch),
        (width - cw, 0, width, ch),
        (0, height - ch, cw, height),
        (width - cw, height - ch, width, height),
    ]


@dataclass(frozen=True)
class View:
    """One view: `box` (x0, y0, x1, y1) in original pixels of the flipped-or-not image, resized to
    `size` (h, w). `corner` is -1 for the full view, else the index into corner_crop_boxes."""

    box: tuple[int, int, int, int]
    size: tuple[int, int]
    corner: int

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): output pixels per original pixel."""
        x0, y0, x1, y1 = self.box
        return self.size[0] / (y1 - y0), self.size[1] / (x1 - x0)


@dataclass(frozen=True)
class ViewPlan:
    """Everything random about a sample, drawn before decoding: sizes, flip and the views."""

    height: int
    width: int
    flip: bool
    short_side: int
    max_size: int
    views: tuple[View, ...]

    @property
    def corners(self) -> list[int]:
        return [v.corner for v in self.views[1:]]

    def needed_scale(self) -> float:
        """Largest output/original pixel ratio over views and axes (what a reduced decode must keep)."""
        return max(max(v.scale) for v in self.views)

    def crop_boxes(self) -> torch.Tensor:
        """T x 4 float32 (x0, y0, x1, y1) of each view in original pixels (flipped frame)."""
        return torch.tensor([v.box for v in self.views], dtype=torch.float32)

    def image_sizes(self) -> torch.Tensor:
        """T x 2 int64 (h, w) of each view."""
        return torch.tensor([v.size for v in self.views], dtype=torch.int64)


def view_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """`resized_size`, with each side at least 1 px.

    Only slivers need the floor: capping the long side at `max_size` can round the short side to 0
    (3 x 50000 at 800 / 1333 gives 0.08 px). Such a view is thinner than the network's stride; it is
    zero-padded to the stride like any view, and its masks come from the one row (column) of 1/4
    resolution logits it covers, upsampled to the image.
    """
    h, w = resized_size(height, width, short_side, max_size)
    return max(h, 1), max(w, 1)


def plan_views(
    height: int,
    width: int,
    *,
    short_side: int,
    max_size: int,
    corners: Sequence[int],
    flip: bool = False,
    ratio: float = 0.7,
) -> ViewPlan:
    """Full view plus the given corner crops, all resized to `short_side` (longer side <= max_size,
    each side >= 1 px; see `view_size`). Any image of at least 1 x 1 px has a plan."""
    full = View((0, 0, width, height), view_size(height, width, short_side, max_size), -1)
    boxes = corner_crop_boxes(height, width, ratio) if corners else []
    views = [full]
    for c in corners:
        x0, y0, x1, y1 = boxes[c]
        views.append(View(boxes[c], view_size(y1 - y0, x1 - x0, short_side, max_size), int(c)))
    return ViewPlan(int(height), int(width), bool(flip), int(short_side), int(max_size), tuple(views))


def draw_train_plan(
    height: int,
    width: int,
    rng: np.random.Generator,
    *,
    short_sides: Sequence[int] = (640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    flip_prob: float = 0.5,
    num_crops: int = 1,
    ratio: float = 0.7,
) -> ViewPlan:
    """Training views: one short side drawn uniformly from `short_sides`, a horizontal flip with
    probability `flip_prob`, and `num_crops` distinct corners drawn uniformly (all shared by the views).
    """
    short_side = int(short_sides[int(rng.integers(len(short_sides)))])
    flip = bool(rng.random() < flip_prob)
    corners = [int(c) for c in rng.choice(NUM_CORNERS, size=num_crops, replace=False)]
    return plan_views(height, width, short_side=short_side, max_size=max_size, corners=corners,
                      flip=flip, ratio=ratio)


# With fewer than four test crops, the corners taken first are those covering the most of the image
# together: one, then the opposite one (together all but two 0.3 x 0.3 corners at ratio 0.7), ...
_TEST_CORNER_PRIORITY = (0, 3, 1, 2)


def inference_corners(num_crops: int = NUM_CORNERS) -> tuple[int, ...]:
    """The corners used at test time for `num_crops` crops (input.crop_sample_num_test, 0-4), in
    view order: all four (the original's and the paper's default) are (0, 1, 2, 3); fewer are the
    first of top-left, bottom-right, top-right, bottom-left."""
    if not isinstance(num_crops, (int, np.integer)) or not 0 <= num_crops <= NUM_CORNERS:
        raise ValueError(f"crop_sample_num_test must be 0..{NUM_CORNERS}, got {num_crops!r}")
    return tuple(sorted(_TEST_CORNER_PRIORITY[:num_crops]))


def inference_plan(height: int, width: int, *, short_side: int = 800, max_size: int = 1333,
              ratio: float = 0.7, num_crops: int = NUM_CORNERS) -> ViewPlan:
    """Inference views: the full image and `num_crops` corners (`inference_corners`), no flip."""
    return plan_views(height, width, short_side=short_side, max_size=max_size,
                      corners=inference_corners(num_crops), flip=False, ratio=ratio)


def view_grid(view: View, plan: ViewPlan) -> tuple[np.ndarray, np.ndarray]:
    """Original-image (unflipped) row and column of every output pixel of `view` under PIL NEAREST.

    Returns rows (h,) and cols (w,) int64: view_mask[y, x] = original_mask[rows[y], cols[x]].
    Matches flip -> crop -> PIL NEAREST resize of the original exactly.
    """
    x0, y0, x1, y1 = view.box
    h, w = view.size
    rows = y0 + nearest_indices(y1 - y0, h)
    cols = x0 + nearest_indices(x1 - x0, w)
    if plan.flip:
        cols = plan.width - 1 - cols
    return rows, cols


def render_image(image: np.ndarray, view: View, plan: ViewPlan, reduction: int = 1) -> np.ndarray:
    """Cut and resize one view from a decoded image (PIL BILINEAR).

    Args:
        image: h_d x w_d x 3 uint8 RGB, the UNflipped image decoded at 1/reduction
            (h_d = ceil(H / reduction)).
        view, plan: the view and its plan (flip, original size).
        reduction: 1 for a full-resolution decode (then the result is exactly flip -> crop -> PIL
            resize, as the original), else 2, 4 or 8.

    Returns:
        view.size[0] x view.size[1] x 3 uint8.
    """
    hd, wd = image.shape[:2]
    r = float(reduction)
    x0, y0, x1, y1 = view.box
    # Box in decoded pixels of the flipped image. Reduced decodes round the size up, so after a flip
    # the original's right edge (at W / r) sits at the decoded image's left plus this offset.
    ox = (wd - plan.width / r) if plan.flip else 0.0
    bx0, bx1, by0, by1 = x0 / r + ox, x1 / r + ox, y0 / r, y1 / r
    ix0, iy0 = int(math.floor(bx0)), int(math.floor(by0))
    ix1, iy1 = min(int(math.ceil(bx1)), wd), min(int(math.ceil(by1)), hd)
    if plan.flip:
        sub = image[iy0:iy1, wd - ix1:wd - ix0][:, ::-1]  # region of the flipped image, flipped
    else:
        sub = image[iy0:iy1, ix0:ix1]
    box = (bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
    if box == (0.0, 0.0, float(sub.shape[1]), float(sub.shape[0])):
        box = None  # integer region: plain crop-then-resize (the original's exact path)
    return resize_bilinear(np.ascontiguousarray(sub), view.size, box)


# Inference renders the views of a large photo in threads (PIL's resize releases the GIL): 0.29-0.31 s
# of five views of a 3000 x 4000 photo on one thread, the largest cost outside the network. Small images
# and training samples (rendered beside the training step or in loader workers) stay on one thread.
PARALLEL_RENDER_PIXELS = 4_000_000


@lru_cache(maxsize=1)
def _render_pool() -> ThreadPoolExecutor:
    # as many threads as torch uses (it already honours the CPU affinity and OMP_NUM_THREADS), at most 5
    threads = max(1, min(torch.get_num_threads(), 5))
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cropformer-views")


class MaskSource(Protocol):
    """n entity masks of an H x W image that can be sampled on a grid."""

    def __len__(self) -> int: ...

    def sample(self, index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """len(rows) x len(cols) bool: mask[index][rows][:, cols]."""


class DenseMasks:
    """Masks held as an n x H x W bool/uint8 array (tests, small images)."""

    def __init__(self, masks: np.ndarray):
        self.masks = np.asarray(masks)

    def __len__(self) -> int:
        return self.masks.shape[0]

    def sample(self, index: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.masks[index][np.ix_(rows, cols)].astype(bool)


def views_box_valid(boxes: np.ndarray, plan: ViewPlan) -> np.ndarray:
    """Which entity boxes are non-empty in which view, as the original decides (box clipped to the
    view, scaled to the view's size, width and height > 1e-5).

    Args:
        boxes: n x 4 float (x0, y0, x1, y1) in original, unflipped pixels.
    Returns:
        n x T bool.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if plan.flip:
        boxes = np.stack([plan.width - boxes[:, 2], boxes[:, 1], plan.width - boxes[:, 0], boxes[:, 3]], 1)
    out = np.zeros((boxes.shape[0], len(plan.views)), dtype=bool)
    for t, v in enumerate(plan.views):
        x0, y0, x1, y1 = v.box
        sy, sx = v.scale
        ow = np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0)
        oh = np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0)
        out[:, t] = (ow * sx > 1e-5) & (oh * sy > 1e-5)
    return out


def build_sample(
    decoded: DecodedImage | np.ndarray,
    plan: ViewPlan,
    masks: MaskSource | None = None,
    boxes: np.ndarray | None = None,
) -> dict:
    """Render every view of `plan` (images, and masks when given) into one sample.

    Args:
        decoded: the decoded image (DecodedImage, possibly reduced), or a full-resolution
            H x W x 3 uint8 RGB array.
        plan: from `draw_train_plan` / `inference_plan` / `plan_views`.
        masks: n entity masks of the original image (unflipped), or None (inference).
        boxes: n x 4 (x0, y0, x1, y1) original-pixel entity boxes for the box half of the validity
            flag; None uses the masks alone.

    Returns a dict:
        images       list of T uint8 tensors 3 x h_t x w_t (view 0 = full image)
        image_sizes  T x 2 int64;  crop_boxes T x 4 float32;  orig_size 2 int64 (H, W)
        flip (bool), short_side (int), corners (list of T-1 corner indices)
        masks        list of T bool tensors n x h_t x w_t (entity i is row i in every view), when given
        valid        n x T bool: non-empty box and non-empty mask in that view
        labels       n int64 zeros (class-agnostic: every entity is class 0)
    """
    if isinstance(decoded, DecodedImage):
        image, reduction = decoded.image, decoded.reduction
        if (decoded.height, decoded.width) != (plan.height, plan.width):
            raise ValueError(f"plan is for {plan.height} x {plan.width}, image is "
                             f"{decoded.height} x {decoded.width}")
    else:
        image, reduction = decoded, 1
        if image.shape[:2] != (plan.height, plan.width):
            raise ValueError(f"plan is for {plan.height} x {plan.width}, image is {image.shape[:2]}")

    def render(view: View) -> torch.Tensor:
        return torch.from_numpy(render_image(image, view, plan, reduction)).permute(2, 0, 1).contiguous()

    parallel = masks is None and len(plan.views) > 1 and image.shape[0] * image.shape[1] >= PARALLEL_RENDER_PIXELS
    sample = {
        "images": list(_render_pool().map(render, plan.views)) if parallel else [render(v) for v in plan.views],
        "image_sizes": plan.image_sizes(),
        "crop_boxes": plan.crop_boxes(),
        "orig_size": torch.tensor([plan.height, plan.width], dtype=torch.int64),
        "flip": plan.flip,
        "short_side": plan.short_side,
        "corners": plan.corners,
    }
    if masks is None:
        return sample
    n, T = len(masks), len(plan.views)
    grids = [view_grid(v, plan) for v in plan.views]
    view_masks, nonempty = [], []
    for t, v in enumerate(plan.views):
        rows, cols = grids[t]
        m = np.zeros((n,) + v.size, dtype=bool)
        for i in range(n):
            m[i] = masks.sample(i, rows, cols)
        view_masks.append(torch.from_numpy(m))
        nonempty.append(m.any(axis=(1, 2)))  # numpy: 0.06 ms for 32 masks of 256 x 320; torch.any 1.7 ms
    valid = torch.from_numpy(np.stack(nonempty, 1)) if n else torch.zeros(0, T, dtype=torch.bool)
    if boxes is not None:
        valid &= torch.from_numpy(views_box_valid(boxes, plan))
    sample["masks"] = view_masks
    sample["valid"] = valid
    sample["labels"] = torch.zeros(n, dtype=torch.int64)
    return sample


def build_inference_views(
    image: np.ndarray, *, short_side: int = 800, max_size: int = 1333, ratio: float = 0.7
) -> dict:
    """The inference input of one image: the full view and its four corner crops (T = 5).

    Args:
        image: H x W x 3 uint8 RGB at full resolution.
    Returns the `build_sample` dict without masks (images, image_sizes, crop_boxes, orig_size, ...).
    """
    plan = inference_plan(image.shape[0], image.shape[1], short_side=short_side, max_size=max_size, ratio=ratio)
    return build_sample(image, plan)
