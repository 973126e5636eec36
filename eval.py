"""Evaluate AP^e (class-agnostic COCO segm AP, SPEC.md section 6) of a checkpoint on a COCO-style set.

    python eval.py --ckpt output/tiny/model_final.safetensors --data val.json --images DIR [--mode full_crops]
    python eval.py --data val.json --preds predictions.json        # score an existing predictions file
    torchrun --nproc_per_node N eval.py --ckpt ... --data ... --images ...   # images sharded over ranks

Prints the AP table and per-image time; writes <out>/metrics.json and <out>/predictions.json (COCO RLE).
"""
import sys

from cropformer.cli import run
from cropformer.cli.eval import main

if __name__ == "__main__":
    sys.exit(run(main))
