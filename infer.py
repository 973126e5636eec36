"""Segment every entity of your images ("segment everything"), in batch.

    python infer.py --ckpt model_final.safetensors --input photos/ --out results/
    python infer.py --ckpt ... --input "photos/*.jpg" --out results/ --device cuda
    python infer.py --ckpt ... --input list.txt --out results/        # one image path per line

Outputs (REL.ids.png, REL.overlay.jpg, REL.json per input), resume and the failure report:
`python infer.py --help` (cropformer/cli/infer.py).
"""
import sys

from cropformer.cli import run
from cropformer.cli.infer import main

if __name__ == "__main__":
    sys.exit(run(main))
