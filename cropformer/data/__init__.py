"""Data: COCO-style entity datasets, image decoding, the full-image + corner-crop views, batching.

- `decode.py`: any image file to RGB uint8 (EXIF, odd modes, reduced-resolution JPEG decoding).
- `transforms.py`: detectron2's shortest-edge resize rule, PIL bilinear / nearest resizing.
- `views.py`: corner crop geometry (SPEC.md section 2), view plans and the sample builder.
- `dataset.py`: the dataset over a COCO JSON, RLE handling, `collate` (the CONTRACTS.md batch),
  samplers, worker seeding and loaders.
- `synthetic.py`: a synthetic entity dataset (`python -m cropformer.data.synthetic`).
"""
from .dataset import (
    AnnotationError,
    DatasetError,
    EntityDataset,
    InferenceSampler,
    TrainingSampler,
    build_dataset,
    build_test_loader,
    build_train_loader,
    collate,
    load_entity_records,
    seed_worker,
)
from .decode import DecodedImage, ImageDecodeError, decode_image, read_image_info
from .views import (
    View,
    ViewPlan,
    build_inference_views,
    build_sample,
    corner_crop_boxes,
    draw_train_plan,
    inference_plan,
    plan_views,
)

__all__ = [
    "AnnotationError",
    "DatasetError",
    "DecodedImage",
    "EntityDataset",
    "ImageDecodeError",
    "InferenceSampler",
    "TrainingSampler",
    "View",
    "ViewPlan",
    "build_dataset",
    "build_inference_views",
    "build_sample",
    "build_test_loader",
    "build_train_loader",
    "collate",
    "corner_crop_boxes",
    "decode_image",
    "draw_train_plan",
    "inference_plan",
    "load_entity_records",
    "make_synthetic_dataset",
    "plan_views",
    "read_image_info",
    "seed_worker",
]


def __getattr__(name):
    # Imported on use, so that `python -m cropformer.data.synthetic` does not find the module
    # already imported by its package (runpy warns about that).
    if name == "make_synthetic_dataset":
        from .synthetic import make_synthetic_dataset

        return make_synthetic_dataset
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
