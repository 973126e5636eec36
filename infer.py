"""Segment every entity of your images ("segment everything"), in batch.

    python infer.py --ckpt model_final.safetensors --input photos/ --out results/
    python infer.py --ckpt ... --input "photos/*.jpg" --out results/ --device cuda
    python infer.py --ckpt ... --input list.txt --out results/        # one image path per line

For every image NAME it writes into --out:
    NAME.png          entity id map at original resolution (0 = no entity, k = entity k; 16-bit PNG
                      when there are more than 255 entities)
    NAME.json         {"image": path, "height", "width", "entities": [{"id", "score", "area",
                      "bbox" (XYWH), "segmentation" (COCO RLE)}]}
    NAME_overlay.jpg  semi-transparent colours and entity boundaries over the image (longest side capped
                      by --overlay-max-side to keep huge images cheap; 0 = original size)
Images whose three outputs exist are skipped (resume); unreadable images are reported and skipped.
Memory stays bounded on any image size: JPEGs are decoded at reduced resolution when the network needs
fewer pixels, and the fused paste never holds per-query full-resolution maps.
"""
import sys

from cropformer.cli import run
from cropformer.cli.infer import main

if __name__ == "__main__":
    sys.exit(run(main))
