"""Smoke test of an installed cropformer, run by CI in each fresh venv (from a folder outside the checkout).

    python scripts/smoke_install.py [--expect-extension]

Checks what a new user touches first: the package and its compiled extension import, `cropformer --help`
and `cropformer info` work from any folder, and one tiny inference runs through the console command on a
checkpoint in the official layout (`--cfg` naming the config), the README's "downloaded checkpoint to
segmented photos" command. Exits non-zero, naming the step, at the first failure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def step(name: str, cmd: list[str], cwd: Path) -> str:
    print(f"smoke: {name}: {' '.join(cmd)}", flush=True)
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"smoke: {name} failed (exit {res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--expect-extension", action="store_true", help="fail when cropformer._C did not load")
    args = p.parse_args()
    exe = shutil.which("cropformer", path=str(Path(sys.executable).parent)) or shutil.which("cropformer")
    if exe is None:
        sys.exit("smoke: the `cropformer` console command is not installed next to this python")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)  # not the checkout: the installed package must work from any folder
        step("cropformer --help", [exe, "--help"], work)
        info = json.loads(step("cropformer info", [exe, "info", "--json"], work))
        if args.expect_extension and not info["extension"]["loaded"]:
            sys.exit(f"smoke: cropformer._C did not load: {info['extension']}")
        print(f"smoke: extension {info['extension']}")
        make = (
            "import cv2, numpy as np, torch\n"
            "from cropformer.config import load_config\n"
            "from cropformer.convert import ours_to_original\n"
            "from cropformer.modeling.build import build_model\n"
            "torch.manual_seed(0)\n"
            "model = build_model(load_config('tiny').model)\n"
            "torch.save({'model': ours_to_original(model.state_dict())}, 'official_layout.pth')\n"
            "rng = np.random.default_rng(0)\n"
            "import os; os.makedirs('photos', exist_ok=True)\n"
            "for i, (h, w) in enumerate([(90, 120), (64, 200)]):\n"
            "    img = np.full((h, w, 3), 40, np.uint8)\n"
            "    cv2.rectangle(img, (10, 10), (w // 2, h // 2), (200, 50, 50), -1)\n"
            "    cv2.imwrite(f'photos/p{i}.jpg', img)\n"
        )
        step("make a tiny checkpoint in the official layout", [sys.executable, "-c", make], work)
        step("cropformer infer", [exe, "infer", "--ckpt", "official_layout.pth", "--cfg", "tiny", "--input", "photos",
                                  "--out", "segmented"], work)
        outputs = sorted(str(q.relative_to(work / "segmented")) for q in (work / "segmented").rglob("*") if q.is_file())
        pngs = [o for o in outputs if o.endswith(".png")]
        if len(pngs) < 2:
            sys.exit(f"smoke: expected an id map per photo, got {outputs}")
        print(f"smoke: ok ({len(outputs)} output files)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
