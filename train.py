"""Train CropFormer or the Mask2Former entity baseline.

    torchrun --nproc_per_node N train.py --cfg configs/cropformer_swin_tiny_3x.json [--set k=v ...]
    torchrun train.py --cfg swin_t_1x.json            # a name is looked up in configs/
    python train.py --cfg tiny --set data.train_json=... data.train_images=...
    python train.py --demo                            # synthetic data, tiny model, CPU, a few minutes

Writes to `output_dir`: metrics.jsonl, loss_curve.png, last_checkpoint.pth (atomic), and at the end
model_final.safetensors (+ .json config) and, with validation data, eval results.
"""
import sys

from cropformer.cli import run
from cropformer.cli.train import main

if __name__ == "__main__":
    sys.exit(run(main))
